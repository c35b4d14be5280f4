"""Pseudo boxes from class activation maps (DAP Step 2, second half).

A CAM (values in [0, 1], on the stride grid of the largest CAM scale) is thresholded at
several values; each threshold's large 4-connected components become boxes by matching
the first and second moments of a rectangle (Section 3.1 of the paper); all boxes are
merged by NMS.

Box convention (the whole project): xyxy, absolute pixels of the original image, float32,
shape (N, 4); no boxes is shape (0, 4).

The implementation is vectorised over components, thresholds and maps: every
(map, threshold) foreground mask is stacked into one tall image separated by empty rows,
labelled by a single OpenCV call; the moments of all kept components come from the row
and column marginals of their weights; NMS runs for all maps at once.
:mod:`dap_ray.localisation.boxes_reference` holds the straightforward per-component version that this
one is tested against.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import cv2
import numpy as np

__all__ = ["BoxConfig", "PRESETS", "cam_to_boxes", "cam_to_boxes_batch", "empty_boxes"]

# Knobs that differ between the two presets. "official" is what the authors' released
# script computes (the boxes behind the paper's numbers); "paper" is Eqs. (1)-(6) as printed.
PRESETS: dict[str, dict[str, object]] = {
    "official": dict(
        moment_bias=0.22,
        size_measure="rectangle",
        moment_region="rectangle",
        max_components=4,
        ties_later_first=True,
    ),
    "paper": dict(
        moment_bias=0.0,
        size_measure="cells",
        moment_region="component",
        max_components=None,
        ties_later_first=False,
    ),
}

# Maps processed together are padded to the largest shape among them, so a chunk holds maps
# of similar shapes: at most _CHUNK_MAPS maps (bounds the per-component weight arrays'
# memory) and _CHUNK_CELLS padded cells, with padding adding at most _CHUNK_PADDING - 1 of
# the chunk's own cells. One panorama in a batch then costs its own cells, not every map's.
_CHUNK_MAPS = 1024
_CHUNK_CELLS = _CHUNK_MAPS * 18 * 24
_CHUNK_PADDING = 1.25


@dataclass(frozen=True)
class BoxConfig:
    """How a CAM becomes boxes. The defaults are the ``official`` preset.

    Attributes:
        scale: short side, in pixels, of the CAM scale whose stride grid the map is on
            (the largest scale, 576 in the paper). One cell spans
            ``stride * min(W, H) / scale`` original-image pixels.
        stride: input pixels per CAM cell at ``scale``.
        thresholds: cells with CAM strictly above a threshold are foreground; each
            threshold contributes its own components. Stored sorted ascending.
        nms_iou: a box whose IoU with a kept, higher-scored box exceeds this is dropped.
        moment_bias: a foreground cell's moment weight is its CAM value plus this.
        size_measure: ``"rectangle"`` (area of the component's bounding rectangle, in
            cells) or ``"cells"`` (its cell count). Components are ranked by it and kept
            while it is at least half the largest's.
        moment_region: ``"rectangle"``: the moments use every foreground cell inside the
            component's bounding rectangle (other components' cells there count too);
            ``"component"``: only the component's own cells.
        max_components: at most this many components per threshold; ``None``: no cap.
        ties_later_first: among components of equal size, the one found later by
            raster-order labelling ranks first (else earlier first).
    """

    scale: int = 576
    stride: int = 32
    thresholds: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5)
    nms_iou: float = 0.8
    moment_bias: float = 0.22
    size_measure: Literal["rectangle", "cells"] = "rectangle"
    moment_region: Literal["rectangle", "component"] = "rectangle"
    max_components: int | None = 4
    ties_later_first: bool = True

    def __post_init__(self) -> None:
        for name in ("scale", "stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        try:
            thresholds = tuple(sorted(float(t) for t in self.thresholds))
        except (TypeError, ValueError):
            raise ValueError(f"thresholds must be numbers, got {self.thresholds!r}") from None
        if not thresholds:
            raise ValueError("thresholds must not be empty")
        if not all(0.0 <= t < 1.0 for t in thresholds):
            raise ValueError(f"thresholds must lie in [0, 1), got {thresholds}")
        object.__setattr__(self, "thresholds", thresholds)
        if not 0.0 <= float(self.nms_iou) <= 1.0:
            raise ValueError(f"nms_iou must lie in [0, 1], got {self.nms_iou!r}")
        if not (math.isfinite(self.moment_bias) and self.moment_bias >= 0):
            raise ValueError(f"moment_bias must be a finite number >= 0, got {self.moment_bias!r}")
        if self.size_measure not in ("rectangle", "cells"):
            raise ValueError(f"size_measure must be 'rectangle' or 'cells', got {self.size_measure!r}")
        if self.moment_region not in ("rectangle", "component"):
            raise ValueError(
                f"moment_region must be 'rectangle' or 'component', got {self.moment_region!r}"
            )
        if self.max_components is not None and (
            isinstance(self.max_components, bool) or int(self.max_components) != self.max_components
            or self.max_components < 1
        ):
            raise ValueError(f"max_components must be a positive integer or None, got {self.max_components!r}")

    @classmethod
    def from_preset(cls, preset: str = "official", **overrides: object) -> "BoxConfig":
        """The preset's knobs, with ``overrides`` (any field of this class) on top."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: expected one of {sorted(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown box option(s) {unknown}: expected some of {sorted(fields)}")
        return cls(**{**PRESETS[preset], **overrides})


