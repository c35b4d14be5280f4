"""Pseudo-box quality on the built-in sample set's held-out images: CAM boxes (both
presets) against the whole-image and centred-box baselines.

    python jobs/make_sample.py --output sample_data
    python jobs/train_classifier.py --data sample_data/images --class-map sample_data/classes.txt --output cls_run
    python benchmarks/eval_sample_quality.py --sample sample_data --run cls_run [--scales 96 192]

The sample's 128 px images and 96 px training crops stand to (96, 192) as ImageNet's
~400 px images and 224 px crops stand to the paper's (288, 576).
"""

import argparse
import json
import time
from pathlib import Path

from dap_ray.data.images import decode_image, list_image_folder
from dap_ray.evaluation.localisation import (
    centre_baseline,
    load_coco_boxes,
    localisation_quality,
    whole_image_baseline,
)
from dap_ray.localisation.boxes import BoxConfig, cam_to_boxes_batch
from dap_ray.localisation.cam import CamExtractor
from dap_ray.models.classifiers import load_classifier
from dap_ray.steps.classify import split_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", required=True, help="folder written by jobs/make_sample.py")
    parser.add_argument("--run", required=True, help="folder written by jobs/train_classifier.py")
    parser.add_argument("--scales", type=int, nargs="+", default=[96, 192])
    args = parser.parse_args()
    sample, run = Path(args.sample), Path(args.run)
    meta = json.loads((run / "meta.json").read_text())
    listing = list_image_folder(sample / "images", sample / "classes.txt")
    _, val = split_items(listing.items, meta["config"]["val_fraction"], meta["config"]["seed"])
    truth, sizes = load_coco_boxes(sample / "gt_boxes.json")
    keys = [path for path, _ in val]
    images = [decode_image((sample / "images" / k).read_bytes()) for k in keys]
    model = load_classifier(meta["arch"], weights=run / "classifier.pt", num_classes=meta["num_classes"])
    start = time.perf_counter()
    cams = CamExtractor(model, scales=args.scales)(images, [label for _, label in val])
    print(f"{meta['arch']} (val top-1 {meta['val_top1']:.3f}), {len(keys)} held-out images, scales {args.scales}, "
          f"CAMs at {len(keys) / (time.perf_counter() - start):.1f} images/s")
    rows = {}
    for preset in ("official", "paper"):
        boxes = cam_to_boxes_batch(cams, [sizes[k] for k in keys], BoxConfig.from_preset(preset, scale=max(args.scales)))
        rows[f"CAM boxes, {preset}"] = localisation_quality(dict(zip(keys, boxes)), truth)
    val_sizes = {k: sizes[k] for k in keys}
    rows["whole image"] = localisation_quality(whole_image_baseline(val_sizes), truth)
    rows["centred box of median size"] = localisation_quality(centre_baseline(val_sizes, truth), truth)
    print(f"| {'boxes':<26} | CorLoc | any hit | mean best IoU | boxes/image |")
    print(f"| {'-' * 26} | ---: | ---: | ---: | ---: |")
    for name, q in rows.items():
        print(f"| {name:<26} | {q['corloc']:.3f} | {q['any_hit']:.3f} | {q['mean_best_iou']:.3f} | {q['boxes_per_image']:.2f} |")


if __name__ == "__main__":
    main()
