"""Detection metrics: VOC AP by hand and against a straight per-detection loop, COCO AP against
pycocotools' COCOeval to the last digit, the COCO pitfalls, bad input and the CLI."""

import contextlib
import copy
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dap_ray.evaluation import (
    coco_metrics,
    detections_to_coco_results,
    evaluate_detections,
    voc_ap,
    voc_metrics,
)

ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")


def same(a, b):
    """Exact float equality, nan equal to nan."""
    return (math.isnan(a) and math.isnan(b)) or a == b


def coco_gt(annotations, images=(1, 2), categories=("cat", "dog", "bird")):
    return {
        "images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in images],
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(categories)],
        "annotations": annotations,
    }


def ann(image_id, category_id, bbox, **extra):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(bbox), **extra}


def det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(bbox), "score": score}


# ----------------------------------------------------------------------------- VOC by hand

# Classes cat (1), dog (2), bird (3); images 1 and 2; boxes below are xywh.
HAND_GT = coco_gt([
    ann(1, 1, [0, 0, 10, 10]),                  # A: cat, image 1
    ann(1, 1, [20, 0, 10, 10], difficult=1),    # B: cat, image 1, difficult
    ann(2, 1, [0, 0, 10, 10]),                  # C: cat, image 2
    ann(1, 2, [50, 50, 50, 50]),                # D: dog, image 1
    ann(2, 3, [0, 0, 10, 10], difficult=1),     # E: bird, image 2, difficult (bird has no positives)
])
HAND_DETS = [
    det(1, 1, [0, 0, 10, 10], 0.9),    # d1 cat: IoU 1 with A -> TP
    det(1, 1, [1, 0, 10, 10], 0.8),    # d2 cat: IoU 9/11 with A, already taken -> FP (duplicate)
    det(1, 1, [20, 0, 10, 10], 0.7),   # d3 cat: IoU 1 with difficult B -> neither TP nor FP
    det(2, 1, [0, 0, 10, 5], 0.6),     # d4 cat: IoU 50/100 = 0.5 exactly with C -> FP (needs > 0.5)
    det(2, 1, [0, 0, 10, 6], 0.6),     # d5 cat: IoU 0.6 with C -> TP; ties d4, comes after it (stable)
    det(2, 2, [0, 0, 10, 6], 0.9),     # d6 dog: image 2 has no dog -> FP
    det(1, 2, [50, 50, 50, 50], 0.5),  # d7 dog: IoU 1 with D -> TP
    det(2, 3, [0, 0, 10, 10], 0.5),    # d8 bird: matches difficult E; bird has no positives
]
# cat, npos = 2 (A, C), order d1 d2 d3 d4 d5:
#   tp cumsum 1 1 1 1 2, fp cumsum 0 1 1 2 2 -> recall .5 .5 .5 .5 1, precision 1 .5 .5 1/3 .5
#   area: envelope 1 up to recall .5, then .5 -> .5 * 1 + .5 * .5 = 0.75 -> 75
#   11-point: t = 0 .. 0.5 (6 points) max precision 1; t = 0.6 .. 1.0 (5 points) .5
#             -> (6 + 2.5) / 11 = 8.5 / 11 = 77.2727...%  (differs from the area value)
#   (were d5 sorted before d4, precision at recall 1 would be 2/3 and the area 83.33: the tie matters)
# dog, npos = 1, order d6 d7: recall 0 1, precision 0 .5 -> area 50, 11-point 50
# bird: no positives -> nan, left out of the means
# means: VOC_AP50 = (75 + 50) / 2 = 62.5; VOC07_AP50 = (850/11 + 50) / 2 = 63.6363...
CAT_07 = 850 / 11


