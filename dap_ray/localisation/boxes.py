"""Pseudo boxes from class activation maps (DAP Step 2, second half).

A CAM (values in [0, 1], on the stride grid of the largest CAM scale) is thresholded at
several values; each threshold's large 4-connected components become boxes by matching
the first and second moments of a rectangle (Section 3.1 of the paper); all boxes are
merged by NMS.

Box convention (the whole project): xyxy, absolute pixels of the original image, float32,
shape (N, 4); no boxes is shape (0, 4).

The work is one compiled loop (numba) over maps, thresholds and components, in
:mod:`dap_ray.localisation.boxes_loop`, imported on the first boxes rather than with this
module: per map and threshold, a flood fill labels the 4-connected components in raster
order, the kept ones' moments are summed over their rectangles (or their own cells), and a
greedy NMS merges the map's boxes. Its cost follows each map's own cells, so one panorama in
a batch costs only itself. :mod:`dap_ray.localisation.boxes_reference` holds the
straightforward per-component NumPy/SciPy version that this one is tested against.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Sequence

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
    maps = [_as_map(cam, "cam")]
    values = _joined(maps, "cam")
    return _boxes_for_maps(maps, values, _as_sizes([image_size], "image_size"), config)[0]


def cam_to_boxes_batch(
    cams: Sequence[np.ndarray],
    image_sizes: Sequence[tuple[int, int]],
    config: BoxConfig = BoxConfig(),
    frames: np.ndarray | Sequence[tuple[float, float]] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`cam_to_boxes` for many maps (of any shapes) at once; same results, much faster.

    Args:
        cams: B float (h_i, w_i) maps.
        image_sizes: B ``(W, H)`` original image sizes.
        config: how to make boxes (see :class:`BoxConfig`).
        frames: B ``(fx, fy)`` in (0, 1], or None (all ones): map i covers image i squeezed to
            ``fx`` of its width and ``fy`` of its height
            (:meth:`dap_ray.localisation.cam.CamExtractor.from_tensors_native`). Its boxes are
            drawn on the squeezed image, then stretched back to the original's pixels.

    Returns:
        B ``(boxes, scores)`` pairs as :func:`cam_to_boxes` returns them.
    """
    if len(cams) != len(image_sizes):
        raise ValueError(f"got {len(cams)} cams but {len(image_sizes)} image sizes")
    maps = [_as_map(cam, f"cams[{i}]") for i, cam in enumerate(cams)]
    values = _joined(maps, "cams[{}]")
    sizes = _as_sizes(image_sizes, "image_sizes")
    if frames is None:
        return _boxes_for_maps(maps, values, sizes, config)
    factors = np.asarray(frames, dtype=np.float64).reshape(-1, 2) if len(frames) else np.ones((0, 2))
    if factors.shape != sizes.shape or not (np.isfinite(factors).all() and (factors > 0).all()
                                            and (factors <= 1).all()):
        raise ValueError(f"frames must be {len(sizes)} (fx, fy) pairs in (0, 1], got {np.asarray(frames).tolist()}")
    stretched = []
    for (boxes, scores), (fx, fy), (width, height) in zip(_boxes_for_maps(maps, values, sizes * factors, config),
                                                          factors, sizes):
        if fx != 1.0 or fy != 1.0:
            far = np.array([width, height, width, height]) - 1
            # A side clipped to the squeezed image's last pixel goes to the original's last pixel.
            clipped = boxes >= np.array([width * fx, height * fy, width * fx, height * fy]) - 1
            boxes = np.where(clipped, far, np.minimum(boxes / np.array([fx, fy, fx, fy]), far)).astype(np.float32)
        stretched.append((boxes, scores))
    return stretched


def _as_map(cam: object, name: str) -> np.ndarray:
    """``cam`` as a float32 (h, w) array; NaN and Inf are looked for once the maps are joined (:func:`_joined`)."""
    try:
        array = np.asarray(cam, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a numeric 2-D array, got {type(cam).__name__}") from None
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D map (h, w), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    return array


def _joined(maps: list[np.ndarray], name: str) -> np.ndarray:
    """The float32 ``maps`` one after another, row-major, as the compiled loop takes them;
    ``name.format(i)`` names map i in the error a NaN or Inf raises."""
    if not maps:
        return np.zeros(0, np.float32)
    values = np.concatenate([m.ravel() for m in maps])
    if not np.isfinite(values).all():
        bad = next(i for i, m in enumerate(maps) if not np.isfinite(m).all())
        raise ValueError(f"{name.format(bad)} contains NaN or Inf")
    return values


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
    maps: list[np.ndarray], values: np.ndarray, sizes: np.ndarray, config: BoxConfig
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The boxes of checked ``maps``, whose cells ``values`` holds (:func:`_joined`)."""
    num_maps = len(maps)
    if num_maps == 0:
        return []
    shapes = np.array([m.shape for m in maps], np.int64).reshape(num_maps, 2)
    from dap_ray.localisation.boxes_loop import boxes_loop  # numba: imported when first needed

    rows, counts = boxes_loop(
        values,
        shapes,
        np.array(sizes, np.float64, order="C"),  # a writable C copy: another layout would compile again
        np.asarray(config.thresholds, np.float32),
        np.float32(config.moment_bias),
        float(config.stride),
        float(config.scale),
        config.size_measure == "rectangle",
        config.moment_region == "rectangle",
        -1 if config.max_components is None else int(config.max_components),
        bool(config.ties_later_first),
        float(config.nms_iou),
    )
    boxes, scores = rows[:, :4].astype(np.float32), rows[:, 4].astype(np.float32)
    ends = np.cumsum(counts).tolist()
    return [(boxes[s:e], scores[s:e]) for s, e in zip([0] + ends[:-1], ends)]
