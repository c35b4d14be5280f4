import json

import numpy as np
import pytest
from PIL import Image

from dap_ray.data.sample import (
    SHAPES,
    SampleConfig,
    make_sample_dataset,
    render_sample_image,
)
from dap_ray.evaluation.localisation import load_coco_boxes


def test_sample_set_layout_and_true_boxes(tmp_path):
    out = make_sample_dataset(tmp_path / "s", SampleConfig(num_images=24, num_classes=4, image_size=64, seed=3))
    classes = (out / "classes.txt").read_text().split()
    assert classes == list(SHAPES[:4])
    truth, sizes = load_coco_boxes(out / "gt_boxes.json")
    assert len(truth) == 24
    coco = json.loads((out / "gt_boxes.json").read_text())
    assert {c["id"] for c in coco["categories"]} == {1, 2, 3, 4}
    labels = {img["id"]: img["file_name"].split("/")[0] for img in coco["images"]}
    for ann in coco["annotations"]:
        assert classes[ann["category_id"] - 1] == labels[ann["image_id"]]
    multi = 0
    for file_name, boxes in truth.items():
        path = out / "images" / file_name
        width, height = Image.open(path).size
        assert sizes[file_name] == (width, height) and min(width, height) == 64
        assert len(boxes) >= 1 and boxes.dtype == np.float32
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 8).all()
        multi += len(boxes) > 1
    assert multi >= 1  # some images show several objects


def test_same_seed_same_set_other_seed_other_set(tmp_path):
    config = SampleConfig(num_images=6, num_classes=3, image_size=48, seed=1)
    a = make_sample_dataset(tmp_path / "a", config)
    b = make_sample_dataset(tmp_path / "b", config)
    c = make_sample_dataset(tmp_path / "c", SampleConfig(num_images=6, num_classes=3, image_size=48, seed=2))
    assert (a / "gt_boxes.json").read_bytes() == (b / "gt_boxes.json").read_bytes()
    files = sorted(p.relative_to(a) for p in (a / "images").rglob("*.jpg"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "gt_boxes.json").read_bytes() != (c / "gt_boxes.json").read_bytes()


def test_objects_differ_from_the_background_inside_their_boxes():
    rng = np.random.default_rng(0)
    image, boxes = render_sample_image(rng, label=2, short_side=96)
    assert image.dtype == np.uint8 and image.ndim == 3 and len(boxes) >= 1
    x1, y1, x2, y2 = boxes[0].astype(int)
    inside = image[y1:y2, x1:x2].reshape(-1, 3).astype(float)
    assert inside.std(axis=0).sum() > 10  # a painted object, not empty background


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(num_images=0), "num_images"), (dict(num_classes=0), "num_classes"),
     (dict(num_classes=len(SHAPES) + 1), "num_classes"), (dict(image_size=8), "image_size")],
)
def test_bad_sample_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SampleConfig(**kwargs)
