"""Pseudo-box quality against true boxes, as weakly supervised localisation reports it.

Plain numpy; boxes are xyxy float32 (N, 4) in original-image pixels.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Mapping

import numpy as np

__all__ = ["box_iou", "centre_baseline", "load_coco_boxes", "localisation_quality", "whole_image_baseline"]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) and (M, 4) xyxy boxes to their (N, M) IoU; zero-area pairs give 0."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def localisation_quality(
    predictions: Mapping[str, tuple[np.ndarray, np.ndarray]],
    truth: Mapping[str, np.ndarray],
    iou_threshold: float = 0.5,
) -> dict[str, float]:
    """Quality of ``predictions`` (image key to (boxes, scores)) against ``truth`` (key to boxes).

    Over the predicted images that have true boxes:
        ``corloc``: share whose top-scored box has IoU >= ``iou_threshold`` with a true box
            (an image without boxes counts as a miss);
        ``any_hit``: share where any predicted box does;
        ``mean_best_iou``: mean over true boxes of the best IoU any predicted box reaches;
        ``boxes_per_image``: mean number of predicted boxes;
        ``images``: how many images were scored.
    """
    keys = [k for k in predictions if k in truth and len(truth[k])]
    if not keys:
        raise ValueError("no predicted image has true boxes to compare with")
    top_hits = any_hits = 0
    best_ious: list[np.ndarray] = []
    box_counts = []
    for key in keys:
        boxes, scores = predictions[key]
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        true = np.asarray(truth[key], np.float32).reshape(-1, 4)
        box_counts.append(len(boxes))
        if len(boxes) == 0:
            best_ious.append(np.zeros(len(true)))
            continue
        iou = box_iou(boxes, true)
        top = int(np.argmax(np.asarray(scores)))
        top_hits += bool(iou[top].max() >= iou_threshold)
        any_hits += bool(iou.max() >= iou_threshold)
        best_ious.append(iou.max(axis=0))
    return {
        "images": len(keys),
        "corloc": top_hits / len(keys),
        "any_hit": any_hits / len(keys),
        "mean_best_iou": float(np.concatenate(best_ious).mean()),
        "boxes_per_image": float(np.mean(box_counts)),
    }


def whole_image_baseline(sizes: Mapping[str, tuple[int, int]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One box covering each image (``sizes``: key to (W, H))."""
    return {k: (np.array([[0, 0, w, h]], np.float32), np.ones(1, np.float32)) for k, (w, h) in sizes.items()}


def centre_baseline(
    sizes: Mapping[str, tuple[int, int]], truth: Mapping[str, np.ndarray]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One centred box per image, of the median true box width and height (relative to the image)."""
    rel_w, rel_h = [], []
    for key, boxes in truth.items():
        if key in sizes:
            w, h = sizes[key]
            boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
            rel_w.extend((boxes[:, 2] - boxes[:, 0]) / w)
            rel_h.extend((boxes[:, 3] - boxes[:, 1]) / h)
    if not rel_w:
        raise ValueError("no true boxes to take a median size from")
    mw, mh = float(np.median(rel_w)), float(np.median(rel_h))
    out = {}
    for key, (w, h) in sizes.items():
        box = [w * (1 - mw) / 2, h * (1 - mh) / 2, w * (1 + mw) / 2, h * (1 + mh) / 2]
        out[key] = (np.array([box], np.float32), np.ones(1, np.float32))
    return out


def load_coco_boxes(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int]]]:
    """True boxes from a COCO file: ``file_name`` to xyxy float32 (M, 4), and to (W, H)."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress lines
        coco = COCO(str(path))
    boxes: dict[str, np.ndarray] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for image_id, info in coco.imgs.items():
        anns = coco.imgToAnns.get(image_id, [])
        xywh = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        xywh[:, 2:] += xywh[:, :2]
        boxes[info["file_name"]] = xywh
        sizes[info["file_name"]] = (int(info["width"]), int(info["height"]))
    return boxes, sizes
