"""Pseudo boxes from class activation maps (DAP Step 2, second half).

A CAM (values in [0, 1], on the stride grid of the largest CAM scale) is thresholded at
several values; each threshold's large 4-connected components become boxes by matching
the first and second moments of a rectangle (Section 3.1 of the paper); all boxes are
merged by NMS.

Box convention (the whole project): xyxy, absolute pixels of the original image, float32,
shape (N, 4); no boxes is shape (0, 4).

The implementation is vectorised over components, thresholds and maps: every map is turned
long side down, and every (map, threshold) foreground mask, cropped to its rows holding
foreground, is stacked into one tall image separated by empty rows, labelled by a single
OpenCV call; the moments of all kept components come from the row sums of their weights;
NMS runs for all maps at once. The work follows the cells: maps of any mix of shapes pad
only their short sides, to the widest among maps of similar short side.
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

# Maps processed together are stacked long side down in one image as wide as their widest
# short side, so a chunk holds maps of similar short sides: at most _CHUNK_MAPS maps and
# _CHUNK_CELLS padded cells (bounding the chunk's arrays), with padding adding at most
# _CHUNK_PADDING - 1 of the chunk's own cells. One panorama in a batch then costs its own
# cells, not every map's.
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
    maps = [_as_map(cam, f"cams[{i}]", check_finite=False) for i, cam in enumerate(cams)]
    if maps and not np.isfinite(np.concatenate([m.ravel() for m in maps])).all():
        for i, m in enumerate(maps):
            _as_map(m, f"cams[{i}]")
    sizes = _as_sizes(image_sizes, "image_sizes")
    chunks = _similar_shape_chunks([m.shape for m in maps])
    if len(chunks) == 1:
        return _boxes_for_maps([maps[i] for i in chunks[0]], sizes[chunks[0]], config)
    out: list[tuple[np.ndarray, np.ndarray]] = [empty_boxes()] * len(maps)
    for chunk in chunks:
        for i, result in zip(chunk, _boxes_for_maps([maps[i] for i in chunk], sizes[chunk], config)):
            out[i] = result
    return out


def _similar_shape_chunks(shapes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Indices of maps to process together (see ``_CHUNK_PADDING``).

    Maps are packed long side down, one under another, so only their short sides pad (to the
    chunk's widest); maps are grouped by short side, and long sides cost nothing extra.
    """
    if not shapes:
        return []
    sides = np.asarray(shapes, np.int64)
    short, long = sides.min(axis=1), sides.max(axis=1)
    if len(shapes) <= _CHUNK_MAPS and (short == short[0]).all() and int(long.sum() * short[0]) <= _CHUNK_CELLS:
        return [list(range(len(shapes)))]
    chunks: list[list[int]] = []
    current: list[int] = []
    cells = rows = 0
    for i in np.argsort(short, kind="stable").tolist():
        s, n = int(short[i]), int(long[i])
        padded = (rows + n) * s  # sorted by short side: this map's is the widest so far
        if current and (len(current) >= _CHUNK_MAPS or padded > _CHUNK_CELLS
                        or padded > _CHUNK_PADDING * (cells + s * n)):
            chunks.append(current)
            current, cells, rows = [], 0, 0
        current.append(i)
        cells += s * n
        rows += n
    chunks.append(current)
    return chunks