@pytest.mark.parametrize(("annotations", "dets", "expected"), [
    # the empty case: no ground truth, no detections -> nothing to measure
    ([], [], {"VOC_AP50": NAN, "VOC07_AP50": NAN, "cat": (NAN, NAN)}),
    # ground truth, no detections -> 0
    ([ann(1, 1, [0, 0, 10, 10])], [], {"VOC_AP50": 0.0, "VOC07_AP50": 0.0, "cat": (0.0, 0.0)}),
    # one perfect detection -> 100
    ([ann(1, 1, [0, 0, 10, 10])], [det(1, 1, [0, 0, 10, 10], 0.5)],
     {"VOC_AP50": 100.0, "VOC07_AP50": 100.0, "cat": (100.0, 100.0), "dog": (NAN, NAN)}),
    # IoU exactly 0.5 is not a match; just above is
    ([ann(1, 1, [0, 0, 10, 10])], [det(1, 1, [0, 0, 10, 5], 0.5)], {"VOC_AP50": 0.0, "VOC07_AP50": 0.0}),
    ([ann(1, 1, [0, 0, 10, 10])], [det(1, 1, [0, 0, 10, 5.001], 0.5)], {"VOC_AP50": 100.0, "VOC07_AP50": 100.0}),
    # only a difficult box: no positives; a detection on it changes nothing
    ([ann(1, 1, [0, 0, 10, 10], difficult=1)], [det(1, 1, [0, 0, 10, 10], 0.5)],
     {"VOC_AP50": NAN, "VOC07_AP50": NAN, "cat": (NAN, NAN)}),
    # a crowd box counts as difficult here: the detection on it is ignored, the other one finds B
    ([ann(1, 1, [0, 0, 10, 10], iscrowd=1), ann(1, 1, [50, 50, 10, 10])],
     [det(1, 1, [0, 0, 10, 10], 0.9), det(1, 1, [50, 50, 10, 10], 0.1)], {"VOC_AP50": 100.0}),
    # half the positives found, at precision 1: area .5; 11-point (6 * 1) / 11
    ([ann(1, 1, [0, 0, 10, 10]), ann(2, 1, [0, 0, 10, 10])], [det(1, 1, [0, 0, 10, 10], 0.5)],
     {"VOC_AP50": 50.0, "VOC07_AP50": 600 / 11}),
    # the hand-checked set above
    (HAND_GT["annotations"], HAND_DETS,
     {"VOC_AP50": 62.5, "VOC07_AP50": (CAT_07 + 50) / 2, "cat": (75.0, CAT_07), "dog": (50.0, 50.0),
      "bird": (NAN, NAN)}),
])
def test_voc_by_hand(annotations, dets, expected):
    out = voc_metrics(coco_gt(annotations), dets)
    for key, value in expected.items():
        got = (out["per_class"][key]["VOC_AP50"], out["per_class"][key]["VOC07_AP50"]) if key in out["per_class"] \
            else out[key]
        assert np.allclose(got, value, rtol=1e-12, atol=0, equal_nan=True), (key, got, value)
    assert list(out["per_class"]) == ["cat", "dog", "bird"]


def test_voc_tie_order_is_the_input_order():
    swapped = list(HAND_DETS)
    swapped[3], swapped[4] = swapped[4], swapped[3]  # d5 (TP) before d4 (FP) at the same score
    out = voc_metrics(HAND_GT, swapped)
    # recall .5 .5 .5 1 1, precision 1 .5 .5 2/3 .5 -> area .5 + .5 * 2/3
    assert out["per_class"]["cat"]["VOC_AP50"] == pytest.approx(100 * (0.5 + 1 / 3), rel=1e-12)


@pytest.mark.parametrize(("rec", "prec", "area", "points"), [
    ([], [], 0.0, 0.0),
    ([1.0], [1.0], 1.0, 1.0),
    ([0.5, 0.5, 1.0], [1.0, 0.5, 0.5], 0.75, 8.5 / 11),
    ([0.0, 1.0], [0.0, 0.5], 0.5, 0.5),
    ([0.25], [1.0], 0.25, 3 / 11),  # t = 0, .1, .2 reached
])
def test_voc_ap(rec, prec, area, points):
    assert voc_ap(np.array(rec), np.array(prec)) == pytest.approx(area, rel=1e-12, abs=0)
    assert voc_ap(np.array(rec), np.array(prec), use_07_metric=True) == pytest.approx(points, rel=1e-12, abs=0)


# ----------------------------------------------------------------------------- random sets


