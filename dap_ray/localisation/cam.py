"""Class activation maps of an image's label at several scales, with flips (DAP Step 2).

For each scale s: resize so the short side is s (bilinear, antialiased, aspect kept, as
torchvision's ``Resize(s)``), normalise with the ImageNet mean and std, zero-pad right and
bottom to a multiple of the stride; with flips, also run the mirrored image and average
the mirrored-back feature maps. The CAM of the label is the 1x1 convolution of the feature
map with that class's linear weight plus its bias (no ReLU). Each scale's map is min-max
normalised to [0, 1] on its own (a constant map becomes zeros), brought onto the largest
scale's grid by nearest-neighbour sampling (as the authors' release does), and the maps are
averaged (not renormalised).

Batching, two shape policies (:data:`SHAPE_POLICIES`):

- ``exact``: images are grouped by their padded input shape at each scale and each group
  runs as one batch, so batched and one-at-a-time results are equal. Every aspect ratio is
  its own shape, so at batch 256 a forward pass held 17.6 images on average on ImageNet's
  aspect mix (benchmarks/bench_gpu_mine.py), and each new shape costs cuDNN a first pass.
- ``buckets``: each image goes to one of a few canonical input shapes per scale (per
  orientation, one per aspect in ``bucket_aspects``, 4:3 by default): an image that fits
  is zero-padded right and bottom, one more elongated than the largest bucket is squeezed
  along its long side to fit (ImageNet classifiers train on aspect changes up to 4:3 through
  RandomResizedCrop). The CAM is taken on the image's own cells only: the min-max ignores
  the padding's cells, which are cut away. A padded image's map has the exact path's
  shape and differs from its values only where the extra padding reaches the features near
  the right and bottom edges. A squeezed image's map is on the squeezed image's grid
  (:meth:`CamExtractor.from_tensors_native`, with its frame), and its boxes are drawn there
  and stretched back (``frames`` of :func:`dap_ray.localisation.boxes.cam_to_boxes_batch`):
  resampling the coarse map onto the exact grid first cost CorLoc on the built-in sample's
  3:2 images (0.221 against the exact path's 0.244; stretched boxes 0.261: docs/mining.md).
  :func:`plan_shape` says where an image goes; :func:`forward_sizes` counts the passes.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import functional as TF

from dap_ray.models.classifiers import as_cam_model

__all__ = ["COMPILE_MODES", "CamExtractor", "IMAGENET_MEAN", "IMAGENET_STD", "SHAPE_POLICIES", "check_image",
           "forward_sizes", "plan_shape", "resize_short_side", "resize_tensor", "resized_size"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHAPE_POLICIES = ("exact", "buckets")
# torch.compile's modes, and torch-tensorrt's backend through torch.compile.
COMPILE_MODES = ("off", "default", "max-autotune", "reduce-overhead", "tensorrt")
# With a compiled network and buckets, forward passes are padded to a multiple of this many
# images, so that a bucket meets at most batch_size / 32 batch sizes (each a compilation or
# a CUDA graph) instead of one per size its share of a batch happens to have.
STATIC_BATCH_MULTIPLE = 32


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


def plan_shape(height: int, width: int, stride: int = 32, policy: str = "exact",
               bucket_aspects: Sequence[float] = (4 / 3,)) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where an image of ``height`` x ``width`` pixels (already resized to its scale) goes in
    a forward pass: ``((H, W), (h, w))``, the padded input shape of its batch and the size the
    image takes in it, top-left (equal to its own unless the ``buckets`` policy squeezes it).

    ``exact``: its own size padded to a multiple of ``stride``. ``buckets``: the smallest
    bucket of its orientation whose long side holds it, the short side padded to a multiple
    of ``stride``; a bucket of aspect ``a`` has a long side of ``a`` times the padded short
    side, rounded up to a multiple of ``stride``. Square images count as landscape.
    """
    if policy not in SHAPE_POLICIES:
        raise ValueError(f"shapes must be one of {SHAPE_POLICIES}, got {policy!r}")
    if policy == "exact":
        return (_round_up(height, stride), _round_up(width, stride)), (height, width)
    portrait = height > width
    short, long = (width, height) if portrait else (height, width)
    padded_short = _round_up(short, stride)
    longs = sorted(_round_up(int(round(padded_short * a)), stride) for a in bucket_aspects)
    bucket_long = next((b for b in longs if long <= b), longs[-1])
    placed_long = min(long, bucket_long)
    if portrait:
        return (bucket_long, padded_short), (placed_long, short)
    return (padded_short, bucket_long), (short, placed_long)