def _as_map(cam: object, name: str, check_finite: bool = True) -> np.ndarray:
    try:
        array = np.asarray(cam, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a numeric 2-D array, got {type(cam).__name__}") from None
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D map (h, w), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    if check_finite and not np.isfinite(array).all():
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

    # Every map long side down: maps wider than tall are transposed ("flipped"), then all
    # are stacked into one column of rows as wide as the widest short side. The padding
    # is 0, never above a threshold (thresholds are >= 0 and foreground is strictly above).
    flipped = np.array([m.shape[1] > m.shape[0] for m in maps])
    oriented = [m.T if f else m for m, f in zip(maps, flipped)]
    heights = np.array([m.shape[0] for m in oriented], np.int64)
    widths = np.array([m.shape[1] for m in oriented], np.int64)
    width = int(widths.max())
    offsets = np.cumsum(heights) - heights
    total_rows = int(heights.sum())
    if (widths == width).all():
        stack = np.concatenate(oriented)
    else:
        stack = np.zeros((total_rows, width), np.float32)
        for m, offset in zip(oriented, offsets.tolist()):
            stack[offset : offset + m.shape[0], : m.shape[1]] = m
    fg = stack[None] > thresholds[:, None, None]

    # One block per (map, threshold) holding foreground, cropped to the rows holding any and
    # followed by an empty row so that no component crosses blocks; blocks in (map,
    # threshold) order; one labelling call for the whole chunk.
    row_any = stack.max(axis=1)[None] > thresholds[:, None]
    row_index = np.arange(total_rows)
    first = np.minimum.reduceat(np.where(row_any, row_index, total_rows), offsets, axis=1).T.ravel()
    last = np.maximum.reduceat(np.where(row_any, row_index, -1), offsets, axis=1).T.ravel()
    block_ids = np.flatnonzero(last >= 0)  # map * num_thr + threshold index
    if len(block_ids) == 0:
        return [empty_boxes() for _ in range(num_maps)]
    block_first = first[block_ids]
    lengths = last[block_ids] - block_first + 2
    starts = np.cumsum(lengths) - lengths
    num_rows = int(lengths.sum())
    within = np.arange(num_rows) - np.repeat(starts, lengths)
    gap = within == np.repeat(lengths - 1, lengths)
    source_row = np.where(gap, 0, np.repeat(block_first, lengths) + within)
    tall = fg.reshape(num_thr * total_rows, width)[source_row + np.repeat(block_ids % num_thr * total_rows, lengths)]
    tall[gap] = False
    num_labels, labels, stats, _ = cv2.connectedComponentsWithStats(
        tall.view(np.uint8), connectivity=4, ltype=cv2.CV_32S
    )
    if num_labels <= 1:
        return [empty_boxes() for _ in range(num_maps)]
    left, top, comp_w, comp_h, cells = (stats[1:, j].astype(np.int64) for j in range(5))
    block_position = np.searchsorted(starts, top, side="right") - 1
    block = block_ids[block_position]

    # Rank components within their block; keep while size >= half the largest's. Ties go
    # by raster order in the map as given; labelling order is that, except in flipped maps,
    # where it is the map's column order: ties there are re-keyed.
    size = comp_w * comp_h if config.size_measure == "rectangle" else cells
    tie_sign = -1 if config.ties_later_first else 1
    raster = np.arange(len(size))
    order = np.lexsort((tie_sign * raster, -size, block))
    same = (block[order][1:] == block[order][:-1]) & (size[order][1:] == size[order][:-1])
    tied = np.r_[same, False] | np.r_[False, same]
    rekey = order[tied & flipped[block[order] // num_thr]]
    for k in rekey.tolist():
        column = labels[top[k] : top[k] + comp_h[k], left[k]]
        raster[k] = left[k] * num_rows + top[k] + int(np.argmax(column == k + 1))
    if len(rekey):
        order = np.lexsort((tie_sign * raster, -size, block))
    block_sorted, size_sorted = block[order], size[order]
    position = np.arange(len(order))
    starts_group = np.r_[True, block_sorted[1:] != block_sorted[:-1]]
    group_start = np.maximum.accumulate(np.where(starts_group, position, 0))
    keep = 2 * size_sorted >= size_sorted[group_start]
    if config.max_components is not None:
        keep &= (position - group_start) < config.max_components
    comp = order[keep]
    map_index = block[comp] // num_thr

    # Weighted moments of each kept component over its own rows only: per row, the sums of
    # w, w*col and w*col^2 over the region's cells, then per component over its rows (which
    # are consecutive), with y the row in the map.
    rows_per_comp = comp_h[comp]
    row_starts = np.cumsum(rows_per_comp) - rows_per_comp
    comp_of_row = np.repeat(np.arange(len(comp)), rows_per_comp)
    rows = np.arange(len(comp_of_row)) + np.repeat(top[comp] - row_starts, rows_per_comp)
    cols = np.arange(width)
    if config.moment_region == "rectangle":
        c0, c1 = left[comp], left[comp] + comp_w[comp]
        in_cols = (cols >= c0[:, None]) & (cols < c1[:, None])
        region = tall[rows] & in_cols[comp_of_row]
    else:
        region = labels[rows] == (comp + 1)[comp_of_row][:, None]
    weight = (stack + np.float32(config.moment_bias))[source_row[rows]]
    weight *= region
    comp_block = block_position[comp]
    map_top = starts[comp_block] - block_first[comp_block] + offsets[map_index]
    y = (rows - np.repeat(map_top, rows_per_comp)).astype(np.float64)
    # In float64: float32 row sums move a small box's area by ~1e-4 relative.
    per_row = np.empty((len(rows), 5))
    per_row[:, :3] = weight.astype(np.float64) @ np.stack([np.ones(width), cols, cols * cols], axis=1)
    per_row[:, 3] = per_row[:, 0] * y
    per_row[:, 4] = per_row[:, 3] * y
    s0, sc, scc, sr, srr = np.add.reduceat(per_row, row_starts, axis=0).T
    mean_c, mean_r = sc / s0, sr / s0
    side_c = np.maximum(1.0, np.sqrt(12.0 * np.maximum(scc / s0 - mean_c * mean_c, 0.0)))
    side_r = np.maximum(1.0, np.sqrt(12.0 * np.maximum(srr / s0 - mean_r * mean_r, 0.0)))
    flip = flipped[map_index]
    cx, cy = np.where(flip, mean_r, mean_c), np.where(flip, mean_c, mean_r)
    box_w, box_h = np.where(flip, side_r, side_c), np.where(flip, side_c, side_r)
    x1 = cx + 0.5 - box_w / 2
    y1 = cy + 0.5 - box_h / 2

    # Cells to original-image pixels, then clip.
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
    ends = np.cumsum(np.bincount(map_index[kept_flat], minlength=num_maps)).tolist()
    return [(boxes32[s:e], scores32[s:e]) for s, e in zip([0] + ends[:-1], ends)]