def random_set(seed=0, images=50, categories=5, crowd=0.08, difficult=0.0):
    """A COCO ground truth with varied box sizes, crowd (and optionally difficult) boxes, and
    detections: jittered copies of the truth (some relabelled, some duplicated), plus noise,
    with scores rounded to 2 decimals so that ties occur."""
    rng = np.random.default_rng(seed)
    names = [f"class{k}" for k in range(categories)]
    anns, dets = [], []
    for image_id in range(1, images + 1):
        for _ in range(rng.integers(0, 9)):
            w, h = np.exp(rng.uniform(np.log(4), np.log(400), 2))
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            box = [round(float(v), 2) for v in (x, y, w, h)]
            a = ann(image_id, int(rng.integers(1, categories + 1)), box, iscrowd=int(rng.random() < crowd))
            if difficult and rng.random() < difficult:
                a["difficult"] = 1
            anns.append(a)
            for _ in range(rng.choice([0, 1, 1, 1, 2])):
                jitter = np.array(box) + rng.normal(0, 0.12, 4) * np.array([w, h, w, h])
                jitter[2:] = np.abs(jitter[2:])
                cat = a["category_id"] if rng.random() < 0.85 else int(rng.integers(1, categories + 1))
                dets.append(det(image_id, cat, jitter.tolist(), round(float(rng.random()), 2)))
        for _ in range(rng.integers(0, 6)):
            w, h = np.exp(rng.uniform(np.log(4), np.log(300), 2))
            dets.append(det(image_id, int(rng.integers(1, categories + 1)),
                            [float(rng.uniform(0, 600)), float(rng.uniform(0, 440)), float(w), float(h)],
                            round(float(rng.random()) * 0.5, 2)))
    gt = {"info": {}, "images": [{"id": i, "width": 640, "height": 480} for i in range(1, images + 1)],
          "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)],
          "annotations": [{**a, "id": i + 1, "area": a["bbox"][2] * a["bbox"][3]} for i, a in enumerate(anns)]}
    return gt, dets


@pytest.fixture(scope="module")
def random_coco():
    gt, dets = random_set()
    assert sum(a["iscrowd"] for a in gt["annotations"]) > 0
    areas = [a["area"] for a in gt["annotations"]]
    assert min(areas) < 32**2 and max(areas) > 96**2
    return gt, dets