def forward_sizes(sizes: Sequence[tuple[int, int]], batch_size: int, stride: int = 32, policy: str = "exact",
                  bucket_aspects: Sequence[float] = (4 / 3,)) -> list[int]:
    """The images in each forward pass :class:`CamExtractor` runs for images of ``sizes``
    ((h, w) at one scale, one batch of them), in its order: per input shape, chunks of at
    most ``batch_size``. Counts without running the network."""
    groups: dict[tuple[int, int], int] = defaultdict(int)
    for height, width in sizes:
        groups[plan_shape(height, width, stride, policy, bucket_aspects)[0]] += 1
    return [min(batch_size, count - start) for count in groups.values() for start in range(0, count, batch_size)]


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
        shapes: ``"exact"`` or ``"buckets"``, how images share forward passes (see the
            module's docstring).
        bucket_aspects: the ``buckets`` policy's aspect ratios (long side over short, each at
            least 1), one bucket per orientation each.
        compile: one of :data:`COMPILE_MODES` (``True`` is ``"default"``, ``False``
            ``"off"``): run the feature network through ``torch.compile`` in that mode
            (``reduce-overhead`` is CUDA graphs, and needs CUDA) or through torch-tensorrt's
            backend. It compiles on the first batches and again as new input shapes come;
            with ``buckets`` the batch is padded to a multiple of
            :data:`STATIC_BATCH_MULTIPLE` so that shapes stay few. Where a mode is not
            available (no CUDA for CUDA graphs, torch-tensorrt not installed, a compiler
            failure) the network runs eagerly and :attr:`compile_note` says why.
        cudnn_benchmark: let cuDNN time its kernels for each new input shape (pays with few
            shapes, that is ``buckets``); sets ``torch.backends.cudnn.benchmark`` for the process.

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
        shapes: str = "exact",
        bucket_aspects: Sequence[float] = (4 / 3,),
        compile: bool | str = False,
        cudnn_benchmark: bool = False,
    ):
        scales = tuple(sorted(int(s) for s in scales))
        if not scales or scales[0] <= 0:
            raise ValueError(f"scales must be positive short sides, got {scales}")
        if stride <= 0 or batch_size <= 0:
            raise ValueError(f"stride and batch_size must be positive, got {stride} and {batch_size}")
        if shapes not in SHAPE_POLICIES:
            raise ValueError(f"shapes must be one of {SHAPE_POLICIES}, got {shapes!r}")
        aspects = tuple(float(a) for a in bucket_aspects)
        if not aspects or not all(math.isfinite(a) and a >= 1 for a in aspects):
            raise ValueError(f"bucket_aspects must be aspect ratios of at least 1 (long side over short), "
                             f"got {tuple(bucket_aspects)}")
        mode = ("default" if compile else "off") if isinstance(compile, bool) else compile
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES} (or a bool), got {compile!r}")
        self.scales, self.flip, self.stride, self.batch_size = scales, bool(flip), int(stride), int(batch_size)
        self.shapes, self.bucket_aspects = shapes, aspects
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._on_cuda = self.device.type == "cuda"
        if cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        # A copy: moving the caller's model to another device or memory format in place would
        # break whatever else uses it (a CPU reference beside a CUDA extractor, say).
        cam_model = copy.deepcopy(as_cam_model(model)).eval().to(self.device, memory_format=torch.channels_last)
        self.model = cam_model
        self.compile_mode, self.compile_note = _compile_mode(mode, self._on_cuda)
        self._eager = cam_model.feature_map
        self._features = self._eager if self.compile_mode == "off" else _compiled(cam_model.feature_map,
                                                                                  self.compile_mode)
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
        device and reach the host in one copy. Each map is on its image's stride grid at the
        largest scale: a map :meth:`from_tensors_native` gives on a squeezed image's grid is
        resampled onto it (bilinear), which blurs it; boxes are better drawn from the native
        maps and their frames.
        """
        cams, frames = self.from_tensors_native(resized, labels)
        for i, (fx, fy) in enumerate(frames):
            if fx != 1.0 or fy != 1.0:
                height, width = (int(v) for v in resized[i][-1].shape[1:])
                cams[i] = _onto_exact_grid(cams[i], (height, width), (fy, fx), self.stride)
        return cams

    def from_tensors_native(self, resized: Sequence[Sequence[torch.Tensor]],
                            labels: Sequence[int]) -> tuple[list[np.ndarray], np.ndarray]:
        """CAMs as :meth:`from_tensors`, but each on the grid of the image as the network saw it,
        and their frames: float64 (N, 2), ``(fx, fy)`` the share of its width and height the
        ``buckets`` policy squeezed the image to at the largest scale ((1, 1) when it was not).
        Give both to :func:`dap_ray.localisation.boxes.cam_to_boxes_batch` (``frames``), which
        draws the boxes on the map as it is and stretches them back."""
        labels = self._check_labels(labels, len(resized))
        if not len(resized):
            return [], np.ones((0, 2))
        per_scale = [self._cams_at_scale([r[j] for r in resized], labels) for j in range(len(self.scales))]
        combined = []
        with torch.inference_mode():
            for i in range(len(resized)):
                target = per_scale[-1][0][i]
                total = target.clone()
                for maps, _ in per_scale[:-1]:
                    total += _nearest(maps[i], tuple(target.shape))
                total /= len(self.scales)
                combined.append(total.flatten())
            flat = torch.cat(combined).cpu().numpy()
        cams, start = [], 0
        for maps in per_scale[-1][0]:
            size = maps.numel()
            cams.append(flat[start : start + size].reshape(tuple(maps.shape)))
            start += size
        return cams, per_scale[-1][1]

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

    def _cams_at_scale(self, images: list[torch.Tensor], labels: np.ndarray) -> tuple[list[torch.Tensor], np.ndarray]:
        """Min-max normalised float32 CAMs of ``images`` ((3, h, w) uint8, all at one scale), on
        the model's device, each on the stride grid of the image as it was placed (its own
        size, or squeezed), and the (N, 2) frames ``(fx, fy)`` of :meth:`from_tensors_native`."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        placed: list[torch.Tensor] = []
        frames = np.ones((len(images), 2))
        for i, image in enumerate(images):
            height, width = int(image.shape[1]), int(image.shape[2])
            padded, (h, w) = plan_shape(height, width, self.stride, self.shapes, self.bucket_aspects)
            if (h, w) != (height, width):
                image = TF.resize(image, [h, w], antialias=True)
                frames[i] = (w / width, h / height)
            placed.append(image)
            groups[padded].append(i)
        out: list[torch.Tensor] = [None] * len(images)  # type: ignore[list-item]
        for shape, members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                cams = self._forward([placed[i] for i in chunk], labels[chunk], shape)
                for i, cam in zip(chunk, cams):
                    rows, columns = (-(-int(side) // self.stride) for side in placed[i].shape[1:])
                    out[i] = cam[:rows, :columns]
        return out, frames

    @torch.inference_mode()
    def _forward(self, images: list[torch.Tensor], labels: np.ndarray, padded: tuple[int, int]) -> torch.Tensor:
        """(n, H, W) CAMs of ``images`` padded to ``padded``, each min-max normalised over
        the cells its own pixels reach (the rest zeros)."""
        n = len(images)
        rows = n
        if self.compile_mode != "off" and self.shapes == "buckets":
            rows = _round_up(n, STATIC_BATCH_MULTIPLE)
        batch = torch.zeros((rows, 3, *padded), dtype=torch.float32, device=self.device)
        valid = torch.zeros((n, 2), dtype=torch.int64)
        for k, image in enumerate(images):
            if image.device.type == "cpu" and self._on_cuda:
                image = image.pin_memory().to(self.device, non_blocking=True)
            batch[k, :, : image.shape[1], : image.shape[2]] = (image.float() - self._mean[0]) / self._std[0]
            valid[k, 0], valid[k, 1] = -(-image.shape[1] // self.stride), -(-image.shape[2] // self.stride)
        if self.flip:
            batch = torch.cat([batch, batch.flip(-1)])
        batch = batch.contiguous(memory_format=torch.channels_last)
        features = self._run_features(batch).float()
        if self.flip:
            features = (features[:n] + features[rows : rows + n].flip(-1)) * 0.5
        else:
            features = features[:n]
        index = torch.from_numpy(labels).to(self.device)
        cam = torch.einsum("nchw,nc->nhw", features, self._weight[index]) + self._bias[index].view(n, 1, 1)
        valid = valid.to(self.device)
        inside = ((torch.arange(cam.shape[1], device=self.device).view(1, -1, 1) < valid[:, 0].view(n, 1, 1))
                  & (torch.arange(cam.shape[2], device=self.device).view(1, 1, -1) < valid[:, 1].view(n, 1, 1)))
        low = torch.where(inside, cam, torch.inf).amin(dim=(1, 2), keepdim=True)
        span = torch.where(inside, cam, -torch.inf).amax(dim=(1, 2), keepdim=True) - low
        normalised = (cam - low) / span.clamp_min(torch.finfo(cam.dtype).tiny)
        return torch.where(inside & (span > 0), normalised, torch.zeros_like(cam))

    def _run_features(self, batch: torch.Tensor) -> torch.Tensor:
        """The feature map of ``batch``; a compiled network that fails to compile is dropped for
        the eager one, once, with the reason in :attr:`compile_note`."""
        try:
            if self._on_cuda:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return self._features(batch)
            return self._features(batch)
        except Exception as exc:  # noqa: BLE001 - only compiler failures are caught; the rest re-raised
            if self._features is self._eager or not _is_compiler_failure(exc):
                raise
            self.compile_note = (f"compile={self.compile_mode} failed ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); running eagerly")
            self.compile_mode, self._features = "off", self._eager
            warnings.warn(self.compile_note, RuntimeWarning, stacklevel=2)  # reaches the model actor's log
            return self._run_features(batch)


def _compile_mode(mode: str, on_cuda: bool) -> tuple[str, str]:
    """The compile mode that can run here, and why it differs from ``mode`` (else "")."""
    if mode == "reduce-overhead" and not on_cuda:
        return "off", "compile=reduce-overhead (CUDA graphs) needs CUDA; running eagerly"
    if mode == "tensorrt":
        try:
            import torch_tensorrt  # noqa: F401 - registers the backend
        except Exception as exc:  # noqa: BLE001 - any failure to load means: not available
            return "off", f"compile=tensorrt needs torch-tensorrt ({type(exc).__name__}: {exc}); running eagerly"
        if not on_cuda:
            return "off", "compile=tensorrt needs CUDA; running eagerly"
    return mode, ""


def _compiled(function, mode: str):
    # Buckets give each scale 2 shapes per bucket aspect, each met at up to batch_size / 32 batch
    # sizes; past dynamo's recompile limit (8) new shapes would run eagerly without a word.
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    if mode == "tensorrt":
        return torch.compile(function, backend="torch_tensorrt", dynamic=False)
    return torch.compile(function, mode=None if mode == "default" else mode, dynamic=False)


def _is_compiler_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from torch.compile's machinery (dynamo, inductor, a backend)."""
    module = type(exc).__module__
    return module.startswith(("torch._dynamo", "torch._inductor", "torch_tensorrt")) or isinstance(exc, ImportError)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _onto_exact_grid(cam: np.ndarray, size: tuple[int, int], frame: tuple[float, float], stride: int) -> np.ndarray:
    """A squeezed image's map (cells of ``stride`` squeezed pixels) sampled bilinearly at the
    centres of the exact path's cells for the image of ``size`` (h, w) pixels at the largest
    scale (cells of ``stride`` pixels, the last reaching into the padding); ``frame`` is
    (fy, fx), the squeeze along rows and columns."""
    out = np.asarray(cam, np.float32)
    for axis, (length, share) in enumerate(zip(size, frame)):
        centres = (np.arange(-(-length // stride)) + 0.5) * share - 0.5  # in the squeezed map's cells
        line = np.arange(out.shape[axis])
        out = np.apply_along_axis(lambda values, at=centres, cells=line: np.interp(at, cells, values), axis, out)
    return out.astype(np.float32)


def _nearest(cam: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``cam`` sampled onto ``shape`` as ``F.interpolate(mode="nearest")`` does."""
    if tuple(cam.shape) == shape:
        return cam
    return F.interpolate(cam[None, None], size=shape, mode="nearest")[0, 0]
