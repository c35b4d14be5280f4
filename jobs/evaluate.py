"""Score detections against a COCO ground truth: COCO AP (pycocotools) and PASCAL VOC AP50.

    python jobs/evaluate.py --gt GT.json --detections DETS.json --output metrics.json [--per-class]

GT.json: a COCO file (images, annotations with xywh bbox and optional iscrowd / difficult,
categories). DETS.json: COCO results, a list of {image_id, category_id, bbox (xywh, original
pixels), score}. Prints AP, AP50, AP75, APs, APm, APl, VOC_AP50 (area) and VOC07_AP50
(11-point), in percent, and writes them with per-class figures and counts to --output
(JSON; a metric with no ground truth to measure is null).
"""

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dap_ray.evaluation.detection import HEADLINE_METRICS, evaluate_detections, json_safe  # noqa: E402


def fmt(value: float) -> str:
    return "   n/a" if math.isnan(value) else f"{value:6.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gt", required=True, help="ground-truth COCO JSON file")
    parser.add_argument("--detections", required=True, help="detections, a COCO results JSON file")
    parser.add_argument("--output", required=True, help="metrics JSON file to write")
    parser.add_argument("--per-class", action="store_true", help="also print the per-class table")
    args = parser.parse_args()
    try:
        metrics = evaluate_detections(args.gt, args.detections)
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(json_safe(metrics), indent=2) + "\n")
    except (ValueError, OSError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"{metrics['images']} images, {metrics['categories']} categories, "
          f"{metrics['gt_boxes']} ground-truth boxes, {metrics['detections']} detections")
    print("  ".join(f"{k:>10}" for k in HEADLINE_METRICS))
    print("  ".join(f"{fmt(metrics[k]):>10}" for k in HEADLINE_METRICS))
    if args.per_class:
        width = max([len(n) for n in metrics["per_class"]] + [5])
        print(f"{'class':<{width}}  {'AP':>6}  {'AP50':>6}  {'VOC':>6}  {'VOC07':>6}")
        for name, m in metrics["per_class"].items():
            print(f"{name:<{width}}  {fmt(m['AP'])}  {fmt(m['AP50'])}  {fmt(m['VOC_AP50'])}  {fmt(m['VOC07_AP50'])}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