def pycocotools_eval(gt, dets, cat_ids=None):
    """COCOeval as its docs run it, on copies."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        res = coco.loadRes(copy.deepcopy(dets))
        ev = COCOeval(coco, res, "bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def test_coco_metrics_equal_cocoeval_to_the_last_digit(random_coco):
    gt, dets = random_coco
    before = copy.deepcopy((gt, dets))
    ours = coco_metrics(gt, dets)
    assert (gt, dets) == before  # inputs untouched
    stats = pycocotools_eval(gt, dets).stats
    for i, key in enumerate(["AP", "AP50", "AP75", "APs", "APm", "APl"]):
        assert stats[i] >= 0
        assert ours[key] == float(stats[i] * 100), key
    assert 5 < ours["AP"] < 95
    # per class: the summary of a COCOeval run on that category alone
    for cat in gt["categories"]:
        one = pycocotools_eval(gt, dets, cat_ids=[cat["id"]]).stats
        assert ours["per_class"][cat["name"]]["AP"] == float(one[0] * 100)
        assert ours["per_class"][cat["name"]]["AP50"] == float(one[1] * 100)


def test_coco_metrics_ignore_difficult():
    gt, dets = random_set(seed=2, images=20, difficult=0.3)
    plain = copy.deepcopy(gt)
    for a in plain["annotations"]:
        a.pop("difficult", None)
    assert any("difficult" in a for a in gt["annotations"])
    assert coco_metrics(gt, dets) == coco_metrics(plain, dets)


def voc_reference(gt, dets, thresh=0.5):
    """One detection at a time, as detectron2's voc_eval, with continuous boxes and a stable
    sort: category name -> (area AP, 11-point AP) in percent, for classes with positives."""
    out = {}
    for cat in gt["categories"]:
        recs, npos = {}, 0
        for a in gt["annotations"]:
            if a["category_id"] == cat["id"]:
                x, y, w, h = a["bbox"]
                r = recs.setdefault(a["image_id"], {"bbox": [], "difficult": [], "det": []})
                r["bbox"].append([x, y, x + w, y + h])
                hard = bool(a.get("difficult", 0) or a.get("iscrowd", 0))
                r["difficult"].append(hard)
                r["det"].append(False)
                npos += not hard
        if npos == 0:
            continue
        mine = [d for d in dets if d["category_id"] == cat["id"]]
        order = np.argsort(-np.array([d["score"] for d in mine], float), kind="stable")
        tp, fp = np.zeros(len(mine)), np.zeros(len(mine))
        for rank, j in enumerate(order):
            d = mine[j]
            x, y, w, h = d["bbox"]
            bb = np.array([x, y, x + w, y + h])
            r = recs.get(d["image_id"], {"bbox": [], "difficult": [], "det": []})
            ovmax, jmax = -np.inf, -1
            if r["bbox"]:
                g = np.array(r["bbox"])
                iw = np.maximum(np.minimum(g[:, 2], bb[2]) - np.maximum(g[:, 0], bb[0]), 0.0)
                ih = np.maximum(np.minimum(g[:, 3], bb[3]) - np.maximum(g[:, 1], bb[1]), 0.0)
                inters = iw * ih
                uni = (bb[2] - bb[0]) * (bb[3] - bb[1]) + (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]) - inters
                overlaps = inters / uni
                ovmax, jmax = np.max(overlaps), int(np.argmax(overlaps))
            if ovmax > thresh:
                if not r["difficult"][jmax]:
                    if not r["det"][jmax]:
                        tp[rank] = 1.0
                        r["det"][jmax] = True
                    else:
                        fp[rank] = 1.0
            else:
                fp[rank] = 1.0
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        rec = tp / float(npos)
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        # the devkit's curves, written out again
        mrec, mpre = np.concatenate(([0.0], rec, [1.0])), np.concatenate(([0.0], prec, [0.0]))
        for i in range(mpre.size - 1, 0, -1):
            mpre[i - 1] = max(mpre[i - 1], mpre[i])
        i = np.where(mrec[1:] != mrec[:-1])[0]
        area = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
        points = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            points = points + (np.max(prec[rec >= t]) if np.sum(rec >= t) else 0) / 11.0
        out[cat["name"]] = (area * 100, points * 100)
    return out


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_voc_metrics_equal_a_per_detection_loop(seed):
    gt, dets = random_set(seed=seed, images=40, difficult=0.15)
    ours = voc_metrics(gt, dets)
    ref = voc_reference(gt, dets)
    assert ref and len(ref) == sum(not math.isnan(v["VOC_AP50"]) for v in ours["per_class"].values())
    for name, (area, points) in ref.items():
        assert ours["per_class"][name]["VOC_AP50"] == area
        assert ours["per_class"][name]["VOC07_AP50"] == points
    assert ours["VOC_AP50"] == float(np.mean([a for a, _ in ref.values()]))
    assert ours["VOC07_AP50"] == float(np.mean([p for _, p in ref.values()]))


def test_voc_matching_works_in_small_chunks(monkeypatch, random_coco):
    from dap_ray.evaluation import detection

    gt, dets = random_coco
    whole = voc_metrics(gt, dets)
    monkeypatch.setattr(detection, "_PAIRS_PER_CHUNK", 7)
    assert voc_metrics(gt, dets) == whole


# ----------------------------------------------------------------------------- COCO pitfalls


@pytest.mark.parametrize(("annotations", "dets", "expected_ap"), [
    ([], [], NAN),  # nothing to measure
    ([ann(1, 1, [0, 0, 10, 10])], [], 0.0),  # zero detections: 0, not a crash in loadRes
    ([ann(1, 1, [0, 0, 10, 10])], [det(2, 2, [0, 0, 10, 10], 0.3)], 0.0),  # only wrong ones
    ([ann(1, 1, [0, 0, 10, 10])], [det(1, 1, [0, 0, 10, 10], 0.3)], 100.0),
])
def test_coco_small_cases(annotations, dets, expected_ap):
    out = coco_metrics(coco_gt(annotations), dets)
    # pycocotools' own sum of its 1.0 precisions comes to 99.99999999999997%
    assert out["AP"] == pytest.approx(expected_ap, rel=1e-12, nan_ok=True)
    assert math.isnan(out["APl"])  # no large ground truth here


def test_zero_detections_give_zero(random_coco):
    gt, _ = random_coco
    out = evaluate_detections(gt, [])
    for key in ["AP", "AP50", "AP75", "APs", "APm", "APl", "VOC_AP50", "VOC07_AP50"]:
        assert out[key] == 0.0, key
    assert out["detections"] == 0 and out["images"] == 50


def test_annotation_ids_from_zero_or_missing_are_renumbered(random_coco):
    gt, dets = random_coco
    reference = coco_metrics(gt, dets)
    from_zero = copy.deepcopy(gt)
    for i, a in enumerate(from_zero["annotations"]):
        a["id"] = i
    assert coco_metrics(from_zero, dets) == reference
    # the trap is real: pycocotools itself scores a match to id 0 as unmatched
    assert pycocotools_eval(from_zero, dets).stats[1] * 100 < reference["AP50"]
    missing = copy.deepcopy(gt)
    for a in missing["annotations"]:
        del a["id"]
    del missing["info"]
    assert coco_metrics(missing, dets) == reference


def test_area_and_iscrowd_come_from_the_file_when_present():
    box = [0, 0, 20, 20]  # 400 px: small by its bbox
    dets = [det(1, 1, box, 0.9)]
    small = coco_metrics(coco_gt([ann(1, 1, box)]), dets)
    assert small["APs"] == pytest.approx(100.0) and math.isnan(small["APl"])
    large = coco_metrics(coco_gt([ann(1, 1, box, area=100.0**2)]), dets)
    assert large["APl"] == pytest.approx(100.0) and math.isnan(large["APs"])
    # a crowd box alone is no positive: nothing to measure
    assert math.isnan(coco_metrics(coco_gt([ann(1, 1, box, iscrowd=1)]), dets)["AP"])


def test_detections_on_ground_truth_subset_images_count():
    # an image with no boxes still takes part (params.imgIds = every ground-truth image):
    # a false positive on it lowers AP
    gt = coco_gt([ann(1, 1, [0, 0, 10, 10])], images=(1, 2))
    good = [det(1, 1, [0, 0, 10, 10], 0.5)]
    assert coco_metrics(gt, good)["AP"] == pytest.approx(100.0)
    assert coco_metrics(gt, good + [det(2, 1, [0, 0, 10, 10], 0.9)])["AP"] < 99.0


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("dets", "message"), [
    ([det(1, 1, [0, 0, 1, 1], 0.5), det(1, 99, [0, 0, 1, 1], 0.5)], "detection 1: category_id 99"),
    ([det(7, 1, [0, 0, 1, 1], 0.5)], "detection 0: image_id 7"),
    ([det(1, 1, [0, 0, -1, 1], 0.5)], "detection 0: bbox has a negative width"),
    ([det(1, 1, [0, 0, 1], 0.5)], "detection 0: bbox must be 4"),
    ([det(1, 1, [0, 0, 1, 1], 0.5), det(1, 1, ["0", "0", "1", "1"], 0.5)], "detection 1: bbox must be 4 finite"),
    ([det(1, 1, [0, 0, 1, 1], 0.5), det(1, 1, [0, 0, True, 1], 0.5)], "detection 1: bbox must be 4 finite"),
    ([det(1, 1, [0, 0, 1, 1], "high")], "detection 0: score"),
    ([det(1, 1, [0, 0, 1, 1], 0.5), det([1], 1, [0, 0, 1, 1], 0.5)], r"detection 1: image_id \[1\]"),
    ([det(1, 1, [0, 0, 1, 1], 0.5), [1, 1, [0, 0, 1, 1], 0.5]], "detection 1: a detection must be an object"),
    ([det(1, 1, [0, 0, 1, 1], float("nan"))], "detection 0: score"),
    ([{"image_id": 1, "bbox": [0, 0, 1, 1], "score": 1}], "detection 0: no 'category_id'"),
    ({"image_id": 1}, "must be a list"),
])
def test_bad_detections_raise(dets, message):
    with pytest.raises(ValueError, match=message):
        evaluate_detections(coco_gt([ann(1, 1, [0, 0, 10, 10])]), dets)


def test_bulk_and_one_at_a_time_detection_reading_agree(random_coco):
    from dap_ray.evaluation import detection

    gt, dets = random_coco
    g = detection._load_ground_truth(gt)
    bulk = detection._detection_columns(dets, g)
    checked = detection._detection_columns_checked(dets, g, "detections")
    assert bulk is not None
    for a, b in zip(bulk, checked):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert detection._load_detections(dets, g).results(g) == [{**d, "score": float(d["score"])} for d in dets]


def test_bad_ground_truth_files_raise_naming_the_file(tmp_path):
    not_coco = tmp_path / "not_coco.json"
    not_coco.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match=r"not_coco\.json: not a COCO file \(no 'categories'"):
        coco_metrics(not_coco, [])
    negative = tmp_path / "negative.json"
    negative.write_text(json.dumps(coco_gt([ann(1, 1, [0, 0, 10, 10], id=5), ann(1, 1, [5, 5, -3, 4], id=6)])))
    with pytest.raises(ValueError, match=r"negative\.json: annotations\[1\] \(id 6\): bbox has a negative width"):
        voc_metrics(negative, [])
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json: ground truth is not valid JSON"):
        evaluate_detections(broken, [])
    with pytest.raises(ValueError, match="category_id 4 is not a category"):
        coco_metrics(coco_gt([ann(1, 4, [0, 0, 1, 1])]), [])


# ----------------------------------------------------------------------------- conversion


def test_detections_to_coco_results_round_trip():
    boxes = [np.array([[10, 20, 30, 60], [0.5, 0.5, 1.5, 2.5]], np.float32), np.zeros((0, 4), np.float32)]
    results = detections_to_coco_results([42, 7], boxes, [np.array([0.9, 0.2]), np.zeros(0)],
                                         [np.array([1, 0]), np.zeros(0, int)], [3, 18])
    assert results == [
        {"image_id": 42, "category_id": 18, "bbox": [10.0, 20.0, 20.0, 40.0], "score": pytest.approx(0.9)},
        {"image_id": 42, "category_id": 3, "bbox": [0.5, 0.5, 1.0, 2.0], "score": pytest.approx(0.2)},
    ]
    assert all(type(v) is float for r in results for v in r["bbox"])
    gt = coco_gt([ann(42, 18, [10, 20, 20, 40])], images=(42, 7), categories=())
    gt["categories"] = [{"id": 3, "name": "a"}, {"id": 18, "name": "b"}]
    assert coco_metrics(gt, results)["per_class"]["b"]["AP"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="label 2 has no category id"):
        detections_to_coco_results([1], [np.zeros((1, 4))], [np.ones(1)], [np.array([2])], [3, 18])
    with pytest.raises(ValueError, match="differ in length"):
        detections_to_coco_results([1, 2], [np.zeros((1, 4))], [np.ones(1)], [np.array([0])], [3])


# ----------------------------------------------------------------------------- all together and the CLI


def test_evaluate_detections_merges_both(random_coco):
    gt, dets = random_coco
    out = evaluate_detections(gt, dets)
    coco, voc = coco_metrics(gt, dets), voc_metrics(gt, dets)
    for key in ["AP", "AP50", "AP75", "APs", "APm", "APl"]:
        assert out[key] == coco[key]
    for key in ["VOC_AP50", "VOC07_AP50"]:
        assert out[key] == voc[key]
    for name, m in out["per_class"].items():
        assert set(m) == {"AP", "AP50", "VOC_AP50", "VOC07_AP50"}
        assert same(m["VOC_AP50"], voc["per_class"][name]["VOC_AP50"]) and same(m["AP"], coco["per_class"][name]["AP"])
    assert (out["images"], out["detections"], out["gt_boxes"]) == (50, len(dets), len(gt["annotations"]))


def run_cli(*args):
    return subprocess.run([sys.executable, "jobs/evaluate.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)


def test_cli_help():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "--detections" in result.stdout and "Score detections against a COCO ground truth" in result.stdout


def test_cli_writes_metrics(tmp_path):
    (tmp_path / "gt.json").write_text(json.dumps(HAND_GT))
    (tmp_path / "dets.json").write_text(json.dumps(HAND_DETS))
    output = tmp_path / "out" / "metrics.json"
    result = run_cli("--gt", str(tmp_path / "gt.json"), "--detections", str(tmp_path / "dets.json"),
                     "--output", str(output), "--per-class")
    assert result.returncode == 0, result.stderr
    assert "VOC07_AP50" in result.stdout and "62.50" in result.stdout
    metrics = json.loads(output.read_text())
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "VOC_AP50", "VOC07_AP50", "per_class",
            "images", "detections", "gt_boxes"} <= set(metrics)
    assert metrics["VOC_AP50"] == 62.5
    assert metrics["per_class"]["bird"]["VOC_AP50"] is None  # nan is written as null


@pytest.mark.parametrize(("content", "message"), [
    ('{"images": []}', "not a COCO file"),
    ("not json", "not valid JSON"),
    (None, "file not found"),
])
def test_cli_bad_input_exits_2(tmp_path, content, message):
    gt = tmp_path / "gt.json"
    if content is not None:
        gt.write_text(content)
    (tmp_path / "dets.json").write_text("[]")
    result = run_cli("--gt", str(gt), "--detections", str(tmp_path / "dets.json"), "--output", str(tmp_path / "m.json"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr and str(gt) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "m.json").exists()
