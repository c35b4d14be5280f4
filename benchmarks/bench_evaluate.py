"""Detection evaluation time on COCO-sized synthetic input: 5,000 images, 80 classes, about
7.3 ground-truth boxes per image (as COCO val2017) and 100 detections per image.

    python benchmarks/bench_evaluate.py [--images 5000] [--detections-per-image 100] [--classes 80]

Times, each once, wall clock (the copies pycocotools and faster-coco-eval need are made untimed):
    pycocotools COCOeval (loadRes, evaluate, accumulate, summarize), as its docs run it;
    dap_ray coco_metrics (the input checks, repaired copies, then the same COCOeval);
    dap_ray voc_metrics (VOC AP50, area and 11-point);
    faster-coco-eval's COCOeval_faster, if it is installed (it is not a dependency of the
    project: `pip install faster-coco-eval`), and whether its six AP figures equal
    pycocotools'; without it that row is skipped with a note.
"""

import argparse
import contextlib
import copy
import io
import time

import numpy as np

from dap_ray.evaluation import coco_metrics, voc_metrics

COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def synthetic(images: int, per_image: int, classes: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """A COCO ground truth (640x480 images; Poisson(7.3) boxes each, log-uniform sizes from 4
    to 500 px, 1% crowd) and ``per_image`` detections per image: 1-2 jittered copies of each
    true box (15% with a wrong class), the rest random boxes and classes at lower scores."""
    rng = np.random.default_rng(seed)
    anns, dets = [], []
    for image_id in range(1, images + 1):
        n = min(int(rng.poisson(7.3)), per_image // 2)
        wh = np.exp(rng.uniform(np.log(4), np.log(500), (n, 2)))
        wh = np.minimum(wh, [640, 480])
        xy = rng.uniform(0, 1, (n, 2)) * ([640, 480] - wh)
        cats = rng.integers(1, classes + 1, n)
        crowd = rng.random(n) < 0.01
        for box, cat, c in zip(np.concatenate([xy, wh], 1).tolist(), cats.tolist(), crowd.tolist()):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": int(c)})
        copies = rng.integers(1, 3, n)
        src = np.repeat(np.arange(n), copies)
        jitter = rng.normal(0, 0.1, (len(src), 4)) * np.tile(wh[src], 2)
        hit = np.concatenate([xy[src], wh[src]], 1) + jitter
        hit[:, 2:] = np.abs(hit[:, 2:])
        hit_cats = np.where(rng.random(len(src)) < 0.85, cats[src], rng.integers(1, classes + 1, len(src)))
        hit_scores = rng.uniform(0.3, 1.0, len(src))
        rest = per_image - len(src)
        rwh = np.exp(rng.uniform(np.log(4), np.log(400), (rest, 2)))
        rxy = rng.uniform(0, 1, (rest, 2)) * np.maximum([640, 480] - rwh, 0)
        boxes = np.concatenate([hit, np.concatenate([rxy, rwh], 1)])
        labels = np.concatenate([hit_cats, rng.integers(1, classes + 1, rest)])
        scores = np.concatenate([hit_scores, rng.uniform(0.05, 0.6, rest)])
        for box, cat, score in zip(boxes.tolist(), labels.tolist(), scores.tolist()):
            dets.append({"image_id": image_id, "category_id": cat, "bbox": box, "score": score})
    gt = {"info": {}, "images": [{"id": i, "width": 640, "height": 480} for i in range(1, images + 1)],
          "categories": [{"id": k, "name": f"class{k}"} for k in range(1, classes + 1)], "annotations": anns}
    return gt, dets


def run_cocoeval(coco_cls, eval_cls, gt: dict, dets: list[dict]) -> np.ndarray:
    """COCOeval's six AP figures in percent; ``gt`` and ``dets`` are fresh copies it may change."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = coco_cls()
        coco.dataset = gt
        coco.createIndex()
        res = coco.loadRes(dets)
        ev = eval_cls(coco, res, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats[:6]) * 100


def timed(label: str, fn):
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    print(f"{label:<46} {seconds:8.2f} s", flush=True)
    return out, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections-per-image", type=int, default=100)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gt, dets = synthetic(args.images, args.detections_per_image, args.classes, args.seed)
    print(f"{len(gt['images'])} images, {len(gt['categories'])} classes, {len(gt['annotations'])} ground-truth "
          f"boxes, {len(dets)} detections")

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    inputs = copy.deepcopy((gt, dets))  # loadRes writes into the detections: untimed copies
    reference, t_ref = timed("pycocotools COCOeval", lambda: run_cocoeval(COCO, COCOeval, *inputs))
    ours, _ = timed("dap_ray coco_metrics (checks, copies, COCOeval)", lambda: coco_metrics(gt, dets))
    voc, t_voc = timed("dap_ray voc_metrics (area + 11-point)", lambda: voc_metrics(gt, dets))
    try:
        import faster_coco_eval
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        fast = None
        print(f"{'faster-coco-eval':<46}  skipped: not installed (pip install faster-coco-eval)")
    else:
        inputs = copy.deepcopy((gt, dets))
        fast, t_fast = timed(f"faster-coco-eval {faster_coco_eval.__version__} COCOeval_faster",
                             lambda: run_cocoeval(FasterCOCO, COCOeval_faster, *inputs))

    print()
    print(f"{'':<16}" + "".join(f"{k:>20}" for k in COCO_KEYS))
    print(f"{'pycocotools':<16}" + "".join(f"{v:>20.15g}" for v in reference))
    print(f"{'coco_metrics':<16}" + "".join(f"{ours[k]:>20.15g}" for k in COCO_KEYS))
    same = all(ours[k] == float(v) for k, v in zip(COCO_KEYS, reference))
    print(f"coco_metrics equals pycocotools exactly: {same}")
    if fast is not None:
        print(f"{'faster-coco-eval':<16}" + "".join(f"{v:>20.15g}" for v in fast))
        print(f"faster-coco-eval equals pycocotools exactly: {bool(np.array_equal(fast, reference))}; "
              f"largest difference {np.max(np.abs(fast - reference)):.3g} points; "
              f"{t_ref / t_fast:.1f}x pycocotools' speed")
    print(f"VOC_AP50 {voc['VOC_AP50']:.4f}, VOC07_AP50 {voc['VOC07_AP50']:.4f}; "
          f"voc_metrics at {t_ref / t_voc:.1f}x pycocotools' speed")


if __name__ == "__main__":
    main()
