"""Step 4's data: a labelled detection set (COCO or Pascal VOC) in memory, and its training samples.

:class:`DetectionSet` holds one set's images and true boxes as per-image arrays, boxes xyxy
float32 in continuous pixel coordinates of the original image (a box covering pixel
columns 0..9 is x1=0, x2=10); :func:`load_coco` and :func:`load_voc` build it and give the
same figures for the same data written in both formats. :class:`DetectionDataset` serves
it to a detector under the ``(index, short_side, flip)`` keys of
:class:`dap_ray.data.detection.AspectBatchSampler`. Plain Python/numpy/torch; no Ray.

Bad entries are skipped rather than fatal, and every skip is counted in the set's
``report`` with the first few examples naming the file and the entry; only input that
cannot be read at all (malformed JSON, missing top-level keys, a missing split list) raises
``ValueError``.
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dap_ray.data.detection import resize_with_boxes
from dap_ray.data.loading import ReplacingDataset

__all__ = ["VOC_CLASSES", "DetectionDataset", "DetectionSet", "load_coco", "load_voc"]

# Pascal VOC's 20 classes in the devkit's order (label k is VOC_CLASSES[k]).
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# How many examples the report keeps per reason: enough to find the pattern, not the whole list.
_EXAMPLES = 5


@dataclass(frozen=True, eq=False)
class DetectionSet:
    """One labelled detection set, held per image.

    Class level: ``classes`` (names; contiguous label k is ``classes[k]``) and
    ``category_ids`` (the annotation file's category id of each contiguous label, to map
    predictions back; VOC has none, so it is k + 1).

    Per image i, all tuples of length n: ``image_ids`` (n,) int64, the file's image id (VOC:
    see :func:`load_voc`); ``file_names`` as the file names it, relative to the image root;
    ``paths`` absolute; ``sizes`` (n, 2) int32 original (width, height); ``boxes[i]``
    (N_i, 4) float32 xyxy continuous pixels of the original image, empty (0, 4);
    ``labels[i]`` (N_i,) int64 contiguous 0-based; ``difficult[i]`` and ``iscrowd[i]``
    (N_i,) bool; ``areas[i]`` (N_i,) float32, the file's ``area`` where it gives one (a COCO
    segment's area, which COCO's small/medium/large split uses), else the box's;
    ``source_ids`` the image's own name in its source (VOC's id string such as ``000005``;
    COCO's id as a string).

    ``report``: what the loader skipped and why: ``{"source", "images", "boxes", "skipped":
    {reason: count}, "noted": {reason: count} (kept, but worth knowing), "examples":
    {reason: [first few, naming file and entry]}}``.

    Sequences are stored as tuples and checked here: a wrong shape, dtype-incompatible value,
    label out of range or box with x2 <= x1 raises ``ValueError`` naming the image.
    """

    classes: tuple[str, ...]
    category_ids: tuple[int, ...]
    image_ids: np.ndarray
    file_names: tuple[str, ...]
    paths: tuple[str, ...]
    sizes: np.ndarray
    boxes: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]
    difficult: tuple[np.ndarray, ...]
    iscrowd: tuple[np.ndarray, ...]
    areas: tuple[np.ndarray, ...] | None = None
    source_ids: tuple[str, ...] | None = None
    report: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalise once, here, where the set is built
        put(self, "classes", tuple(str(c) for c in self.classes))
        put(self, "category_ids", tuple(int(c) for c in self.category_ids))
        if len(self.category_ids) != len(self.classes):
            raise ValueError(f"{len(self.classes)} classes but {len(self.category_ids)} category ids")
        if len(set(self.category_ids)) != len(self.category_ids) or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes and category ids must be unique: {self.classes}, {self.category_ids}")
        image_ids = np.asarray(self.image_ids, dtype=np.int64).reshape(-1)
        n = len(image_ids)
        put(self, "image_ids", image_ids)
        if len(np.unique(image_ids)) != n:
            raise ValueError("image ids must be unique")
        sizes = np.asarray(self.sizes, dtype=np.int32)
        if sizes.shape != (n, 2) or (n and sizes.min() < 1):
            raise ValueError(f"sizes must be ({n}, 2) positive (width, height), got shape {sizes.shape}")
        put(self, "sizes", sizes)
        for name in ("file_names", "paths", "boxes", "labels", "difficult", "iscrowd"):
            value = tuple(getattr(self, name))
            if len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} images")
            put(self, name, value)
        put(self, "source_ids", tuple(str(v) for v in (self.source_ids or [str(i) for i in image_ids])))
        if len(self.source_ids) != n:
            raise ValueError(f"source_ids has {len(self.source_ids)} entries for {n} images")
        boxes, labels, difficult, iscrowd, areas = [], [], [], [], []
        for i in range(n):
            where = f"image {self.file_names[i]!r} (id {image_ids[i]})"
            b = np.asarray(self.boxes[i], dtype=np.float32)
            if b.ndim != 2 or b.shape[1] != 4:
                raise ValueError(f"{where}: boxes must be (N, 4) xyxy, got shape {b.shape}")
            m = len(b)
            if not np.isfinite(b).all() or ((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])).any():
                raise ValueError(f"{where}: boxes must be finite with x2 > x1 and y2 > y1")
            lab = np.asarray(self.labels[i], dtype=np.int64)
            if lab.shape != (m,) or (m and (lab.min() < 0 or lab.max() >= len(self.classes))):
                raise ValueError(f"{where}: labels must be ({m},) in [0, {len(self.classes)}), got {lab.tolist()}")
            flags = []
            for name, values in (("difficult", self.difficult[i]), ("iscrowd", self.iscrowd[i])):
                f = np.asarray(values)
                if f.shape != (m,):
                    raise ValueError(f"{where}: {name} must be ({m},), got shape {f.shape}")
                flags.append(f.astype(bool))
            if self.areas is None:
                a = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).astype(np.float32)
            else:
                a = np.asarray(self.areas[i], dtype=np.float32)
                if a.shape != (m,):
                    raise ValueError(f"{where}: areas must be ({m},), got shape {a.shape}")
            boxes.append(b)
            labels.append(lab)
            difficult.append(flags[0])
            iscrowd.append(flags[1])
            areas.append(a)
        for name, value in (("boxes", boxes), ("labels", labels), ("difficult", difficult), ("iscrowd", iscrowd),
                            ("areas", areas)):
            put(self, name, tuple(value))
        put(self, "report", dict(self.report))

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_boxes(self) -> int:
        return sum(len(b) for b in self.boxes)

    def subset(self, indices: Iterable[int]) -> DetectionSet:
        """The images at ``indices`` (in that order; each at most once), same classes and ids.

        The report is the whole set's, with ``"subset_of"`` (the whole set's image count) added.
        """
        chosen = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices).reshape(-1)
        if chosen.dtype == bool:
            raise ValueError("subset takes image indices, not a mask (use np.flatnonzero(mask))")
        chosen = chosen.astype(np.int64)
        if len(chosen) and (chosen.min() < 0 or chosen.max() >= len(self)):
            raise ValueError(f"subset indices must be in [0, {len(self)}), got {chosen.min()}..{chosen.max()}")
        if len(np.unique(chosen)) != len(chosen):
            raise ValueError("subset indices must not repeat: the same image twice would repeat its image id")

        def pick(values):
            return tuple(values[i] for i in chosen)

        return DetectionSet(
            classes=self.classes, category_ids=self.category_ids, image_ids=self.image_ids[chosen],
            file_names=pick(self.file_names), paths=pick(self.paths), sizes=self.sizes[chosen].reshape(-1, 2),
            boxes=pick(self.boxes), labels=pick(self.labels), difficult=pick(self.difficult),
            iscrowd=pick(self.iscrowd), areas=pick(self.areas), source_ids=pick(self.source_ids),
            report={**self.report, "subset_of": len(self)},
        )

    def training_targets(self, index: int, train_on_difficult: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Image ``index``'s boxes a detector trains on: (M, 4) float32 xyxy and (M,) int64
        contiguous labels. Crowd boxes never; difficult ones only if ``train_on_difficult``."""
        keep = ~self.iscrowd[index]
        if not train_on_difficult:
            keep &= ~self.difficult[index]
        return self.boxes[index][keep].reshape(-1, 4), self.labels[index][keep]

    def training_indices(self, train_on_difficult: bool = False) -> np.ndarray:
        """(m,) int64 indices of the images with at least one box to train on.

        Images without one are valid negatives for evaluation; torchvision's detectors accept
        them in training too, but detectron2 and maskrcnn-benchmark's COCO loader leave them
        out of training by default: ``subset(training_indices())`` does the same.
        """
        return np.asarray([i for i in range(len(self)) if len(self.training_targets(i, train_on_difficult)[1])],
                          np.int64)

    def to_coco(self) -> dict:
        """A COCO ground-truth dict that pycocotools and faster-coco-eval accept.

        Image ids and category ids are the file's; annotation ids run from 1 (pycocotools
        treats a match to id 0 as no match); ``bbox`` is xywh; ``area`` as in ``areas``;
        ``iscrowd`` 0/1 (pycocotools ignores crowd boxes); ``difficult`` 0/1 is an extra key
        pycocotools does not read (VOC's evaluator does). ``info`` is there because some
        pycocotools 2.0.x versions need it.
        """
        images, annotations = [], []
        for i in range(len(self)):
            image_id = int(self.image_ids[i])
            images.append({"id": image_id, "file_name": self.file_names[i],
                           "width": int(self.sizes[i, 0]), "height": int(self.sizes[i, 1])})
            for box, label, diff, crowd, area in zip(self.boxes[i].tolist(), self.labels[i].tolist(),
                                                     self.difficult[i].tolist(), self.iscrowd[i].tolist(),
                                                     self.areas[i].tolist()):
                x1, y1, x2, y2 = box
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": self.category_ids[label],
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": int(crowd), "difficult": int(diff),
                })
        return {
            "info": {"description": f"dap_ray DetectionSet from {self.report.get('source', 'memory')}"},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": [{"id": cid, "name": name} for cid, name in zip(self.category_ids, self.classes)],
        }


