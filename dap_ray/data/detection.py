"""Detection training batches as plain numpy/torch: resizing images with their boxes, and
aspect-grouped, multi-scale batches whose random choices a resumed run repeats. No Ray.

:class:`AspectBatchSampler` draws every random choice (order, short side per batch, flips)
from the seed and the batch number alone, so a resumed run continues the same stream.
"""

from __future__ import annotations

from typing import Iterator

import cv2
import numpy as np

__all__ = ["AspectBatchSampler", "collate_detection", "resize_with_boxes"]

# torchvision's create_aspect_ratio_groups(k=3): width/height bins 2**linspace(-1, 1, 7).
_ASPECT_EDGES = 2.0 ** np.linspace(-1, 1, 7)


def resize_with_boxes(
    image: np.ndarray, boxes: np.ndarray, short_side: int, max_size: int, flip: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resize (H, W, 3) uint8 so its short side is ``short_side`` (long side at most
    ``max_size``, as torchvision's detection transform does), mirror if ``flip``, and map
    (N, 4) xyxy float32 ``boxes`` along.

    Returns the image, the (M, 4) float32 boxes kept and ``keep``, (N,) bool: boxes left
    under one pixel wide or high are dropped, and ``labels[keep]`` follows them."""
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
    return np.ascontiguousarray(resized), out[keep].reshape(-1, 4), keep


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
