"""CAM boxes from a classifier trained on the sample beat trivial baselines on CorLoc."""

import numpy as np

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

# The sample's 128 px images and 96 px training crops stand to (96, 192) as ImageNet's
# ~400 px images and 224 px crops stand to the paper's (288, 576).
SAMPLE_SCALES = (96, 192)


def test_classifier_learned_and_cam_boxes_beat_baselines(trained_sample):
    sample, run, meta = trained_sample
    assert meta["val_top1"] >= 0.8, meta["history"]
    listing = list_image_folder(sample / "images", sample / "classes.txt")
    _, val = split_items(listing.items, 0.1, seed=0)  # images the classifier never trained on
    truth, sizes = load_coco_boxes(sample / "gt_boxes.json")
    keys = [path for path, _ in val]
    images = [decode_image((sample / "images" / path).read_bytes()) for path in keys]
    model = load_classifier("tests.factories:tiny_resnet", weights=run / "classifier.pt", num_classes=6)
    cams = CamExtractor(model, scales=SAMPLE_SCALES)(images, [label for _, label in val])
    boxes = cam_to_boxes_batch(cams, [sizes[k] for k in keys], BoxConfig(scale=max(SAMPLE_SCALES)))
    cam_quality = localisation_quality(dict(zip(keys, boxes)), truth)
    val_sizes = {k: sizes[k] for k in keys}
    whole = localisation_quality(whole_image_baseline(val_sizes), truth)
    centre = localisation_quality(centre_baseline(val_sizes, truth), truth)
    print(f"CAM {cam_quality}\nwhole image {whole}\ncentre {centre}")
    assert cam_quality["corloc"] >= max(whole["corloc"], centre["corloc"]) + 0.1
    assert cam_quality["mean_best_iou"] > max(whole["mean_best_iou"], centre["mean_best_iou"])
    assert 1.5 <= cam_quality["boxes_per_image"] <= 6 and np.isfinite(cam_quality["mean_best_iou"])