class _Report:
    """Counts of what a loader skipped (``skip``) or kept with a remark (``note``), with examples."""

    def __init__(self, source: str | Path):
        self.source = str(source)
        self.skipped: dict[str, int] = {}
        self.noted: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def skip(self, reason: str, example: str) -> None:
        self._count(self.skipped, reason, example)

    def note(self, reason: str, example: str) -> None:
        self._count(self.noted, reason, example)

    def _count(self, counts: dict[str, int], reason: str, example: str) -> None:
        counts[reason] = counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < _EXAMPLES:
            shown.append(example)

    def as_dict(self, images: int, boxes: int) -> dict:
        return {"source": self.source, "images": images, "boxes": boxes, "skipped": dict(self.skipped),
                "noted": dict(self.noted), "examples": {k: list(v) for k, v in self.examples.items()}}


def _clip_box(box: Sequence[float], width: int, height: int) -> tuple[list[float], bool] | None:
    """xyxy clipped to the image, whether clipping moved it; None if nothing is left inside."""
    x1, y1, x2, y2 = (min(max(v, 0.0), limit) for v, limit in zip(box, (width, height, width, height)))
    if x2 <= x1 or y2 <= y1:
        return None
    return [x1, y1, x2, y2], [x1, y1, x2, y2] != list(box)


