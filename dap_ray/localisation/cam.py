"""Class activation maps of an image's label at several scales, with flips (DAP Step 2).

For each scale s: resize so the short side is s (bilinear, antialiased, aspect kept, as
torchvision's ``Resize(s)``), normalise with the ImageNet mean and std, zero-pad right and
bottom to a multiple of the stride; with flips, also run the mirrored image and average
the mirrored-back feature maps. The CAM of the label is the 1x1 convolution of the feature
map with that class's linear weight plus its bias (no ReLU). Each scale's map is min-max
normalised to [0, 1] on its own (a constant map becomes zeros), brought onto the largest
scale's grid by nearest-neighbour sampling (as the authors' release does), and the maps are
averaged (not renormalised).

Batching: images are grouped by their padded input shape at each scale and each group
runs as one batch. Padding to a batch maximum instead would change the result: extra
padding alters the features near the image's right and bottom edges and adds cells to the
map's min-max. Grouping keeps batched and one-at-a-time results equal, and ImageNet-like
data (mostly 4:3 and 3:4 photos) falls into few shapes, so batches stay full.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import functional as TF

from dap_ray.models.classifiers import as_cam_model

__all__ = ["CamExtractor", "IMAGENET_MEAN", "IMAGENET_STD", "check_image", "resize_short_side", "resize_tensor",
           "resized_size"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """``(w, h)`` after resizing the short side to ``short_side`` (torchvision's rounding)."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def check_image(image: object, name: str = "image") -> np.ndarray:
    """``image`` if it is an (H, W, 3) uint8 RGB array, else a ValueError naming it."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name} must be an (H, W, 3) uint8 RGB array, got {desc}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {image.shape})")
    return image


def resize_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB to (h, w, 3) uint8 with short side ``short_side`` (:func:`resize_tensor`)."""
    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return resize_tensor(chw, short_side).permute(1, 2, 0).numpy()


def resize_tensor(image: torch.Tensor, short_side: int) -> torch.Tensor:
    """(3, H, W) uint8 RGB, on any device, to (3, h, w) uint8 on the same device, short side ``short_side``.

    Bilinear with antialiasing (torchvision's tensor resize, which matches PIL's), rounded
    back to uint8 as the authors' PIL-based pipeline was.
    """
    new_w, new_h = resized_size(image.shape[2], image.shape[1], short_side)
    return TF.resize(image, [new_h, new_w], antialias=True)


class CamExtractor:
    """Multi-scale, flip-averaged CAMs of each image's label.

    Args:
        model: a classifier that :func:`dap_ray.models.as_cam_model` accepts (any
            torchvision ResNet, or a :class:`dap_ray.models.CamModel`).
        scales: short sides, in pixels, to run at.
        flip: also run the horizontally mirrored image.
        stride: the feature map's stride; inputs are padded to a multiple of it.
        device: where to run; default CUDA when available, else CPU. The model runs
            channels-last (faster with cuDNN and oneDNN alike), under bf16 autocast on
            CUDA and in float32 on CPU.
        batch_size: images per forward pass (each with its mirror when ``flip``).
        compile: run the feature network through ``torch.compile`` (it compiles on the first
            batches and again as new input shapes come; worth it only on long GPU runs: see
            benchmarks/bench_gpu_mine.py).

    Calling it with a list of (H, W, 3) uint8 RGB arrays of any sizes and their integer
    labels returns one float32 CAM per image, of shape (ceil(h/stride), ceil(w/stride))
    where (h, w) is the image resized to the largest scale; values in [0, 1].
    """

    def __init__(
        self,
        model: nn.Module,
        scales: Sequence[int] = (288, 576),
        flip: bool = True,
        stride: int = 32,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        compile: bool = False,
    ):
        scales = tuple(sorted(int(s) for s in scales))
        if not scales or scales[0] <= 0:
            raise ValueError(f"scales must be positive short sides, got {scales}")
        if stride <= 0 or batch_size <= 0:
            raise ValueError(f"stride and batch_size must be positive, got {stride} and {batch_size}")
        self.scales, self.flip, self.stride, self.batch_size = scales, bool(flip), int(stride), int(batch_size)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._on_cuda = self.device.type == "cuda"
        # A copy: moving the caller's model to another device or memory format in place would
        # break whatever else uses it (a CPU reference beside a CUDA extractor, say).
        cam_model = copy.deepcopy(as_cam_model(model)).eval().to(self.device, memory_format=torch.channels_last)
        self.model = cam_model
        self._features = torch.compile(cam_model.feature_map) if compile else cam_model.feature_map
        with torch.no_grad():
            self._weight = cam_model.class_weight.detach().float()
            self._bias = cam_model.class_bias.detach().float()
        self.num_classes = int(self._weight.shape[0])
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255

    def __call__(self, images: Sequence[np.ndarray], labels: Sequence[int]) -> list[np.ndarray]:
        images = [check_image(image, f"images[{i}]") for i, image in enumerate(images)]
        resized = [[resize_short_side(image, s) for s in self.scales] for image in images]
        return self.from_resized(resized, labels)

    def from_resized(self, resized: Sequence[Sequence[np.ndarray]], labels: Sequence[int]) -> list[np.ndarray]:
        """CAMs from images already resized by :func:`resize_short_side`.

        ``resized[i][j]`` is image i at ``self.scales[j]`` ((h, w, 3) uint8), so that
        decoding and resizing can run on other workers than the model.
        """
        tensors = [[torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1) for image in scales]
                   for scales in resized]
        return self.from_tensors(tensors, labels)

    def from_tensors(self, resized: Sequence[Sequence[torch.Tensor]], labels: Sequence[int]) -> list[np.ndarray]:
        """CAMs from (3, h, w) uint8 tensors resized by :func:`resize_tensor`, on any device
        (those already on the model's device, decoded there, stay there).

        ``resized[i][j]`` is image i at ``self.scales[j]``. The maps are combined on the
        device and reach the host in one copy.
        """
        labels = self._check_labels(labels, len(resized))
        if not len(resized):
            return []
        per_scale = [self._cams_at_scale([r[j] for r in resized], labels) for j in range(len(self.scales))]
        combined = []
        with torch.inference_mode():
            for i in range(len(resized)):
                target = per_scale[-1][i]
                total = target.clone()
                for maps in per_scale[:-1]:
                    total += _nearest(maps[i], tuple(target.shape))
                total /= len(self.scales)
                combined.append(total.flatten())
            flat = torch.cat(combined).cpu().numpy()
        cams, start = [], 0
        for maps in per_scale[-1]:
            size = maps.numel()
            cams.append(flat[start : start + size].reshape(tuple(maps.shape)))
            start += size
        return cams

    def _check_labels(self, labels: Sequence[int], count: int) -> np.ndarray:
        if len(labels) != count:
            raise ValueError(f"got {count} images but {len(labels)} labels")
        out = np.empty(count, np.int64)
        for i, label in enumerate(labels):
            if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
                raise ValueError(f"labels[{i}] must be an integer class index, got {label!r}")
            if not 0 <= label < self.num_classes:
                raise ValueError(f"labels[{i}] = {label} is outside the classifier's {self.num_classes} classes")
            out[i] = label
        return out

    def _cams_at_scale(self, images: list[torch.Tensor], labels: np.ndarray) -> list[torch.Tensor]:
        """Min-max normalised (h, w) float32 CAMs of ``images`` ((3, h, w) uint8, all at one
        scale), on the model's device."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            groups[(_round_up(image.shape[1], self.stride), _round_up(image.shape[2], self.stride))].append(i)
        out: list[torch.Tensor] = [None] * len(images)  # type: ignore[list-item]
        for shape, members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                cams = self._forward([images[i] for i in chunk], labels[chunk], shape)
                for i, cam in zip(chunk, cams):
                    out[i] = cam
        return out

    @torch.inference_mode()
    def _forward(self, images: list[torch.Tensor], labels: np.ndarray, padded: tuple[int, int]) -> torch.Tensor:
        n = len(images)
        batch = torch.zeros((n, 3, *padded), dtype=torch.float32, device=self.device)
        for k, image in enumerate(images):
            if image.device.type == "cpu" and self._on_cuda:
                image = image.pin_memory().to(self.device, non_blocking=True)
            batch[k, :, : image.shape[1], : image.shape[2]] = (image.float() - self._mean[0]) / self._std[0]
        if self.flip:
            batch = torch.cat([batch, batch.flip(-1)])
        batch = batch.contiguous(memory_format=torch.channels_last)
        if self._on_cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                features = self._features(batch)
        else:
            features = self._features(batch)
        features = features.float()
        if self.flip:
            features = (features[:n] + features[n:].flip(-1)) * 0.5
        index = torch.from_numpy(labels).to(self.device)
        cam = torch.einsum("nchw,nc->nhw", features, self._weight[index]) + self._bias[index].view(n, 1, 1)
        low = cam.amin(dim=(1, 2), keepdim=True)
        span = cam.amax(dim=(1, 2), keepdim=True) - low
        return torch.where(span > 0, (cam - low) / span.clamp_min(torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _nearest(cam: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``cam`` sampled onto ``shape`` as ``F.interpolate(mode="nearest")`` does."""
    if tuple(cam.shape) == shape:
        return cam
    return F.interpolate(cam[None, None], size=shape, mode="nearest")[0, 0]