def empty_boxes() -> tuple[np.ndarray, np.ndarray]:
    """No boxes: float32 arrays of shape (0, 4) and (0,)."""
    return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)


def cam_to_boxes(
    cam: np.ndarray,
    image_size: tuple[int, int],
    *,
    scale: int = 576,
    stride: int = 32,
    thresholds: Sequence[float] = (0.2, 0.3, 0.4, 0.5),
    nms_iou: float = 0.8,
    preset: str = "official",
    **knobs: object,
) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo boxes for one CAM.

    Args:
        cam: float (h, w) map, values in [0, 1], on the stride grid of the ``scale``
            input (as :class:`dap_ray.localisation.cam.CamExtractor` returns it).
        image_size: ``(W, H)`` of the original image, in pixels.
        scale, stride, thresholds, nms_iou: see :class:`BoxConfig`.
        preset: ``"official"`` or ``"paper"`` (see :data:`PRESETS`).
        **knobs: any other :class:`BoxConfig` field, overriding the preset.

    Returns:
        ``(boxes, scores)``: float32 (N, 4) xyxy in original-image pixels, clipped to
        ``[0, W-1] x [0, H-1]``, and float32 (N,) scores (a box's area over the area of
        the first box produced), highest score first, as NMS keeps them. A box that
        clipping leaves with no width or height (a component wholly in the stride
        padding past the image's edge) is dropped before scoring.

    Raises:
        ValueError: the map is not 2-D, is empty, holds NaN or Inf; the image size is not
            two positive numbers; or a knob is unknown or out of range.
    """
    config = BoxConfig.from_preset(
        preset, scale=scale, stride=stride, thresholds=tuple(thresholds), nms_iou=nms_iou, **knobs
    )
    return _boxes_for_maps([_as_map(cam, "cam")], _as_sizes([image_size], "image_size"), config)[0]


def cam_to_boxes_batch(
    cams: Sequence[np.ndarray],
    image_sizes: Sequence[tuple[int, int]],
    config: BoxConfig = BoxConfig(),
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`cam_to_boxes` for many maps (of any shapes) at once; same results, much faster.

    Args:
        cams: B float (h_i, w_i) maps.
        image_sizes: B ``(W, H)`` original image sizes.
        config: how to make boxes (see :class:`BoxConfig`).

    Returns:
        B ``(boxes, scores)`` pairs as :func:`cam_to_boxes` returns them.
    """
    if len(cams) != len(image_sizes):
        raise ValueError(f"got {len(cams)} cams but {len(image_sizes)} image sizes")
    maps = [_as_map(cam, f"cams[{i}]") for i, cam in enumerate(cams)]
    sizes = _as_sizes(image_sizes, "image_sizes")
    out: list[tuple[np.ndarray, np.ndarray]] = [empty_boxes()] * len(maps)
    for chunk in _similar_shape_chunks([m.shape for m in maps]):
        for i, result in zip(chunk, _boxes_for_maps([maps[i] for i in chunk], sizes[chunk], config)):
            out[i] = result
    return out


def _similar_shape_chunks(shapes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Indices of maps to process together, grouped by shape (see ``_CHUNK_PADDING``)."""
    if not shapes:
        return []
    heights, widths = np.asarray(shapes, np.int64).T
    chunks: list[list[int]] = []
    current: list[int] = []
    hmax = wmax = cells = 0
    for i in np.lexsort((widths, heights)).tolist():
        h, w = int(heights[i]), int(widths[i])
        grown_h, grown_w = max(hmax, h), max(wmax, w)
        padded = (len(current) + 1) * grown_h * grown_w
        if current and (len(current) >= _CHUNK_MAPS or padded > _CHUNK_CELLS
                        or padded > _CHUNK_PADDING * (cells + h * w)):
            chunks.append(current)
            current, cells, grown_h, grown_w = [], 0, h, w
        current.append(i)
        cells += h * w
        hmax, wmax = grown_h, grown_w
    chunks.append(current)
    return chunks


def _as_map(cam: object, name: str) -> np.ndarray:
    try:
        array = np.asarray(cam, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a numeric 2-D array, got {type(cam).__name__}") from None
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D map (h, w), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return array


def _as_sizes(image_sizes: object, name: str) -> np.ndarray:
    try:
        sizes = np.asarray(image_sizes, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (W, H) pairs, got {image_sizes!r}") from None
    if sizes.shape == (0,):
        sizes = sizes.reshape(0, 2)
    if sizes.ndim != 2 or sizes.shape[1] != 2:
        raise ValueError(f"{name} must be (W, H) pairs, got {image_sizes!r}")
    bad = ~(np.isfinite(sizes).all(axis=1) & (sizes > 0).all(axis=1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must be positive (W, H), got {tuple(sizes[i].tolist())} at index {i}")
    return sizes


def _boxes_for_maps(
    maps: list[np.ndarray], sizes: np.ndarray, config: BoxConfig
) -> list[tuple[np.ndarray, np.ndarray]]:
    num_maps = len(maps)
    if num_maps == 0:
        return []
    thresholds = np.asarray(config.thresholds, np.float32)
    num_thr = len(thresholds)

    # All maps padded to one (hmax, wmax) frame; padding is never foreground.
    shapes = np.array([m.shape for m in maps])
    hmax, wmax = (int(v) for v in shapes.max(axis=0))
    if (shapes == (hmax, wmax)).all():
        stack = np.stack(maps)
        fg = stack[:, None] > thresholds[None, :, None, None]
    else:
        stack = np.zeros((num_maps, hmax, wmax), np.float32)
        inside = np.zeros((num_maps, hmax, wmax), bool)
        for i, m in enumerate(maps):
            stack[i, : m.shape[0], : m.shape[1]] = m
            inside[i, : m.shape[0], : m.shape[1]] = True
        fg = (stack[:, None] > thresholds[None, :, None, None]) & inside[:, None]

    # One block per (map, threshold), each followed by an empty row so that no
    # component crosses blocks; one labelling call for the whole chunk.
    block_h = hmax + 1
    tall = np.zeros((num_maps * num_thr, block_h, wmax), np.uint8)
    tall[:, :hmax] = fg.reshape(num_maps * num_thr, hmax, wmax)
    num_labels, labels, stats, _ = cv2.connectedComponentsWithStats(
        tall.reshape(-1, wmax), connectivity=4, ltype=cv2.CV_32S
    )
    if num_labels <= 1:
        return [empty_boxes() for _ in range(num_maps)]
    left, top, width, height, cells = (stats[1:, j].astype(np.int64) for j in range(5))
    block = top // block_h
    top = top - block * block_h

    # Rank components within their block; keep while size >= half the largest's.
    size = width * height if config.size_measure == "rectangle" else cells
    label_order = np.arange(len(size))
    tie = -label_order if config.ties_later_first else label_order
    order = np.lexsort((tie, -size, block))
    block_sorted, size_sorted = block[order], size[order]
    position = np.arange(len(order))
    starts = np.r_[True, block_sorted[1:] != block_sorted[:-1]]
    group_start = np.maximum.accumulate(np.where(starts, position, 0))
    keep = 2 * size_sorted >= size_sorted[group_start]
    if config.max_components is not None:
        keep &= (position - group_start) < config.max_components
    comp = order[keep]
    comp_block = block[comp]
    r0, c0 = top[comp], left[comp]
    r1, c1 = r0 + height[comp], c0 + width[comp]

    # Weighted moments on the cell-index grid of each kept component's map, from the
    # row and column marginals of its weights (only kept components are touched).
    rows = np.arange(hmax, dtype=np.float64)
    cols = np.arange(wmax, dtype=np.float64)
    if config.moment_region == "rectangle":
        in_rows = (rows >= r0[:, None]) & (rows < r1[:, None])
        in_cols = (cols >= c0[:, None]) & (cols < c1[:, None])
        region = fg.reshape(-1, hmax, wmax)[comp_block] & in_rows[:, :, None] & in_cols[:, None, :]
    else:
        block_labels = labels.reshape(-1, block_h, wmax)[comp_block, :hmax]
        region = block_labels == (comp + 1)[:, None, None]
    weight = (stack[comp_block // num_thr] + np.float32(config.moment_bias)) * region
    # Marginals of at most hmax or wmax float32 terms stay exact to ~1e-7; the moments
    # themselves, with their cancellation in E[x^2] - E[x]^2, are taken in float64.
    col_sums = weight.sum(axis=1, dtype=np.float64)
    row_sums = weight.sum(axis=2, dtype=np.float64)
    s0, sx, sxx = col_sums.sum(axis=1), col_sums @ cols, col_sums @ (cols * cols)
    sy, syy = row_sums @ rows, row_sums @ (rows * rows)
    cx, cy = sx / s0, sy / s0
    box_w = np.maximum(1.0, np.sqrt(12.0 * np.maximum(sxx / s0 - cx * cx, 0.0)))
    box_h = np.maximum(1.0, np.sqrt(12.0 * np.maximum(syy / s0 - cy * cy, 0.0)))
    x1 = cx + 0.5 - box_w / 2
    y1 = cy + 0.5 - box_h / 2

    # Cells to original-image pixels, then clip.
    map_index = comp_block // num_thr
    img_w, img_h = sizes[map_index, 0], sizes[map_index, 1]
    cell = config.stride * np.minimum(img_w, img_h) / config.scale
    boxes = np.stack([x1 * cell, y1 * cell, (x1 + box_w) * cell, (y1 + box_h) * cell], axis=1)
    np.clip(boxes[:, 0::2], 0.0, (img_w - 1)[:, None], out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0.0, (img_h - 1)[:, None], out=boxes[:, 1::2])

    # A box clipped to nothing lay wholly in the stride padding past the image's edge:
    # it cannot be trained on (detectors reject it) nor normalise scores, so drop it.
    real = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if not real.all():
        boxes, map_index = boxes[real], map_index[real]

    # Score: area over the area of the map's first box (lowest threshold, top rank).
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    counts = np.bincount(map_index, minlength=num_maps)
    if len(area) == 0:
        return [empty_boxes() for _ in range(num_maps)]
    first = np.minimum(np.cumsum(counts) - counts, len(area) - 1)
    scores = area / area[first][map_index]
    return _nms_by_map(boxes, scores, map_index, counts, config.nms_iou)


def _nms_by_map(
    boxes: np.ndarray, scores: np.ndarray, map_index: np.ndarray, counts: np.ndarray, iou_max: float
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Greedy NMS inside each map, all maps at once. ``boxes`` are grouped by map."""
    num_maps = len(counts)
    width = int(counts.max())
    # Within each map: highest score first; ties keep production order (stable).
    order = np.lexsort((-scores, map_index))
    boxes, scores, map_index = boxes[order], scores[order], map_index[order]
    slot = np.arange(len(order)) - (np.cumsum(counts) - counts)[map_index]
    padded = np.zeros((num_maps, width, 4))
    padded[map_index, slot] = boxes
    valid = np.zeros((num_maps, width), bool)
    valid[map_index, slot] = True

    x1, y1, x2, y2 = (padded[..., j] for j in range(4))
    area = (x2 - x1) * (y2 - y1)
    inter_w = np.clip(np.minimum(x2[:, :, None], x2[:, None]) - np.maximum(x1[:, :, None], x1[:, None]), 0, None)
    inter_h = np.clip(np.minimum(y2[:, :, None], y2[:, None]) - np.maximum(y1[:, :, None], y1[:, None]), 0, None)
    inter = inter_w * inter_h
    union = area[:, :, None] + area[:, None] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    overlaps = iou > iou_max

    kept = np.zeros((num_maps, width), bool)
    suppressed = ~valid
    for i in range(width):
        alive = ~suppressed[:, i]
        kept[:, i] = alive
        suppressed[:, i + 1 :] |= alive[:, None] & overlaps[:, i, i + 1 :]

    kept_flat = kept[map_index, slot]
    boxes32, scores32 = boxes[kept_flat].astype(np.float32), scores[kept_flat].astype(np.float32)
    bounds = np.cumsum(np.bincount(map_index[kept_flat], minlength=num_maps))[:-1]
    return list(zip(np.split(boxes32, bounds), np.split(scores32, bounds)))
