"""A built-in downstream detection set for Step 4, written both as COCO and as Pascal VOC.

Its classes are shapes the Step 1/3 sample set never draws (:data:`dap_ray.data.sample.EXTRA_SHAPES`),
each with its own fill pattern, so a detector pre-trained on that sample meets new classes,
as DAP's pre-trained detectors meet COCO's and VOC's. An image shows one to four objects of
any classes, at varied sizes, some cut by the image's border, overlapping a little, on the
same cluttered backgrounds as the Step 1 sample. Objects that are small or mostly cut off
are marked ``difficult``, as VOC marks hard objects.

Deterministic for a seed: image i of a split is drawn from its own ``(seed, split, i)``
random stream, and the same seed writes the same bytes.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dap_ray.data.sample import draw_background, paint_pattern, shape_mask

__all__ = ["DOWNSTREAM_CLASSES", "DownstreamSampleConfig", "make_downstream_sample", "render_downstream_image"]

# (class name = shape, fill pattern): shapes the Step 1 sample never draws, and patterns
# from past the first six (those of the Step 1 sample's default six classes) or new ones.
# Sorted by name, so that load_voc's default class order (the sorted names found) is the
# COCO file's category order and both loaders give the same labels.
DOWNSTREAM_CLASSES = (
    ("chevron", "crosshatch"), ("frame", "zigzag"), ("heart", "grid"),
    ("hourglass", "bigdots"), ("lshape", "hbands"), ("semicircle", "diamonds"),
)

# An object is difficult when its box's short side is under this fraction of the image's
# short side, or when less than VISIBLE_MIN of its shape lies inside the image.
SMALL_FRACTION = 0.1
VISIBLE_MIN = 0.6


@dataclass(frozen=True)
class DownstreamSampleConfig:
    """What to generate. Defaults: 450 small images, a few seconds on 2 cores."""

    num_train: int = field(default=300, metadata={"help": "images in the training split (COCO train.json, "
                                                          "VOC trainval)"})
    num_test: int = field(default=150, metadata={"help": "images in the test split (COCO test.json, VOC test)"})
    num_classes: int = field(default=5, metadata={"help": f"classes, up to {len(DOWNSTREAM_CLASSES)}"})
    image_size: int = field(default=128, metadata={"help": "smallest short side in pixels; short sides range up "
                                                           "to 1.25 times it"})
    seed: int = field(default=0, metadata={"help": "the same seed gives the same files"})

    def __post_init__(self) -> None:
        if self.num_train < 1 or self.num_test < 1:
            raise ValueError(f"num_train and num_test must be at least 1, got {self.num_train}, {self.num_test}")
        if not 1 <= self.num_classes <= len(DOWNSTREAM_CLASSES):
            raise ValueError(f"num_classes must be between 1 and {len(DOWNSTREAM_CLASSES)}, got {self.num_classes}")
        if self.image_size < 64:
            raise ValueError(f"image_size must be at least 64 pixels, got {self.image_size}")


def make_downstream_sample(output: str | Path, config: DownstreamSampleConfig = DownstreamSampleConfig()) -> Path:
    """Write the downstream sample under ``output`` and return that path.

    Layout, the same images and boxes twice:

    - COCO: ``coco/train.json`` and ``coco/test.json`` (image ids 1..n per split, category
      id = label + 1, xywh ``bbox``, ``area``, ``iscrowd`` 0, and ``difficult`` 0/1 as an
      extra key), images ``images/<voc id>.jpg`` (``file_name`` relative to ``images/``).
    - VOC: ``VOCdevkit/VOC2007/{Annotations,ImageSets/Main,JPEGImages}`` with
      ``trainval.txt`` and ``test.txt``; XML boxes are VOC's 1-based inclusive integer
      corners (xmin = x1 + 1, xmax = x2 for a continuous box x1..x2), with ``difficult``
      and ``truncated``.

    Plus ``classes.txt`` (line k is label k) and ``downstream_config.json``. VOC ids run
    ``000001``.. over the training split, then the test split.
    """
    output = Path(output)
    voc = output / "VOCdevkit" / "VOC2007"
    for folder in (output / "coco", output / "images", voc / "Annotations", voc / "ImageSets" / "Main",
                   voc / "JPEGImages"):
        folder.mkdir(parents=True, exist_ok=True)
    classes = [name for name, _ in DOWNSTREAM_CLASSES[: config.num_classes]]
    next_id = 1
    for split, coco_name, voc_split, count in ((0, "train", "trainval", config.num_train),
                                               (1, "test", "test", config.num_test)):
        images, annotations, voc_ids = [], [], []
        for i in range(count):
            rng = np.random.default_rng([config.seed, split, i])
            image, boxes, labels, difficult, truncated = render_downstream_image(
                rng, config.num_classes, config.image_size)
            voc_id = f"{next_id:06d}"
            next_id += 1
            ok, encoded = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
            if not ok:  # pragma: no cover - OpenCV's JPEG encoder does not fail on uint8 RGB
                raise RuntimeError(f"could not encode image {voc_id}")
            for folder in (output / "images", voc / "JPEGImages"):
                (folder / f"{voc_id}.jpg").write_bytes(encoded.tobytes())
            height, width = image.shape[:2]
            image_id = i + 1
            images.append({"id": image_id, "file_name": f"{voc_id}.jpg", "width": width, "height": height})
            for box, label, diff in zip(boxes.tolist(), labels.tolist(), difficult.tolist()):
                x1, y1, x2, y2 = box
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                    "area": float((x2 - x1) * (y2 - y1)), "iscrowd": 0, "difficult": int(diff),
                })
            (voc / "Annotations" / f"{voc_id}.xml").write_bytes(
                _voc_xml(voc_id, width, height, [classes[k] for k in labels], boxes, difficult, truncated))
            voc_ids.append(voc_id)
        coco = {
            "info": {"description": f"dap_ray downstream sample, {coco_name} split", **asdict(config)},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": [{"id": k + 1, "name": name, "supercategory": "shape", "pattern": pattern}
                           for k, (name, pattern) in enumerate(DOWNSTREAM_CLASSES[: config.num_classes])],
        }
        (output / "coco" / f"{coco_name}.json").write_text(json.dumps(coco))
        (voc / "ImageSets" / "Main" / f"{voc_split}.txt").write_text("".join(f"{v}\n" for v in voc_ids))
    (output / "classes.txt").write_text("".join(f"{name}\n" for name in classes))
    (output / "downstream_config.json").write_text(json.dumps(asdict(config), indent=2))
    return output


def render_downstream_image(
    rng: np.random.Generator, num_classes: int, image_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One (H, W, 3) uint8 RGB image and its objects.

    Returns the image, (N, 4) int64 xyxy boxes in continuous pixels (tight around each
    object's visible part: x2 is one past its last column), (N,) int64 labels, (N,) bool
    difficult and (N,) bool truncated (cut by the image's border). N is 1 to 4.
    """
    short_side = int(rng.integers(image_size, round(image_size * 1.25) + 1))
    aspect = rng.choice([1.0, 4 / 3, 3 / 4, 3 / 2])
    if aspect >= 1:
        width, height = round(short_side * aspect), short_side
    else:
        width, height = short_side, round(short_side / aspect)
    image = draw_background(rng, width, height)
    count = int(rng.choice([1, 2, 3, 4], p=[0.35, 0.3, 0.2, 0.15]))
    placed: list[tuple[int, int, int, int]] = []
    boxes, labels, difficult, truncated = [], [], [], []
    for _ in range(count):
        label = int(rng.integers(num_classes))
        for _attempt in range(20):
            side = rng.uniform(0.1, 0.55) * short_side
            stretch = rng.uniform(0.65, 1.5)
            w = min(max(6, int(side * np.sqrt(stretch))), width - 2)
            h = min(max(6, int(side / np.sqrt(stretch))), height - 2)
            # Up to 45% of the box may stick out of the image, so some objects are cut off.
            x = int(rng.integers(-int(0.45 * w), width - w + int(0.45 * w) + 1))
            y = int(rng.integers(-int(0.45 * h), height - h + int(0.45 * h) + 1))
            if all(_overlap((x, y, x + w, y + h), b) < 0.15 for b in placed):
                break
        else:
            continue
        shape, pattern = DOWNSTREAM_CLASSES[label]
        mask = shape_mask(shape, w, h, rng)
        vx1, vy1, vx2, vy2 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        visible = mask[vy1 - y : vy2 - y, vx1 - x : vx2 - x]
        ys, xs = np.nonzero(visible)
        if len(xs) == 0:
            continue
        paint_pattern(image[vy1:vy2, vx1:vx2], visible, rng, pattern)
        placed.append((x, y, x + w, y + h))
        box = (vx1 + xs.min(), vy1 + ys.min(), vx1 + xs.max() + 1, vy1 + ys.max() + 1)
        shown = len(xs) / mask.sum()
        boxes.append(box)
        labels.append(label)
        truncated.append(shown < 1.0)
        difficult.append(min(box[2] - box[0], box[3] - box[1]) < SMALL_FRACTION * short_side or shown < VISIBLE_MIN)
    return (image, np.asarray(boxes, np.int64).reshape(-1, 4), np.asarray(labels, np.int64),
            np.asarray(difficult, bool), np.asarray(truncated, bool))


def _overlap(a, b) -> float:
    """Intersection over the smaller box's area."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def _voc_xml(voc_id: str, width: int, height: int, names: list[str], boxes: np.ndarray, difficult: np.ndarray,
             truncated: np.ndarray) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{voc_id}.jpg"
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "dap_ray downstream sample"
    size = ET.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for name, (x1, y1, x2, y2), diff, trunc in zip(names, boxes.tolist(), difficult.tolist(), truncated.tolist()):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(trunc))
        ET.SubElement(obj, "difficult").text = str(int(diff))
        bndbox = ET.SubElement(obj, "bndbox")
        # VOC's corners are 1-based and inclusive: pixel columns x1..x2-1 are 1-based x1+1..x2.
        for key, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bndbox, key).text = str(int(value))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=False) + b"\n"
