"""Detector quality against a COCO ground truth: COCO AP (pycocotools) and PASCAL VOC AP50.

Plain numpy and pycocotools. Inputs:

    ground truth: a COCO dict, or the path of a COCO JSON file, with ``images``,
        ``annotations`` (``bbox`` xywh in original-image pixels; optional ``area``,
        ``iscrowd``, ``difficult``) and ``categories`` (``id``, ``name``);
    detections: the COCO results format, a list of dicts with ``image_id``,
        ``category_id`` (the file's ids), ``bbox`` (xywh, original-image pixels) and
        ``score``, or the path of such a JSON file.

Neither input is modified. Metrics are in percent. A metric with nothing to measure (no
ground truth of that kind: an empty ground truth, no small boxes for ``APs``, a class without
positives) is ``nan``, never 0 or pycocotools' -1. With ground truth but no detections the
metrics are 0.

:func:`coco_metrics` is pycocotools' ``COCOeval`` (bbox), run with its output silenced, after
these repairs on a copy of the ground truth: ``info`` added when absent; annotation ids
renumbered 1..N in file order (ids that are absent, repeated or 0 break pycocotools: a match
to id 0 counts as unmatched); ``area`` computed from the bbox (w * h) and ``iscrowd`` set to 0
where absent; ``params.imgIds`` set to every ground-truth image. ``iscrowd`` works as in COCO;
``difficult`` is ignored (a difficult box is an ordinary ground truth there).

:func:`voc_metrics` follows detectron2's ``voc_eval`` (the VOC2007 devkit's rules) with
continuous boxes; see its docstring for the rules and the choices.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "HEADLINE_METRICS",
    "coco_metrics",
    "json_safe",
    "detections_to_coco_results",
    "evaluate_detections",
    "voc_ap",
    "voc_metrics",
]

GroundTruth = Mapping[str, Any] | str | Path
Detections = Sequence[Mapping[str, Any]] | str | Path

COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
VOC_KEYS = ("VOC_AP50", "VOC07_AP50")
HEADLINE_METRICS = COCO_KEYS + VOC_KEYS
_PAIRS_PER_CHUNK = 1 << 22  # detection-ground truth pairs held at once by the VOC matcher


# ----------------------------------------------------------------------------- loading


@dataclass
class _GroundTruth:
    """A checked ground truth: ``dataset`` is the repaired COCO dict pycocotools gets.

    Arrays, one row per annotation in file order: ``image`` and ``category`` (int64 indices
    into ``image_ids`` / ``category_ids``), ``boxes`` (xyxy float64 (M, 4), original-image
    pixels), ``crowd`` and ``difficult`` (bool).
    """

    source: str
    dataset: dict
    image_ids: list
    category_ids: list
    category_names: list[str]
    image_index: dict
    category_index: dict
    image: np.ndarray
    category: np.ndarray
    boxes: np.ndarray
    crowd: np.ndarray
    difficult: np.ndarray


@dataclass
class _Detections:
    """Checked detections, one row per detection in input order: ``image`` and ``category``
    (int64 indices into the ground truth's lists), ``xywh`` (float64 (D, 4), as given),
    ``boxes`` (the same as xyxy) and ``scores`` (float64 (D,)).
    """

    source: str
    image: np.ndarray
    category: np.ndarray
    xywh: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray

    def results(self, g: _GroundTruth) -> list[dict]:
        """A fresh COCO results list (the ground truth's own id objects, Python floats)."""
        image_ids = [g.image_ids[i] for i in self.image.tolist()]
        category_ids = [g.category_ids[k] for k in self.category.tolist()]
        return [{"image_id": i, "category_id": c, "bbox": b, "score": s}
                for i, c, b, s in zip(image_ids, category_ids, self.xywh.tolist(), self.scores.tolist())]


def _read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: {what} is a folder, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: {what} is not valid JSON ({exc})") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def _xywh(value: Any, where: str) -> list[float]:
    """A checked xywh box as 4 floats; ``where`` names the entry in the error."""
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__") or len(value) != 4:
        raise ValueError(f"{where}: bbox must be 4 numbers [x, y, w, h], got {value!r}")
    if not all(_is_number(v) for v in value):
        raise ValueError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {value!r}")
    box = [float(v) for v in value]
    if box[2] < 0 or box[3] < 0:
        raise ValueError(f"{where}: bbox has a negative width or height: {value!r}")
    return box


def _flag(value: Any, where: str, key: str) -> bool:
    if value in (0, 1, True, False) and not isinstance(value, str):
        return bool(value)
    raise ValueError(f"{where}: {key} must be 0 or 1, got {value!r}")


def _key(value: Any, index: Mapping, where: str, key: str, what: str) -> int:
    try:
        found = index.get(value)
    except TypeError:  # unhashable
        found = None
    if found is None:
        raise ValueError(f"{where}: {key} {value!r} is not {what}")
    return found


def _load_ground_truth(gt: GroundTruth) -> _GroundTruth:
    if isinstance(gt, _GroundTruth):
        return gt
    if isinstance(gt, (str, Path)):
        source, data = str(gt), _read_json(gt, "ground truth")
    elif isinstance(gt, Mapping):
        source, data = "ground truth", gt
    else:
        raise ValueError(f"ground truth must be a COCO dict or a JSON file path, got {type(gt).__name__}")
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: not a COCO file (a JSON {type(data).__name__}, not an object)")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise ValueError(f"{source}: not a COCO file (no {', '.join(repr(k) for k in missing)} list)")

    images, image_index = [], {}
    for i, img in enumerate(data["images"]):
        where = f"{source}: images[{i}]"
        if not isinstance(img, Mapping) or "id" not in img:
            raise ValueError(f"{where}: an image needs an 'id'")
        _key_check_new(img["id"], image_index, where, "image id")
        image_index[img["id"]] = i
        images.append(dict(img))

    categories, category_index, names = [], {}, []
    for i, cat in enumerate(data["categories"]):
        where = f"{source}: categories[{i}]"
        if not isinstance(cat, Mapping) or "id" not in cat:
            raise ValueError(f"{where}: a category needs an 'id'")
        _key_check_new(cat["id"], category_index, where, "category id")
        name = str(cat.get("name", cat["id"]))
        if name in names:
            raise ValueError(f"{where}: category name {name!r} is used twice")
        category_index[cat["id"]] = i
        names.append(name)
        categories.append(dict(cat))

    m = len(data["annotations"])
    annotations = []
    img_col, cat_col = np.empty(m, np.int64), np.empty(m, np.int64)
    boxes = np.empty((m, 4), np.float64)
    crowd, difficult = np.zeros(m, bool), np.zeros(m, bool)
    for i, ann in enumerate(data["annotations"]):
        where = f"{source}: annotations[{i}]"
        if isinstance(ann, Mapping) and "id" in ann:
            where += f" (id {ann['id']!r})"
        if not isinstance(ann, Mapping):
            raise ValueError(f"{where}: an annotation must be an object")
        for k in ("image_id", "category_id", "bbox"):
            if k not in ann:
                raise ValueError(f"{where}: no {k!r}")
        img_col[i] = _key(ann["image_id"], image_index, where, "image_id", "an image of the file")
        cat_col[i] = _key(ann["category_id"], category_index, where, "category_id", "a category of the file")
        x, y, w, h = _xywh(ann["bbox"], where)
        boxes[i] = (x, y, x + w, y + h)
        crowd[i] = _flag(ann.get("iscrowd", 0), where, "iscrowd")
        difficult[i] = _flag(ann.get("difficult", 0), where, "difficult")
        area = ann.get("area", w * h)
        if not _is_number(area):
            raise ValueError(f"{where}: area must be a finite number, got {area!r}")
        annotations.append({**ann, "id": i + 1, "area": area, "iscrowd": int(crowd[i])})

    dataset = {
        "info": data.get("info") or {},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    if "licenses" in data:
        dataset["licenses"] = data["licenses"]
    return _GroundTruth(
        source=source, dataset=dataset, image_ids=[img["id"] for img in images],
        category_ids=[c["id"] for c in categories], category_names=names,
        image_index=image_index, category_index=category_index,
        image=img_col, category=cat_col, boxes=boxes, crowd=crowd, difficult=difficult,
    )


def _key_check_new(value: Any, index: Mapping, where: str, what: str) -> None:
    try:
        seen = value in index
    except TypeError:
        raise ValueError(f"{where}: {what} {value!r} is not a number or string") from None
    if seen:
        raise ValueError(f"{where}: {what} {value!r} is used twice")


def _load_detections(dets: Detections, gt: _GroundTruth) -> _Detections:
    if isinstance(dets, _Detections):
        return dets
    if isinstance(dets, (str, Path)):
        source, data = str(dets), _read_json(dets, "detections")
    else:
        source, data = "detections", dets
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Sequence):
        raise ValueError(f"{source}: detections must be a list of COCO results, got a {type(data).__name__}")
    columns = _detection_columns(data, gt)
    if columns is None:  # something is wrong: find and name the first bad entry
        columns = _detection_columns_checked(data, gt, source)
    image, category, xywh, scores = columns
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    return _Detections(source, image, category, xywh, boxes, scores)


def _detection_columns(data: Sequence, gt: _GroundTruth) -> tuple | None:
    """The columns of well-formed detections, in bulk; None if any entry is not well formed."""
    n = len(data)
    try:
        image = np.fromiter((gt.image_index[d["image_id"]] for d in data), np.int64, n)
        category = np.fromiter((gt.category_index[d["category_id"]] for d in data), np.int64, n)
        raw_boxes = [d["bbox"] for d in data]
        raw_scores = [d["score"] for d in data]
        xywh = np.array(raw_boxes).reshape(n, 4) if n else np.zeros((0, 4))
        scores = np.array(raw_scores).reshape(n)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None
    if xywh.dtype.kind not in "iuf" or scores.dtype.kind not in "iuf":
        return None  # strings, booleans, objects
    if any(type(v) in (bool, np.bool_) for box in raw_boxes for v in box):
        return None
    xywh, scores = xywh.astype(np.float64), scores.astype(np.float64)
    if not (np.isfinite(xywh).all() and np.isfinite(scores).all() and (xywh[:, 2:] >= 0).all()):
        return None
    return image, category, xywh, scores


def _detection_columns_checked(data: Sequence, gt: _GroundTruth, source: str) -> tuple:
    """The columns, one detection at a time; raises ValueError naming the first bad one."""
    n = len(data)
    image, category = np.empty(n, np.int64), np.empty(n, np.int64)
    xywh, scores = np.empty((n, 4), np.float64), np.empty(n, np.float64)
    for i, det in enumerate(data):
        where = f"{source}: detection {i}"
        if not isinstance(det, Mapping):
            raise ValueError(f"{where}: a detection must be an object, got {det!r}")
        for k in ("image_id", "category_id", "bbox", "score"):
            if k not in det:
                raise ValueError(f"{where}: no {k!r}")
        image[i] = _key(det["image_id"], gt.image_index, where, "image_id", "an image of the ground truth")
        category[i] = _key(det["category_id"], gt.category_index, where, "category_id",
                           "a category of the ground truth")
        xywh[i] = _xywh(det["bbox"], where)
        if not _is_number(det["score"]):
            raise ValueError(f"{where}: score must be a finite number, got {det['score']!r}")
        scores[i] = det["score"]
    return image, category, xywh, scores


# ----------------------------------------------------------------------------- COCO


def _coco_eval(g: _GroundTruth, d: _Detections):
    """A run COCOeval (evaluate + accumulate + summarize), its prints swallowed."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = g.dataset
        coco_gt.createIndex()
        if len(d.scores):
            coco_dt = coco_gt.loadRes(d.results(g))  # fresh dicts: loadRes writes into them
        else:  # loadRes([]) raises; an empty results set scores 0 where there is ground truth
            coco_dt = COCO()
            coco_dt.dataset = {"info": {}, "images": list(g.dataset["images"]),
                               "categories": [dict(c) for c in g.dataset["categories"]], "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = list(g.image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _percent(value: float) -> float:
    """pycocotools' figure (a fraction, -1 for "nothing to measure") in percent, or nan."""
    return float(value * 100) if value >= 0 else float("nan")


def _coco_from_eval(g: _GroundTruth, evaluator) -> dict:
    stats = evaluator.stats
    out: dict[str, Any] = {k: _percent(stats[i]) for i, k in enumerate(COCO_KEYS)}
    # precision: [T IoU thresholds, R recall points, K classes, A area ranges, M max dets];
    # the same masked mean as COCOeval.summarize, one class at a time (area all, 100 dets).
    precision = evaluator.eval["precision"]
    t50 = int(np.where(evaluator.params.iouThrs == 0.5)[0][0])
    order = {c: k for k, c in enumerate(evaluator.params.catIds)}
    per_class = {}
    for name, cat_id in zip(g.category_names, g.category_ids):
        k = order[cat_id]
        p = precision[:, :, k, 0, -1]
        p50 = precision[t50, :, k, 0, -1]
        per_class[name] = {
            "AP": _percent(np.mean(p[p > -1]) if (p > -1).any() else -1),
            "AP50": _percent(np.mean(p50[p50 > -1]) if (p50 > -1).any() else -1),
        }
    out["per_class"] = per_class
    return out


def coco_metrics(gt: GroundTruth, dets: Detections) -> dict:
    """COCO box AP of ``dets`` against ``gt``: exactly pycocotools' ``COCOeval`` (bbox).

    Returns ``AP`` (IoU 0.50:0.95), ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl`` (the
    ground truth's ``area`` < 32**2, 32**2..96**2, > 96**2), each in percent (COCOeval's
    ``stats[0:6]`` * 100; COCOeval's -1, "no ground truth to measure", becomes ``nan``), and
    ``per_class``: category name -> {``AP``, ``AP50``} (area all, 100 detections per image),
    in the file's category order, ``nan`` for a category without ground truth.

    The repairs made on a copy of ``gt`` are listed in the module docstring. Zero detections
    give 0 wherever there is ground truth (``loadRes([])`` is never called). Raises ValueError
    for a ground truth that is not COCO, a box with a negative width or height, or a detection
    whose ``image_id`` / ``category_id`` is not in ``gt`` (naming the first such entry).
    """
    g = _load_ground_truth(gt)
    d = _load_detections(dets, g)
    return _coco_from_eval(g, _coco_eval(g, d))


# ----------------------------------------------------------------------------- VOC


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """VOC AP (a fraction) of a precision-recall curve, as detectron2's ``voc_ap``.

    ``recall``, ``precision``: float (D,) cumulative values over the score-sorted detections.
    ``use_07_metric``: the VOC2007 11-point mean over t in ``np.arange(0, 1.1, 0.1)`` of the
    max precision at recall >= t (0 if none); else the VOC2010+ area under the precision
    made monotone from the right, summed where recall changes.
    """
    recall = np.asarray(recall, np.float64)
    precision = np.asarray(precision, np.float64)
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            reached = recall >= t
            p = np.max(precision[reached]) if reached.any() else 0
            ap = ap + p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the envelope: max precision to the right
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _best_ground_truth(g: _GroundTruth, d: _Detections) -> tuple[np.ndarray, np.ndarray]:
    """Per detection: the best IoU with a ground truth of its class in its image (-inf if
    none) and that ground truth's row (the first in file order on a tie; -1 if none)."""
    n_cat = max(len(g.category_ids), 1)
    g_key = g.image * n_cat + g.category
    g_order = np.argsort(g_key, kind="stable")  # file order within an (image, class) group
    g_sorted = g_key[g_order]
    d_key = d.image * n_cat + d.category
    first = np.searchsorted(g_sorted, d_key, "left")
    count = np.searchsorted(g_sorted, d_key, "right") - first
    ovmax = np.full(len(d_key), -np.inf)
    jmax = np.full(len(d_key), -1, np.int64)
    ends = np.cumsum(count)
    start = 0
    while start < len(d_key):  # chunks of about _PAIRS_PER_CHUNK pairs
        done = ends[start - 1] if start else 0
        stop = max(int(np.searchsorted(ends, done + _PAIRS_PER_CHUNK, "right")), start + 1)
        idx = np.arange(start, stop)
        idx = idx[count[idx] > 0]
        start = stop
        if not len(idx):
            continue
        c = count[idx]
        det = np.repeat(idx, c)
        seg = np.cumsum(c) - c
        gt = g_order[np.repeat(first[idx], c) + np.arange(int(c.sum())) - np.repeat(seg, c)]
        bb, gg = d.boxes[det], g.boxes[gt]
        # detectron2's voc_eval overlaps, continuous boxes (no +1)
        iw = np.maximum(np.minimum(gg[:, 2], bb[:, 2]) - np.maximum(gg[:, 0], bb[:, 0]), 0.0)
        ih = np.maximum(np.minimum(gg[:, 3], bb[:, 3]) - np.maximum(gg[:, 1], bb[:, 1]), 0.0)
        inters = iw * ih
        uni = (bb[:, 2] - bb[:, 0]) * (bb[:, 3] - bb[:, 1]) + (gg[:, 2] - gg[:, 0]) * (gg[:, 3] - gg[:, 1]) - inters
        iou = np.divide(inters, uni, out=np.zeros_like(inters), where=uni > 0)
        best = np.maximum.reduceat(iou, seg)
        pair = np.arange(len(iou))
        first_best = np.minimum.reduceat(np.where(iou == np.repeat(best, c), pair, len(iou)), seg)
        ovmax[idx] = best
        jmax[idx] = gt[first_best]
    return ovmax, jmax


def _voc_from(g: _GroundTruth, d: _Detections, iou_threshold: float) -> dict:
    ignored_gt = g.difficult | g.crowd
    npos = np.bincount(g.category[~ignored_gt], minlength=len(g.category_ids))
    ovmax, jmax = _best_ground_truth(g, d)
    # Per class, descending score; ties keep the input order (lexsort is stable).
    order = np.lexsort((-d.scores, d.category))
    matched = ovmax[order] > iou_threshold
    target = jmax[order]
    ignore = np.zeros(len(order), bool)
    ignore[matched] = ignored_gt[target[matched]]
    candidate = matched & ~ignore
    tp = np.zeros(len(order))
    cand_pos = np.flatnonzero(candidate)
    _, first = np.unique(target[cand_pos], return_index=True)  # first claim of each ground truth
    tp[cand_pos[first]] = 1.0
    fp = (~ignore).astype(np.float64) - tp
    bounds = np.searchsorted(d.category[order], np.arange(len(g.category_ids) + 1))

    per_class, area_aps, point_aps = {}, [], []
    for k, name in enumerate(g.category_names):
        if npos[k] == 0:
            per_class[name] = {"VOC_AP50": float("nan"), "VOC07_AP50": float("nan")}
            continue
        lo, hi = bounds[k], bounds[k + 1]
        tp_c, fp_c = np.cumsum(tp[lo:hi]), np.cumsum(fp[lo:hi])
        rec = tp_c / float(npos[k])
        prec = tp_c / np.maximum(tp_c + fp_c, np.finfo(np.float64).eps)
        area, points = voc_ap(rec, prec) * 100, voc_ap(rec, prec, use_07_metric=True) * 100
        per_class[name] = {"VOC_AP50": area, "VOC07_AP50": points}
        area_aps.append(area)
        point_aps.append(points)
    return {
        "VOC_AP50": float(np.mean(area_aps)) if area_aps else float("nan"),
        "VOC07_AP50": float(np.mean(point_aps)) if point_aps else float("nan"),
        "per_class": per_class,
    }


def voc_metrics(gt: GroundTruth, dets: Detections, iou_threshold: float = 0.5) -> dict:
    """PASCAL VOC AP of ``dets`` against ``gt``, as detectron2's ``voc_eval`` (VOC2007 devkit).

    Returns ``VOC_AP50`` (VOC2010+ area under the monotone precision-recall curve) and
    ``VOC07_AP50`` (VOC2007 11-point), in percent, each the mean over the classes that have
    at least one non-difficult, non-crowd ground truth, and ``per_class``: category name ->
    {``VOC_AP50``, ``VOC07_AP50``} in the file's category order. (The keys say AP50 whatever
    ``iou_threshold`` is.)

    Rules, per class: detections in descending score, ties in their input order (a stable
    sort; detectron2's ``np.argsort`` is not stable); each goes to the ground truth of its
    class in its image with the highest IoU (the first in file order on a tie), difficult
    ones included; it is a true positive if that IoU > ``iou_threshold`` (strictly) and the
    ground truth is not yet taken, a false positive if the IoU is <= the threshold, or the
    ground truth was taken by a higher-scored detection, or there is none; matched to a
    difficult ground truth it is neither. Recall is over the non-difficult ground truths.
    Boxes are continuous: IoU has no +1 pixel term (the devkit's 1-based integer boxes do),
    and scores and boxes are not rounded (detectron2 writes them with 3 and 1 decimals).
    Every detection counts (no per-image cap). Not VOC rules but choices here:

    * ``iscrowd: 1`` ground truths are treated as difficult (ignored, not counted);
    * a class without positives (no non-difficult, non-crowd ground truth) has ``nan`` AP
      in ``per_class`` and is left out of the means (detectron2 gives nan, the devkit skips
      it); with no such class at all the means are ``nan``; a class with positives and no
      detections has AP 0.

    Raises ValueError as :func:`coco_metrics` does.
    """
    g = _load_ground_truth(gt)
    return _voc_from(g, _load_detections(dets, g), iou_threshold)


# ----------------------------------------------------------------------------- both


def evaluate_detections(gt: GroundTruth, dets: Detections) -> dict:
    """:func:`coco_metrics` and :func:`voc_metrics` (IoU > 0.5) of ``dets``, reading each input once.

    Returns ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``, ``VOC_AP50``,
    ``VOC07_AP50`` (percent; ``nan`` where there is nothing to measure), ``per_class``:
    category name -> {``AP``, ``AP50``, ``VOC_AP50``, ``VOC07_AP50``}, and the counts
    ``images``, ``categories``, ``detections``, ``gt_boxes`` (every annotation),
    ``gt_crowd`` and ``gt_difficult``.
    """
    g = _load_ground_truth(gt)
    d = _load_detections(dets, g)
    coco = _coco_from_eval(g, _coco_eval(g, d))
    voc = _voc_from(g, d, 0.5)
    out: dict[str, Any] = {k: coco[k] for k in COCO_KEYS}
    out.update({k: voc[k] for k in VOC_KEYS})
    out["per_class"] = {name: {**coco["per_class"][name], **voc["per_class"][name]} for name in g.category_names}
    out.update({
        "images": len(g.image_ids),
        "categories": len(g.category_ids),
        "detections": len(d.scores),
        "gt_boxes": len(g.boxes),
        "gt_crowd": int(g.crowd.sum()),
        "gt_difficult": int(g.difficult.sum()),
    })
    return out


# ----------------------------------------------------------------------------- conversion


def detections_to_coco_results(
    image_ids: Sequence,
    boxes_list: Sequence[np.ndarray],
    scores_list: Sequence[np.ndarray],
    labels_list: Sequence[np.ndarray],
    category_ids: Sequence | Mapping,
) -> list[dict]:
    """Per-image detector outputs to the COCO results format.

    ``image_ids[i]``: the file's id of image i. ``boxes_list[i]``: xyxy float32 (N_i, 4) in
    original-image pixels (empty: (0, 4)); ``scores_list[i]``: (N_i,); ``labels_list[i]``:
    int (N_i,) contiguous 0-based labels. ``category_ids``: label -> the file's category id
    (a sequence indexed by label, e.g. the ground truth's category ids in file order, or a
    mapping). Returns dicts ``image_id``, ``category_id``, ``bbox`` ([x, y, w, h] Python
    floats) and ``score``, in image then box order. Raises ValueError on mismatched lengths,
    a bad box shape or a label without a category id.
    """
    if not (len(image_ids) == len(boxes_list) == len(scores_list) == len(labels_list)):
        raise ValueError(f"image_ids, boxes_list, scores_list and labels_list differ in length: "
                         f"{len(image_ids)}, {len(boxes_list)}, {len(scores_list)}, {len(labels_list)}")
    results = []
    for i, (image_id, boxes, scores, labels) in enumerate(zip(image_ids, boxes_list, scores_list, labels_list)):
        boxes = np.asarray(boxes)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"image {i} ({image_id!r}): boxes must be (N, 4) xyxy, got shape {boxes.shape}")
        boxes = boxes.astype(np.float64)
        scores = np.asarray(scores, np.float64).reshape(-1)
        labels = np.asarray(labels).reshape(-1)
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(f"image {i} ({image_id!r}): {len(boxes)} boxes, {len(scores)} scores, "
                             f"{len(labels)} labels")
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
        for box, score, label in zip(xywh, scores.tolist(), labels.tolist()):
            try:
                if not isinstance(category_ids, Mapping) and not 0 <= label < len(category_ids):
                    raise KeyError(label)
                category_id = category_ids[label]
            except (KeyError, TypeError):
                raise ValueError(f"image {i} ({image_id!r}): label {label!r} has no category id") from None
            results.append({"image_id": image_id, "category_id": category_id, "bbox": box, "score": score})
    return results


def json_safe(value: Any) -> Any:
    """Metrics as JSON takes them: ``nan`` (nothing to measure) becomes None, recursively."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
