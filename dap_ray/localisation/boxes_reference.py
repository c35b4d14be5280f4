"""Straightforward per-component CAM-to-box, the shape of the authors' released script.

One ``scipy.ndimage`` labelling per threshold, one masked moment sum per component and a
greedy NMS loop. It exists as an oracle for :mod:`dap_ray.localisation.boxes` (tests compare the two
on many maps) and as the baseline of ``benchmarks/bench_boxes.py``; the pipeline never
uses it. Needs scipy (the ``test`` extra).
"""

from __future__ import annotations

import numpy as np

from dap_ray.localisation.boxes import BoxConfig, empty_boxes

__all__ = ["cam_to_boxes_reference"]


def cam_to_boxes_reference(
    cam: np.ndarray, image_size: tuple[int, int], config: BoxConfig = BoxConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """Same contract as :func:`dap_ray.localisation.boxes.cam_to_boxes`, without its input checks."""
    from scipy import ndimage

    cam = np.asarray(cam, np.float32)
    img_w, img_h = image_size
    cell = config.stride * min(img_w, img_h) / config.scale
    gy, gx = np.meshgrid(np.arange(cam.shape[0], dtype=np.float64),
                         np.arange(cam.shape[1], dtype=np.float64), indexing="ij")

    boxes = []
    for threshold in config.thresholds:
        foreground = cam > threshold
        weights = (cam.astype(np.float64) + config.moment_bias) * foreground
        labels, count = ndimage.label(foreground)
        if count == 0:
            continue
        slices = ndimage.find_objects(labels, count)
        if config.size_measure == "rectangle":
            sizes = np.array([(s[0].stop - s[0].start) * (s[1].stop - s[1].start) for s in slices])
        else:
            sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        if config.ties_later_first:
            ranked = np.argsort(sizes, kind="stable")[::-1]
        else:
            ranked = np.argsort(-sizes, kind="stable")
        for rank, index in enumerate(ranked):
            if 2 * sizes[index] < sizes[ranked[0]]:
                break
            if config.max_components is not None and rank == config.max_components:
                break
            if config.moment_region == "rectangle":
                m = np.zeros_like(weights)
                m[slices[index]] = weights[slices[index]]
            else:
                m = weights * (labels == index + 1)
            total = m.sum()
            cx, cy = (m * gx).sum() / total, (m * gy).sum() / total
            var_x = (m * (gx - cx) ** 2).sum() / total
            var_y = (m * (gy - cy) ** 2).sum() / total
            w, h = max(1.0, np.sqrt(12 * var_x)), max(1.0, np.sqrt(12 * var_y))
            x1, y1 = cx + 0.5 - w / 2, cy + 0.5 - h / 2
            boxes.append([
                np.clip(x1 * cell, 0, img_w - 1),
                np.clip(y1 * cell, 0, img_h - 1),
                np.clip((x1 + w) * cell, 0, img_w - 1),
                np.clip((y1 + h) * cell, 0, img_h - 1),
            ])
    if not boxes:
        return empty_boxes()

    boxes = np.array(boxes, dtype=np.float64)
    boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    if not len(boxes):
        return empty_boxes()
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    scores = areas / areas[0]
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if all(_iou(boxes[i], boxes[j]) <= config.nms_iou for j in kept):
            kept.append(int(i))
    return boxes[kept].astype(np.float32), scores[kept].astype(np.float32)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