def _image_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the image header (no decoding), None if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError):
        return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_coco(annotation_file: str | Path, image_root: str | Path, *, check_files: bool = True) -> DetectionSet:
    """A COCO-format detection set: ``annotation_file`` (JSON) with images under ``image_root``.

    Contiguous labels follow the categories sorted by id (detectron2's order);
    ``category_ids`` maps them back. Images keep the file's order and ids. Kept per box:
    ``iscrowd``, the file's ``area``, and ``difficult`` where the file carries it (an extra
    key, as :meth:`DetectionSet.to_coco` writes it; 0 when absent).

    Skipped and counted in ``report`` (examples name the file and the annotation or image
    id): annotations with an unknown ``category_id`` or ``image_id``, a malformed ``bbox``,
    a zero or negative width or height, or nothing left inside the image once clipped to it
    (boxes that stick out are clipped and noted); images whose entry is malformed or, when
    ``check_files``, whose file is missing (their annotations go with them). Images without
    annotations are kept: they are valid negatives (and are noted).

    Raises ``ValueError`` naming the file for unreadable or malformed JSON, missing
    ``images``/``annotations``/``categories``, malformed categories, or repeated image or
    category ids.
    """
    annotation_file, image_root = Path(annotation_file), Path(image_root)
    name = annotation_file.name
    try:
        data = json.loads(annotation_file.read_text())
    except FileNotFoundError:
        raise ValueError(f"COCO annotation file not found: {annotation_file}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{annotation_file} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{annotation_file} must hold a JSON object, got {type(data).__name__}")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise ValueError(f"{annotation_file} lacks the top-level list(s) {missing} of a COCO detection file")

    categories = {}
    for n, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or not isinstance(cat.get("name"), str):
            raise ValueError(f"{annotation_file}: categories[{n}] needs an integer 'id' and a 'name', got {cat!r}")
        if cat["id"] in categories:
            raise ValueError(f"{annotation_file}: category id {cat['id']} appears twice")
        categories[cat["id"]] = cat["name"]
    category_ids = sorted(categories)
    label_of = {cid: k for k, cid in enumerate(category_ids)}

    report = _Report(annotation_file)
    images: dict[int, dict] = {}
    skipped_images: set = set()
    seen_ids: set = set()
    for n, img in enumerate(data["images"]):
        image_id = img.get("id") if isinstance(img, dict) else None
        if isinstance(image_id, int) and not isinstance(image_id, bool):
            if image_id in seen_ids:
                raise ValueError(f"{annotation_file}: image id {image_id} appears twice")
            seen_ids.add(image_id)
        file_name = img.get("file_name") if isinstance(img, dict) else None
        if not isinstance(image_id, int) or isinstance(image_id, bool) or not isinstance(file_name, str):
            report.skip("malformed_image", f"{name}: images[{n}] needs an integer 'id' and a 'file_name': {img!r:.200}")
            if isinstance(image_id, (int, str)):
                skipped_images.add(image_id)
            continue
        path = os.path.abspath(image_root / file_name)
        if check_files and not os.path.isfile(path):
            report.skip("missing_image", f"{name}: image id {image_id}: {path} not found")
            skipped_images.add(image_id)
            continue
        width, height = img.get("width"), img.get("height")
        if not (_is_number(width) and _is_number(height) and width >= 1 and height >= 1):
            # Without a size the boxes cannot be checked: take it from the file's header.
            size = _image_size(path)
            if size is None:
                report.skip("malformed_image", f"{name}: image id {image_id}: no width/height and {path} unreadable")
                skipped_images.add(image_id)
                continue
            width, height = size
        images[image_id] = {"file_name": file_name, "path": path, "size": (int(width), int(height)), "anns": []}

    for n, ann in enumerate(data["annotations"]):
        ann_id = ann.get("id", f"#{n}") if isinstance(ann, dict) else f"#{n}"
        where = f"{name}: annotation id {ann_id}"
        if not isinstance(ann, dict):
            report.skip("malformed_annotation", f"{where}: not an object")
            continue
        image_id, category_id, bbox = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
        # Ids of the wrong type (lists, floats, booleans) match nothing, and must not reach a dict lookup.
        if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
            image_id = repr(image_id)
        if not isinstance(category_id, int) or isinstance(category_id, bool):
            category_id = repr(category_id)
        if image_id in skipped_images:
            report.skip("annotation_of_skipped_image", f"{where}: image id {image_id} was skipped")
            continue
        if image_id not in images:
            report.skip("unknown_image", f"{where}: image_id {image_id!r} is not in images")
            continue
        if category_id not in label_of:
            report.skip("unknown_category", f"{where}: category_id {category_id!r} is not in categories")
            continue
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            report.skip("malformed_annotation", f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            report.skip("empty_box", f"{where}: bbox {bbox} has zero or negative width or height")
            continue
        entry = images[image_id]
        clipped = _clip_box([x, y, x + w, y + h], *entry["size"])
        if clipped is None:
            report.skip("outside_image", f"{where}: bbox {bbox} lies outside the {entry['size'][0]}x"
                                         f"{entry['size'][1]} image {entry['file_name']}")
            continue
        box, moved = clipped
        if moved:
            report.note("clipped_box", f"{where}: bbox {bbox} clipped to the image")
        area = ann.get("area")
        if not (_is_number(area) and area > 0):
            area = (box[2] - box[0]) * (box[3] - box[1])
        entry["anns"].append((box, label_of[category_id], bool(ann.get("difficult", 0)), bool(ann.get("iscrowd", 0)),
                              float(area)))

    for image_id, entry in images.items():
        if not entry["anns"]:
            report.note("image_without_boxes", f"{name}: image id {image_id} ({entry['file_name']})")
    return _build(report, [str(categories[c]) for c in category_ids], category_ids,
                  [(image_id, e["file_name"], e["path"], e["size"], e["anns"], str(image_id))
                   for image_id, e in images.items()])


def _build(report: _Report, classes: list[str], category_ids: list[int], images: list[tuple]) -> DetectionSet:
    """A DetectionSet from (image id, file name, path, (w, h), [(xyxy, label, difficult,
    crowd, area), ...], source id) tuples."""
    def column(anns, k, dtype, shape):
        return np.asarray([a[k] for a in anns], dtype).reshape(shape)

    return DetectionSet(
        classes=tuple(classes), category_ids=tuple(category_ids),
        image_ids=np.asarray([im[0] for im in images], np.int64),
        file_names=tuple(im[1] for im in images), paths=tuple(im[2] for im in images),
        sizes=np.asarray([im[3] for im in images], np.int32).reshape(-1, 2),
        boxes=tuple(column(im[4], 0, np.float32, (-1, 4)) for im in images),
        labels=tuple(column(im[4], 1, np.int64, (-1,)) for im in images),
        difficult=tuple(column(im[4], 2, bool, (-1,)) for im in images),
        iscrowd=tuple(column(im[4], 3, bool, (-1,)) for im in images),
        areas=tuple(column(im[4], 4, np.float32, (-1,)) for im in images),
        source_ids=tuple(im[5] for im in images),
        report=report.as_dict(len(images), sum(len(im[4]) for im in images)),
    )


def load_voc(root: str | Path, splits: Sequence[tuple[str, str]] = (("2007", "trainval"),),
             classes: Sequence[str] | None = None) -> DetectionSet:
    """A Pascal VOC detection set from a ``VOCdevkit`` folder ``root``.

    ``splits``: (year, split) pairs, e.g. ``[("2007", "trainval"), ("2012", "trainval")]``
    (the paper's 07+12), each read from ``VOC<year>/ImageSets/Main/<split>.txt``, with
    ``Annotations/<id>.xml`` and ``JPEGImages/<id>.jpg`` beside it. Images come in split
    order; an image listed twice is kept once (noted).

    ``classes``: label k is ``classes[k]``. Default: the 20 VOC classes in the devkit's order
    when every name in the files is one of them, else the names found, sorted.
    ``category_ids`` are k + 1.

    Image ids are 1-based positions in the combined list of listed images, counted before
    anything is skipped, so an image keeps its id when another's files go missing;
    ``file_names`` are ``VOC2007/JPEGImages/000005.jpg`` (relative to ``root``) and
    ``source_ids`` VOC's id strings (``000005``).

    Boxes: the XML's 1-based inclusive pixel corners become continuous xyxy by subtracting
    1 from xmin and ymin (detectron2's convention; the box [1, 1, 10, 10] covers pixels
    0..9, so it becomes [0, 0, 10, 10]); ``difficult`` is kept (0 when absent), nobody is
    ``iscrowd``; ``areas`` are the boxes'.

    Skipped and counted in ``report``, with the file named: images whose XML or JPEG is
    missing or whose XML does not parse; objects of a class not in ``classes``, malformed
    objects, boxes with nothing inside the image (boxes sticking out are clipped and noted).
    An XML without objects (or with none left) is kept as an image without boxes and noted.
    A missing split list raises ``ValueError`` naming it.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"VOCdevkit folder not found: {root}")
    report = _Report(root)
    listed: list[tuple[str, str]] = []
    seen: set = set()
    for year, split in splits:
        list_file = root / f"VOC{year}" / "ImageSets" / "Main" / f"{split}.txt"
        if not list_file.is_file():
            raise ValueError(f"VOC split list not found: {list_file}")
        for line in list_file.read_text().splitlines():
            if not line.strip():
                continue
            voc_id = line.split()[0]
            if (year, voc_id) in seen:
                report.note("duplicate_image", f"{list_file.relative_to(root)}: {voc_id} listed before, kept once")
                continue
            seen.add((year, voc_id))
            listed.append((str(year), voc_id))

    # Parse everything first: the default class list depends on all the names found.
    parsed = []
    for position, (year, voc_id) in enumerate(listed, start=1):
        xml_name = f"VOC{year}/Annotations/{voc_id}.xml"
        file_name = f"VOC{year}/JPEGImages/{voc_id}.jpg"
        path = os.path.abspath(root / file_name)
        if not (root / xml_name).is_file():
            report.skip("missing_xml", f"{xml_name} not found")
            continue
        if not os.path.isfile(path):
            report.skip("missing_image", f"{file_name} not found (its annotation: {xml_name})")
            continue
        try:
            # ElementTree on Python >= 3.9 with expat >= 2.4.1 refuses entity-expansion bombs.
            tree = ET.parse(root / xml_name).getroot()
        except ET.ParseError as exc:
            report.skip("unparseable_xml", f"{xml_name}: {exc}")
            continue
        size = _voc_size(tree)
        if size is None:
            size = _image_size(path)
            if size is None:
                report.skip("unparseable_xml", f"{xml_name}: no <size> and {file_name} unreadable")
                continue
        objects = []
        for n, obj in enumerate(tree.findall("object")):
            name = (obj.findtext("name") or "").strip()
            try:
                corners = [float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
                difficult = bool(int(float(obj.findtext("difficult") or 0)))
            except (AttributeError, TypeError, ValueError):
                report.skip("malformed_object", f"{xml_name}: object {n} ({name!r}) has no readable bndbox/difficult")
                continue
            if not name or not all(math.isfinite(v) for v in corners):
                report.skip("malformed_object", f"{xml_name}: object {n} has no name or a non-finite box")
                continue
            objects.append((n, name, corners, difficult))
        parsed.append((position, year, voc_id, xml_name, file_name, path, size, objects))

    if classes is None:
        found = {name for *_, objects in parsed for _, name, _, _ in objects}
        classes = list(VOC_CLASSES) if found <= set(VOC_CLASSES) else sorted(found)
    classes = [str(c) for c in classes]
    label_of = {c: k for k, c in enumerate(classes)}
    images = []
    for position, _year, voc_id, xml_name, file_name, path, (width, height), objects in parsed:
        anns = []
        for n, name, (xmin, ymin, xmax, ymax), difficult in objects:
            if name not in label_of:
                report.skip("unknown_class", f"{xml_name}: object {n} of class {name!r} is not in the class list")
                continue
            clipped = _clip_box([xmin - 1.0, ymin - 1.0, xmax, ymax], width, height)
            if clipped is None:
                report.skip("outside_image", f"{xml_name}: object {n} box {[xmin, ymin, xmax, ymax]} has nothing "
                                             f"inside the {width}x{height} image")
                continue
            box, moved = clipped
            if moved:
                report.note("clipped_box", f"{xml_name}: object {n} box {[xmin, ymin, xmax, ymax]} clipped")
            anns.append((box, label_of[name], difficult, False, (box[2] - box[0]) * (box[3] - box[1])))
        if not anns:
            report.note("image_without_boxes", f"{xml_name}: no objects" + (" left" if objects else ""))
        images.append((position, file_name, path, (width, height), anns, voc_id))
    return _build(report, classes, [k + 1 for k in range(len(classes))], images)


def _voc_size(tree: ET.Element) -> tuple[int, int] | None:
    try:
        width, height = (int(float(tree.find("size").findtext(k))) for k in ("width", "height"))
    except (AttributeError, TypeError, ValueError):
        return None
    return (width, height) if width >= 1 and height >= 1 else None


class DetectionDataset(ReplacingDataset):
    """Training samples of a :class:`DetectionSet`, keyed by ``(index, short_side, flip)``
    (:class:`dap_ray.data.detection.AspectBatchSampler` keys, as for ``PseudoBoxDataset``).

    Returns ``{"image": (3, h, w) uint8 tensor, "boxes": (N, 4) float32 xyxy pixels of the
    resized (and maybe mirrored) image, "labels": (N,) int64 = contiguous label + 1 (0 is the
    detector's background), "image_id": int}`` (the file's image id).

    Crowd boxes are never trained on. Difficult boxes only with ``train_on_difficult``: the
    authors' maskrcnn-benchmark VOC loader trained without them (the default here);
    detectron2 trains with them. An image may come out with no boxes (a negative, which
    torchvision's detectors accept; see :meth:`DetectionSet.training_indices` to leave them
    out). An image that cannot be read, or whose size differs from the annotation's, is
    named in a printed warning and replaced by the next image, so that no rank's batch ever
    comes out empty (under DDP every rank must take every step).
    """

    def __init__(self, data: DetectionSet, max_size: int = 1333, train_on_difficult: bool = False):
        if len(data) == 0:
            raise ValueError("a DetectionDataset needs at least one image")
        self.data, self.max_size, self.train_on_difficult = data, max_size, train_on_difficult

    def __len__(self) -> int:
        return len(self.data)

    def _describe(self, index: int) -> str:
        return repr(self.data.paths[index])

    def _load(self, index: int, short_side: int, flip: bool) -> dict | None:
        from dap_ray.data.images import BadImageError, decode_image

        path = self.data.paths[index]
        try:
            image = decode_image(Path(path).read_bytes())
        except (OSError, BadImageError) as exc:
            print(f"skipping {path}: {exc}", flush=True)
            return None
        width, height = (int(v) for v in self.data.sizes[index])
        if image.shape[:2] != (height, width):
            print(f"skipping {path}: it is {image.shape[1]}x{image.shape[0]} but annotated as {width}x{height}",
                  flush=True)
            return None
        boxes, labels = self.data.training_targets(index, self.train_on_difficult)
        resized, out, kept = resize_with_boxes(image, boxes, short_side, self.max_size, flip)
        return {"image": torch.from_numpy(resized).permute(2, 0, 1), "boxes": torch.from_numpy(out),
                "labels": torch.from_numpy(labels[kept] + 1), "image_id": int(self.data.image_ids[index])}
