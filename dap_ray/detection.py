"""Step 3's plain-torch parts: detectors on a classifier's trunk, and pseudo boxes as training data.

No Ray here (:mod:`dap_ray.pretrain` runs these on Ray Train workers).

Detectors are torchvision's Faster R-CNN and RetinaNet with a ResNet-FPN backbone, built
exactly as ``fasterrcnn_resnet50_fpn`` / ``retinanet_resnet50_fpn`` build theirs (frozen
BatchNorm, the stem and ``layer1`` frozen, FPN on ``layer1..4`` or ``layer2..4`` plus P6/P7),
but with the trunk taken from a Step 1 classifier (:func:`dap_ray.models.load_classifier`)
and everything else at random. Class ids are shifted by one: label k is detector class
k + 1, 0 is background.

Training data is the mining run's ``boxes/*.parquet`` (xyxy pixels of the original image)
held in flat arrays (:class:`PseudoBoxes`: no Python object per box, so millions of
images fit in a worker), read by id through :class:`dap_ray.sources.ImageReader`.
:class:`AspectBatchSampler` draws every random choice (order, short side per batch, flips)
from the seed and the batch number alone, so a resumed run continues the same stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from torch import nn

__all__ = [
    "DETECTORS", "AspectBatchSampler", "PseudoBoxDataset", "PseudoBoxes",
    "build_detector", "collate_detection", "detector_state_dict", "load_pseudo_boxes", "resize_with_boxes",
]

DETECTORS = ("faster_rcnn_fpn", "retinanet_fpn")
# torchvision's create_aspect_ratio_groups(k=3): width/height bins 2**linspace(-1, 1, 7).
_ASPECT_EDGES = 2.0 ** np.linspace(-1, 1, 7)


def build_detector(
    detector: str,
    backbone: str,
    num_classes: int,
    *,
    backbone_weights: str | Path | None = None,
    trainable_layers: int = 3,
    min_size: tuple[int, ...] = (640,),
    max_size: int = 1333,
    roi_batch_size_per_image: int = 512,
) -> nn.Module:
    """A torchvision detector whose ResNet trunk comes from a Step 1 classifier.

    Args:
        detector: ``"faster_rcnn_fpn"`` or ``"retinanet_fpn"``.
        backbone: a torchvision ResNet name (``resnet50``...) or ``package.module:factory``
            returning a torchvision ``ResNet``, as :func:`dap_ray.models.load_classifier` takes.
        num_classes: object classes, without background (the model gets ``num_classes + 1``).
        backbone_weights: the classifier's state dict; None leaves the trunk at random.
        trainable_layers: ResNet stages trained, counted from ``layer4`` (3: the stem and
            ``layer1`` frozen, as in torchvision and detectron2's defaults).
        min_size, max_size: the model's own resize (test size: ``min_size[-1]``).
        roi_batch_size_per_image: Faster R-CNN's sampled proposals per image (512 as in
            the paper's detectron2 setting; fewer trains faster on CPU).

    Returns:
        The detector in train mode, on the CPU.
    """
    from torchvision.models.detection import FasterRCNN, RetinaNet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
    from torchvision.models.resnet import ResNet

    from dap_ray.models import load_classifier

    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}: expected one of {DETECTORS}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must lie in [0, 5], got {trainable_layers}")
    trunk = load_classifier(backbone, backbone_weights)
    if not isinstance(trunk, ResNet):
        raise ValueError(f"backbone {backbone!r} is a {type(trunk).__name__}; detectors need a torchvision ResNet")
    _freeze_batch_norm(trunk)
    trained = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]  # frozen BatchNorm has no parameters
    for name, parameter in trunk.named_parameters():
        parameter.requires_grad_(any(name.startswith(layer) for layer in trained))
    stage2 = trunk.inplanes // 8  # torchvision's rule: layer4's channels / 8 are layer1's
    returned = [1, 2, 3, 4] if detector == "faster_rcnn_fpn" else [2, 3, 4]
    fpn = BackboneWithFPN(
        trunk,
        return_layers={f"layer{k}": str(i) for i, k in enumerate(returned)},
        in_channels_list=[stage2 * 2 ** (k - 1) for k in returned],
        out_channels=256,
        extra_blocks=LastLevelMaxPool() if detector == "faster_rcnn_fpn" else LastLevelP6P7(256, 256),
    )
    if detector == "faster_rcnn_fpn":
        model = FasterRCNN(fpn, num_classes=num_classes + 1, min_size=min_size, max_size=max_size,
                           box_batch_size_per_image=roi_batch_size_per_image)
    else:
        model = RetinaNet(fpn, num_classes=num_classes + 1, min_size=min_size, max_size=max_size)
    return model.train()


def _freeze_batch_norm(module: nn.Module) -> None:
    """BatchNorm2d to torchvision's FrozenBatchNorm2d in place, statistics kept."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _freeze_batch_norm(child)


def detector_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain state dict that loads with ``strict=True`` into the matching torchvision model.

    Frozen BatchNorm has no ``num_batches_tracked``; it is added (as 0) for every frozen
    BatchNorm so that the torchvision builders without pre-trained weights (which use
    ``BatchNorm2d``, e.g. ``fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
    num_classes=K + 1)``) accept the file strictly; ``FrozenBatchNorm2d`` ignores the key.
    """
    from torchvision.ops.misc import FrozenBatchNorm2d

    from dap_ray.models import unwrap_ddp

    model = unwrap_ddp(model)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, FrozenBatchNorm2d):
            state[f"{name}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return state


@dataclass(frozen=True)
class PseudoBoxes:
    """A mining run's pseudo boxes as flat arrays.

    ``image_ids``: n strings; ``labels``: (n,) int64 classifier labels (0-based);
    ``sizes``: (n, 2) int32 original (width, height); ``offsets``: (n + 1,) int64, image
    i's boxes are ``boxes[offsets[i]:offsets[i + 1]]``, xyxy float32 pixels of the
    original image, best score first. Images without boxes are not held.
    """

    image_ids: list[str]
    labels: np.ndarray
    sizes: np.ndarray
    offsets: np.ndarray
    boxes: np.ndarray
    skipped_without_boxes: int = 0
    skipped_without_label: int = 0

    def __len__(self) -> int:
        return len(self.image_ids)

    def boxes_of(self, index: int) -> np.ndarray:
        return self.boxes[self.offsets[index] : self.offsets[index + 1]]


def load_pseudo_boxes(boxes_dir: str | Path, max_boxes_per_image: int | None = None) -> PseudoBoxes:
    """Read ``boxes_dir/*.parquet`` (as :func:`dap_ray.mining.write_results` writes it).

    Keeps at most ``max_boxes_per_image`` boxes per image (the best scored), sorts images by id.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = sorted(Path(boxes_dir).glob("*.parquet"))
    if not files:
        raise ValueError(f"no Parquet files in {boxes_dir}: --boxes must be the boxes/ folder of a mining run")
    table = pq.read_table(files, columns=["image_id", "label", "width", "height", "boxes", "scores"])
    table = table.take(pc.sort_indices(table, [("image_id", "ascending")]))
    labels = table.column("label").to_numpy().astype(np.int64)
    counts = pc.list_value_length(table.column("boxes")).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = np.asarray(pc.list_flatten(pc.list_flatten(table.column("boxes"))).to_numpy(zero_copy_only=False),
                      np.float32).reshape(-1, 4)
    scores = np.asarray(pc.list_flatten(table.column("scores")).to_numpy(zero_copy_only=False), np.float32)
    starts = np.concatenate([[0], np.cumsum(counts)])
    keep_counts = counts if max_boxes_per_image is None else np.minimum(counts, max_boxes_per_image)
    has_label = labels >= 0
    kept = (keep_counts > 0) & has_label
    box_rows = []
    for i in np.flatnonzero(kept):
        order = np.argsort(-scores[starts[i] : starts[i + 1]], kind="stable")[: keep_counts[i]]
        box_rows.append(starts[i] + order)
    chosen = np.concatenate(box_rows) if box_rows else np.zeros(0, np.int64)
    ids = table.column("image_id").to_pylist()
    return PseudoBoxes(
        image_ids=[ids[i] for i in np.flatnonzero(kept)],
        labels=labels[kept],
        sizes=np.stack([table.column("width").to_numpy(), table.column("height").to_numpy()], 1).astype(np.int32)[kept],
        offsets=np.concatenate([[0], np.cumsum(keep_counts[kept])]).astype(np.int64),
        boxes=flat[chosen] if len(chosen) else np.zeros((0, 4), np.float32),
        skipped_without_boxes=int(((keep_counts == 0) & has_label).sum()),
        skipped_without_label=int((~has_label).sum()),
    )


def resize_with_boxes(
    image: np.ndarray, boxes: np.ndarray, short_side: int, max_size: int, flip: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Resize (H, W, 3) uint8 so its short side is ``short_side`` (long side at most
    ``max_size``, as torchvision's detection transform does), mirror if ``flip``, and map
    (N, 4) xyxy float32 ``boxes`` along. Boxes left under one pixel wide or high are dropped."""
    height, width = image.shape[:2]
    scale = min(short_side / min(height, width), max_size / max(height, width))
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    out = boxes.astype(np.float32) * np.array([new_w / width, new_h / height] * 2, np.float32)
    out = np.clip(out, 0, [new_w, new_h, new_w, new_h]).astype(np.float32)
    if flip:
        resized = resized[:, ::-1]
        out = np.stack([new_w - out[:, 2], out[:, 1], new_w - out[:, 0], out[:, 3]], 1).astype(np.float32)
    keep = ((out[:, 2] - out[:, 0]) >= 1) & ((out[:, 3] - out[:, 1]) >= 1)
    return np.ascontiguousarray(resized), out[keep].reshape(-1, 4)


class PseudoBoxDataset(torch.utils.data.Dataset):
    """Training samples keyed by ``(index, short_side, flip)`` (:class:`AspectBatchSampler` keys).

    Returns ``{"image": (3, h, w) uint8 tensor, "boxes": (N, 4) float32 xyxy pixels of the
    resized image, "labels": (N,) int64 = label + 1, "image_id": str}``. An image that
    cannot be read or no longer has the size it was mined at is named in a warning and
    replaced by the next image.
    """

    def __init__(self, pseudo: PseudoBoxes, reader, max_size: int = 1333):
        self.pseudo, self.reader, self.max_size = pseudo, reader, max_size

    def __len__(self) -> int:
        return len(self.pseudo)

    def __getitem__(self, key: tuple[int, int, bool]) -> dict:
        index, short_side, flip = key
        for attempt in range(self._ATTEMPTS):
            sample = self._load((index + attempt) % len(self.pseudo), short_side, flip)
            if sample is not None:
                return sample
        raise RuntimeError(f"{self._ATTEMPTS} images in a row from {self.pseudo.image_ids[index]!r} on could not be read")

    # An unreadable image is replaced by the next one, so that no rank's batch ever comes
    # out empty (under DDP every rank must take every step).
    _ATTEMPTS = 16

    def _load(self, index: int, short_side: int, flip: bool) -> dict | None:
        from dap_ray.data import BadImageError, decode_image

        image_id = self.pseudo.image_ids[index]
        try:
            image = decode_image(self.reader.read(image_id))
        except (OSError, KeyError, BadImageError) as exc:
            print(f"skipping {image_id}: {exc}", flush=True)
            return None
        width, height = (int(v) for v in self.pseudo.sizes[index])
        if image.shape[:2] != (height, width):
            print(f"skipping {image_id}: it is {image.shape[1]}x{image.shape[0]} but was mined at {width}x{height}",
                  flush=True)
            return None
        resized, boxes = resize_with_boxes(image, self.pseudo.boxes_of(index), short_side, self.max_size, flip)
        label = int(self.pseudo.labels[index]) + 1
        return {"image": torch.from_numpy(resized).permute(2, 0, 1), "boxes": torch.from_numpy(boxes),
                "labels": torch.full((len(boxes),), label, dtype=torch.int64), "image_id": image_id}


def collate_detection(samples: list[dict]) -> list[dict]:
    """Samples stay a list: torchvision detectors take lists of differently sized images."""
    return list(samples)


class AspectBatchSampler:
    """An endless stream of this rank's batches of ``(index, short_side, flip)`` keys.

    Each epoch permutes all images with ``seed + epoch``; rank r takes every world-th
    image, and images go into one of eight aspect-ratio groups (torchvision's
    ``create_aspect_ratio_groups(k=3)`` bins), a group's batch leaving when full, so a
    batch's images have similar shapes. Each batch draws one short side from
    ``min_sizes`` (one size per batch: images of different sizes in one batch would be
    padded to the largest) and a flip per image. ``start`` skips that many batches: the
    stream from batch ``start`` is the same as an uninterrupted one's.
    """

    def __init__(self, sizes: np.ndarray, batch_size: int, min_sizes: tuple[int, ...], *, rank: int = 0,
                 world: int = 1, seed: int = 0, start: int = 0, flip: bool = True):
        sizes = np.asarray(sizes)
        if len(sizes) < world:
            raise ValueError(f"{len(sizes)} training images cannot feed {world} workers")
        if batch_size < 1 or not min_sizes:
            raise ValueError("batch_size must be at least 1 and min_sizes not empty")
        self.groups = np.digitize(sizes[:, 0] / np.maximum(sizes[:, 1], 1), _ASPECT_EDGES)
        self.batch_size, self.min_sizes = batch_size, tuple(min_sizes)
        self.rank, self.world, self.seed, self.start, self.flip = rank, world, seed, start, flip

    def __iter__(self) -> Iterator[list[tuple[int, int, bool]]]:
        produced = 0
        buffers: dict[int, list[int]] = {}
        epoch = 0
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))[self.rank :: self.world]
            for index in order:
                group = buffers.setdefault(int(self.groups[index]), [])
                group.append(int(index))
                if len(group) < self.batch_size:
                    continue
                if produced >= self.start:
                    rng = np.random.default_rng([self.seed, self.rank, produced])
                    size = int(self.min_sizes[rng.integers(len(self.min_sizes))])
                    flips = rng.random(len(group)) < 0.5 if self.flip else np.zeros(len(group), bool)
                    yield [(i, size, bool(f)) for i, f in zip(group, flips)]
                produced += 1
                group.clear()
            epoch += 1
