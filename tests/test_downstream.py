"""Step 4's data: COCO and VOC loaders, the k-shot sampler, training samples, the downstream sample set."""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dap_ray.data.downstream import VOC_CLASSES, DetectionDataset, DetectionSet, load_coco, load_voc
from dap_ray.data.downstream_sample import DOWNSTREAM_CLASSES, DownstreamSampleConfig, make_downstream_sample
from dap_ray.data.fewshot import sample_k_shot
from dap_ray.data.sample import PATTERNS, SHAPES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A small downstream sample (60 images, 4 classes), written once for the module."""
    config = DownstreamSampleConfig(num_train=40, num_test=20, num_classes=4, image_size=64, seed=1)
    return make_downstream_sample(tmp_path_factory.mktemp("downstream") / "s", config)


def write_image(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    return path


# ---- COCO ----------------------------------------------------------------------------------

def coco_set(tmp_path: Path, annotations, images=None, categories=None, name="instances.json") -> Path:
    """A COCO file over two 32x24 images (ids 1, 2) whose files exist, categories 3 'a' and 7 'b'."""
    images = images if images is not None else [{"id": 1, "file_name": "one.jpg", "width": 32, "height": 24},
                                                 {"id": 2, "file_name": "two.jpg", "width": 32, "height": 24}]
    for img in images:
        if img.get("file_name") in ("one.jpg", "two.jpg"):
            write_image(tmp_path / "images" / img["file_name"], 32, 24)
    categories = categories if categories is not None else [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]
    path = tmp_path / name
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def ann(id, bbox, image_id=1, category_id=3, **extra):
    return {"id": id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


def test_coco_loader_reads_boxes_labels_and_flags(tmp_path):
    path = coco_set(tmp_path, [
        ann(1, [1, 2, 3, 4]),
        ann(2, [10, 5, 6, 8], category_id=7, iscrowd=1, area=20.5),
        ann(3, [0, 0, 5, 5], category_id=7, difficult=1),
    ])
    data = load_coco(path, tmp_path / "images")
    assert data.classes == ("a", "b") and data.category_ids == (3, 7)  # contiguous by sorted category id
    assert len(data) == 2 and data.image_ids.tolist() == [1, 2] and data.file_names == ("one.jpg", "two.jpg")
    assert data.paths[0] == str((tmp_path / "images" / "one.jpg").resolve())
    assert data.sizes.dtype == np.int32 and data.sizes.tolist() == [[32, 24], [32, 24]]
    assert data.boxes[0].dtype == np.float32 and data.boxes[0].tolist() == [[1, 2, 4, 6], [10, 5, 16, 13], [0, 0, 5, 5]]
    assert data.labels[0].dtype == np.int64 and data.labels[0].tolist() == [0, 1, 1]
    assert data.iscrowd[0].tolist() == [False, True, False] and data.difficult[0].tolist() == [False, False, True]
    assert data.areas[0].tolist() == [12, 20.5, 25]  # the file's area where given
    # An image without annotations is kept (a valid negative) and noted.
    assert data.boxes[1].shape == (0, 4) and data.labels[1].shape == (0,)
    assert data.report["noted"] == {"image_without_boxes": 1} and data.report["skipped"] == {}


@pytest.mark.parametrize(
    ("bad", "reason", "kept"),
    [
        (None, None, [[1, 2, 4, 6]]),  # the empty case: nothing bad
        (ann(2, [5, 5, 4, 4], category_id=99), "unknown_category", [[1, 2, 4, 6]]),
        (ann(2, [5, 5, 0, 4]), "empty_box", [[1, 2, 4, 6]]),
        (ann(2, [5, 5, -3, 4]), "empty_box", [[1, 2, 4, 6]]),
        (ann(2, [40, 5, 4, 4]), "outside_image", [[1, 2, 4, 6]]),
        (ann(2, [-9, 5, 4, 4]), "outside_image", [[1, 2, 4, 6]]),
        (ann(2, [1, 2, 3]), "malformed_annotation", [[1, 2, 4, 6]]),
        (ann(2, [1, 2, "3", 4]), "malformed_annotation", [[1, 2, 4, 6]]),
        (ann(2, [5, 5, 4, 4], image_id=99), "unknown_image", [[1, 2, 4, 6]]),
        (ann(2, [5, 5, 4, 4], image_id=[1]), "unknown_image", [[1, 2, 4, 6]]),
        (ann(2, [5, 5, 4, 4], category_id=[3]), "unknown_category", [[1, 2, 4, 6]]),
        (ann(2, [5, 5, 4, 4], category_id=True), "unknown_category", [[1, 2, 4, 6]]),
    ],
)
def test_coco_bad_annotations_are_skipped_and_counted(tmp_path, bad, reason, kept):
    path = coco_set(tmp_path, [ann(1, [1, 2, 3, 4])] + ([bad] if bad else []))
    data = load_coco(path, tmp_path / "images")
    assert data.boxes[0].tolist() == kept and len(data) == 2
    if reason is None:
        assert data.report["skipped"] == {}
    else:
        assert data.report["skipped"] == {reason: 1}
        (example,) = data.report["examples"][reason]
        assert "instances.json" in example and "annotation id 2" in example


def test_coco_box_sticking_out_is_clipped_and_noted(tmp_path):
    path = coco_set(tmp_path, [ann(1, [28, 20, 10, 10])])
    data = load_coco(path, tmp_path / "images")
    assert data.boxes[0].tolist() == [[28, 20, 32, 24]]
    assert data.report["noted"]["clipped_box"] == 1 and data.report["skipped"] == {}


def test_coco_missing_image_file_is_skipped_with_its_annotations(tmp_path):
    images = [{"id": 1, "file_name": "one.jpg", "width": 32, "height": 24},
              {"id": 5, "file_name": "gone.jpg", "width": 32, "height": 24}]
    path = coco_set(tmp_path, [ann(1, [1, 1, 4, 4]), ann(2, [1, 1, 4, 4], image_id=5)], images=images)
    data = load_coco(path, tmp_path / "images")
    assert data.image_ids.tolist() == [1] and data.num_boxes == 1
    assert data.report["skipped"] == {"missing_image": 1, "annotation_of_skipped_image": 1}
    assert "gone.jpg" in data.report["examples"]["missing_image"][0]
    # Without the file check the image is kept (its size comes from the file's entry).
    assert len(load_coco(path, tmp_path / "images", check_files=False)) == 2


def test_coco_malformed_image_entry_is_skipped_with_its_annotations(tmp_path):
    images = [{"id": 1, "file_name": "one.jpg", "width": 32, "height": 24}, {"id": [2], "file_name": "two.jpg"},
              {"id": "3", "file_name": "three.jpg"}]
    path = coco_set(tmp_path, [ann(1, [1, 1, 4, 4]), ann(2, [1, 1, 4, 4], image_id="3")], images=images)
    data = load_coco(path, tmp_path / "images")
    assert data.image_ids.tolist() == [1]
    assert data.report["skipped"] == {"malformed_image": 2, "annotation_of_skipped_image": 1}
    assert "images[1]" in data.report["examples"]["malformed_image"][0]


def test_coco_image_without_size_takes_it_from_the_file(tmp_path):
    path = coco_set(tmp_path, [ann(1, [1, 1, 4, 4])], images=[{"id": 1, "file_name": "one.jpg"}])
    assert load_coco(path, tmp_path / "images").sizes.tolist() == [[32, 24]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ("[]", "must hold a JSON object"),
        (json.dumps({"annotations": [], "categories": []}), r"\['images'\]"),
        (json.dumps({"images": [], "categories": []}), r"\['annotations'\]"),
        (json.dumps({"images": [], "annotations": []}), r"\['categories'\]"),
        (json.dumps({"images": [], "annotations": [], "categories": [{"id": 1}]}), r"categories\[0\]"),
        (json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}),
         "category id 1 appears twice"),
        (json.dumps({"images": [{"id": 4, "file_name": "a.jpg"}, {"id": 4, "file_name": "b.jpg"}], "annotations": [],
                     "categories": []}), "image id 4 appears twice"),
    ],
)
def test_coco_unreadable_files_raise_naming_file_and_entry(tmp_path, text, message):
    path = tmp_path / "broken_instances.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_coco(path, tmp_path)
    assert "broken_instances.json" in str(info.value)


def test_coco_missing_file_raises(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_coco(tmp_path / "nope.json", tmp_path)


# ---- VOC -----------------------------------------------------------------------------------

def voc_xml(width=40, height=30, objects=()):
    """objects: (name, (xmin, ymin, xmax, ymax), difficult or None to leave the tag out)."""
    parts = [f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, (x1, y1, x2, y2), difficult in objects:
        tag = "" if difficult is None else f"<difficult>{difficult}</difficult>"
        parts.append(f"<object><name>{name}</name>{tag}<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                     f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


def voc_tree(root: Path, year: str, split: str, entries: dict, listed=None) -> Path:
    """``entries``: VOC id -> XML text (None: no XML file); every id gets a 40x30 JPEG unless
    its XML text is the string "NOIMAGE:" + xml. ``listed``: the split list (default: all ids)."""
    base = root / f"VOC{year}"
    (base / "Annotations").mkdir(parents=True, exist_ok=True)
    (base / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for voc_id, xml in entries.items():
        if xml is not None and xml.startswith("NOIMAGE:"):
            xml = xml[len("NOIMAGE:"):]
        else:
            write_image(base / "JPEGImages" / f"{voc_id}.jpg", 40, 30)
        if xml is not None:
            (base / "Annotations" / f"{voc_id}.xml").write_text(xml)
    ids = list(entries) if listed is None else listed
    (base / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def test_voc_boxes_become_continuous_and_keep_difficult(tmp_path):
    xml = voc_xml(objects=[("dog", (1, 1, 10, 20), 0), ("person", (5, 6, 40, 30), 1), ("cat", (3, 3, 8, 8), None)])
    root = voc_tree(tmp_path / "VOCdevkit", "2007", "trainval", {"000005": xml})
    data = load_voc(root, [("2007", "trainval")])
    assert data.classes == VOC_CLASSES and data.category_ids == tuple(range(1, 21))
    # 1-based inclusive [1, 1, 10, 20] covers pixels 0..9 x 0..19: continuous [0, 0, 10, 20].
    assert data.boxes[0].tolist() == [[0, 0, 10, 20], [4, 5, 40, 30], [2, 2, 8, 8]]
    assert data.labels[0].tolist() == [VOC_CLASSES.index(n) for n in ("dog", "person", "cat")]
    assert data.difficult[0].tolist() == [False, True, False] and not data.iscrowd[0].any()
    assert data.image_ids.tolist() == [1] and data.file_names == ("VOC2007/JPEGImages/000005.jpg",)
    assert data.source_ids == ("000005",) and data.sizes.tolist() == [[40, 30]]
    assert data.report["skipped"] == {} and data.report["noted"] == {}


@pytest.mark.parametrize(
    ("entries", "classes", "images", "boxes", "skipped", "noted", "named"),
    [
        ({}, None, 0, 0, {}, {}, None),  # the empty case: an empty split list
        ({"a": voc_xml()}, None, 1, 0, {}, {"image_without_boxes": 1}, "VOC2007/Annotations/a.xml"),
        ({"a": voc_xml(objects=[("dog", (1, 1, 5, 5), 0), ("unicorn", (2, 2, 6, 6), 0)])}, VOC_CLASSES, 1, 1,
         {"unknown_class": 1}, {}, "VOC2007/Annotations/a.xml"),
        ({"a": None, "b": voc_xml(objects=[("dog", (1, 1, 5, 5), 0)])}, None, 1, 1, {"missing_xml": 1}, {},
         "VOC2007/Annotations/a.xml"),
        ({"a": "NOIMAGE:" + voc_xml(objects=[("dog", (1, 1, 5, 5), 0)])}, None, 0, 0, {"missing_image": 1}, {},
         "VOC2007/JPEGImages/a.jpg"),
        ({"a": "<annotation><object>"}, None, 0, 0, {"unparseable_xml": 1}, {}, "VOC2007/Annotations/a.xml"),
        ({"a": voc_xml(objects=[("dog", (50, 50, 60, 60), 0)])}, None, 1, 0, {"outside_image": 1},
         {"image_without_boxes": 1},
         "VOC2007/Annotations/a.xml"),
        ({"a": voc_xml(objects=[("dog", (1, 1, "x", 5), 0)])}, None, 1, 0, {"malformed_object": 1},
         {"image_without_boxes": 1},
         "VOC2007/Annotations/a.xml"),
    ],
)
def test_voc_bad_files_are_skipped_and_counted(tmp_path, entries, classes, images, boxes, skipped, noted, named):
    root = voc_tree(tmp_path / "VOCdevkit", "2007", "trainval", entries)
    data = load_voc(root, [("2007", "trainval")], classes=classes)
    assert len(data) == images and data.num_boxes == boxes
    assert data.report["skipped"] == skipped and data.report["noted"] == noted
    if named:
        reason = next(iter(skipped or noted))  # the skip's example, else the note's
        assert named in data.report["examples"][reason][0]


def test_voc_07_plus_12_combines_splits_with_stable_ids(tmp_path):
    root = tmp_path / "VOCdevkit"
    voc_tree(root, "2007", "trainval", {"000005": None, "000007": voc_xml(objects=[("dog", (1, 1, 5, 5), 0)])})
    voc_tree(root, "2012", "trainval", {"2008_000002": voc_xml(objects=[("cat", (2, 2, 9, 9), 1)])},
             listed=["2008_000002", "2008_000002"])
    data = load_voc(root, [("2007", "trainval"), ("2012", "trainval")])
    # 000005 has no XML: skipped, but the others keep their positions (2 and 3) as ids.
    assert data.image_ids.tolist() == [2, 3]
    assert data.file_names == ("VOC2007/JPEGImages/000007.jpg", "VOC2012/JPEGImages/2008_000002.jpg")
    assert data.source_ids == ("000007", "2008_000002")
    assert [lab.tolist() for lab in data.labels] == [[VOC_CLASSES.index("dog")], [VOC_CLASSES.index("cat")]]
    assert data.difficult[1].tolist() == [True]
    assert data.report["skipped"] == {"missing_xml": 1} and data.report["noted"] == {"duplicate_image": 1}


def test_voc_classes_default_to_sorted_names_unless_all_are_voc_or_given(tmp_path):
    xml = voc_xml(objects=[("zebra", (1, 1, 5, 5), 0), ("apple", (2, 2, 6, 6), 0)])
    root = voc_tree(tmp_path / "VOCdevkit", "2007", "trainval", {"a": xml})
    data = load_voc(root, [("2007", "trainval")])
    assert data.classes == ("apple", "zebra") and data.labels[0].tolist() == [1, 0]
    given = load_voc(root, [("2007", "trainval")], classes=["zebra", "apple"])
    assert given.classes == ("zebra", "apple") and given.labels[0].tolist() == [0, 1]


def test_voc_missing_split_list_or_root_raises_naming_it(tmp_path):
    root = voc_tree(tmp_path / "VOCdevkit", "2007", "trainval", {})
    with pytest.raises(ValueError, match=r"VOC2012.*trainval\.txt"):
        load_voc(root, [("2007", "trainval"), ("2012", "trainval")])
    with pytest.raises(ValueError, match="VOCdevkit folder not found"):
        load_voc(tmp_path / "nope", [("2007", "trainval")])


# ---- both formats, to_coco, the set's checks -------------------------------------------------

@pytest.mark.parametrize(("coco_split", "voc_split"), [("train", "trainval"), ("test", "test")])
def test_both_loaders_agree_on_the_generated_sample(sample, coco_split, voc_split):
    coco = load_coco(sample / "coco" / f"{coco_split}.json", sample / "images")
    voc = load_voc(sample / "VOCdevkit", [("2007", voc_split)])
    assert coco.classes == voc.classes == tuple((sample / "classes.txt").read_text().split())
    assert len(coco) == len(voc) > 0 and coco.num_boxes == voc.num_boxes > len(coco)
    assert coco.image_ids.tolist() == voc.image_ids.tolist() and (coco.sizes == voc.sizes).all()
    for i in range(len(coco)):
        assert np.array_equal(coco.boxes[i], voc.boxes[i]), coco.file_names[i]
        assert np.array_equal(coco.labels[i], voc.labels[i]) and np.array_equal(coco.difficult[i], voc.difficult[i])
        assert Path(coco.paths[i]).read_bytes() == Path(voc.paths[i]).read_bytes()
    assert any(d.any() for d in coco.difficult)  # the sample has difficult boxes, and both formats carry them
    assert coco.report["skipped"] == voc.report["skipped"] == {}


def test_to_coco_is_a_ground_truth_pycocotools_scores_perfectly(sample):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    data = load_voc(sample / "VOCdevkit", [("2007", "test")])
    gt_dict = data.to_coco()
    assert [a["id"] for a in gt_dict["annotations"]] == list(range(1, data.num_boxes + 1))
    assert {a["difficult"] for a in gt_dict["annotations"]} == {0, 1} and "info" in gt_dict
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        detections = gt.loadRes([{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                                  "score": 1.0} for a in gt_dict["annotations"]])
        evaluation = COCOeval(gt, detections, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


def test_to_coco_keeps_the_files_category_ids_and_areas(tmp_path):
    path = coco_set(tmp_path, [ann(1, [1, 2, 3, 4], category_id=7, area=5.0, iscrowd=1)])
    out = load_coco(path, tmp_path / "images").to_coco()
    (a,) = out["annotations"]
    assert a["category_id"] == 7 and a["bbox"] == [1, 2, 3, 4] and a["area"] == 5.0 and a["iscrowd"] == 1
    assert out["categories"] == [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]
    assert [img["id"] for img in out["images"]] == [1, 2]


def make_set(labels, difficult=None, iscrowd=None, classes=("a", "b", "c")) -> DetectionSet:
    """A set without files: image i has one 10x10 box per label in labels[i]."""
    n = len(labels)
    return DetectionSet(
        classes=classes, category_ids=range(1, len(classes) + 1), image_ids=np.arange(1, n + 1),
        file_names=[f"{i}.jpg" for i in range(n)], paths=[f"/nowhere/{i}.jpg" for i in range(n)],
        sizes=np.full((n, 2), 64), boxes=[np.tile([[0, 0, 10, 10]], (len(lab), 1)) for lab in labels],
        labels=labels, difficult=difficult or [[False] * len(lab) for lab in labels],
        iscrowd=iscrowd or [[False] * len(lab) for lab in labels],
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(boxes=[np.zeros((1, 5))]), r"boxes must be \(N, 4\)"),
        (dict(boxes=[np.zeros(4)]), r"boxes must be \(N, 4\)"),
        (dict(boxes=[[[5, 0, 5, 10]]]), "x2 > x1"),
        (dict(labels=[[3]]), r"labels must be \(1,\) in \[0, 3\)"),
        (dict(difficult=[[True, False]]), r"difficult must be \(1,\)"),
        (dict(sizes=[[64, 0]]), "sizes"),
        (dict(file_names=[]), "file_names has 0 entries for 1 images"),
        (dict(category_ids=[1, 2]), "3 classes but 2 category ids"),
    ],
)
def test_detection_set_checks_what_it_is_built_from(change, message):
    fields = dict(classes=("a", "b", "c"), category_ids=(1, 2, 3), image_ids=[1], file_names=["x.jpg"],
                  paths=["/x.jpg"], sizes=[[64, 48]], boxes=[[[0, 0, 5, 5]]], labels=[[0]], difficult=[[False]],
                  iscrowd=[[False]])
    DetectionSet(**fields)  # the unchanged fields make a valid set
    with pytest.raises(ValueError, match=message):
        DetectionSet(**{**fields, **change})


def test_empty_set_and_subset():
    empty = make_set([])
    assert len(empty) == 0 and empty.to_coco()["images"] == [] and empty.training_indices().shape == (0,)
    data = make_set([[0], [], [1, 2], [2]], difficult=[[True], [], [False, False], [False]])
    part = data.subset([3, 0])
    assert part.image_ids.tolist() == [4, 1] and part.file_names == ("3.jpg", "0.jpg")
    assert [lab.tolist() for lab in part.labels] == [[2], [0]] and part.report["subset_of"] == 4
    assert data.subset([]).sizes.shape == (0, 2)
    assert data.training_indices().tolist() == [2, 3] and data.training_indices(True).tolist() == [0, 2, 3]
    for bad, message in (([1, 1], "must not repeat"), ([4], r"in \[0, 4\)"), (np.ones(4, bool), "not a mask")):
        with pytest.raises(ValueError, match=message):
            data.subset(bad)


# ---- k-shot ----------------------------------------------------------------------------------

def shows(data: DetectionSet, index: int, c: int) -> bool:
    usable = ~data.difficult[index] & ~data.iscrowd[index]
    return bool((data.labels[index][usable] == c).any())


@pytest.mark.parametrize("k", [1, 3, 10])
def test_k_shot_draws_k_images_per_class_without_repeats(sample, k):
    data = load_voc(sample / "VOCdevkit", [("2007", "trainval")])
    indices, report = sample_k_shot(data, k, seed=0)
    assert indices.dtype == np.int64 and len(np.unique(indices)) == len(indices)
    assert (np.diff(indices) > 0).all() and indices.min() >= 0 and indices.max() < len(data)
    for c, name in enumerate(data.classes):
        available = sum(shows(data, i, c) for i in range(len(data)))
        assert sum(shows(data, i, c) for i in indices) >= min(k, available)
        assert report["per_class"][name]["eligible"] == available
    drawn = sum(v["drawn"] for v in report["per_class"].values())
    assert drawn == len(indices) and (report["short"] or len(indices) == k * len(data.classes))


def test_k_shot_is_deterministic_for_k_and_seed(sample):
    data = load_coco(sample / "coco" / "train.json", sample / "images")
    a = sample_k_shot(data, 3, seed=5)
    assert np.array_equal(a.indices, sample_k_shot(data, 3, seed=5).indices) and a.report["k"] == 3
    assert not np.array_equal(a.indices, sample_k_shot(data, 3, seed=6).indices)


def test_k_shot_short_class_takes_all_it_has_and_is_reported():
    # Class 2 shows in two images only (and once as difficult, which does not count); class 1 in eight.
    labels = [[0], [0], [0], [0], [0], [0], [1, 2], [1], [1], [1], [1], [1], [1], [1], [2], [2]]
    difficult = [[False] * len(lab) for lab in labels]
    difficult[15] = [True]
    data = make_set(labels, difficult=difficult)
    indices, report = sample_k_shot(data, 4, seed=0)
    assert report["class_order"][0] == "c"  # rarest first
    assert report["short"] == {"c": 2} and report["per_class"]["c"] == {"eligible": 2, "drawn": 2, "in_sample": 2}
    assert {6, 14} <= set(indices.tolist()) and 15 not in indices
    assert len(indices) == 2 + 4 + 4


def test_k_shot_crowd_boxes_do_not_make_an_image_show_a_class():
    data = make_set([[0], [0, 1]], iscrowd=[[False], [False, True]])
    indices, report = sample_k_shot(data, 5, seed=0)
    assert report["per_class"]["b"]["eligible"] == 0 and indices.tolist() == [0, 1]
    assert report["short"] == {"a": 2, "b": 0, "c": 0}


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_k_shot_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k must be"):
        sample_k_shot(make_set([[0]]), k, seed=0)


def test_k_shot_on_an_empty_set():
    indices, report = sample_k_shot(make_set([]), 5, seed=0)
    assert indices.shape == (0,) and set(report["short"]) == {"a", "b", "c"}


# ---- training samples -----------------------------------------------------------------------

def small_coco(tmp_path):
    path = coco_set(tmp_path, [
        ann(1, [2, 2, 10, 8], category_id=3),
        ann(2, [14, 4, 12, 12], category_id=7, difficult=1),
        ann(3, [0, 0, 32, 24], category_id=7, iscrowd=1),
        ann(4, [20, 20, 1, 1], category_id=3),  # under one pixel once halved: dropped, and its label with it
    ])
    return load_coco(path, tmp_path / "images")


def test_detection_dataset_returns_documented_shapes_and_drops_difficult(tmp_path):
    data = small_coco(tmp_path)
    sample = DetectionDataset(data)[(0, 12, False)]  # 32x24 -> 16x12: scale 0.5
    assert set(sample) == {"image", "boxes", "labels", "image_id"}
    assert sample["image"].shape == (3, 12, 16) and str(sample["image"].dtype) == "torch.uint8"
    assert sample["boxes"].dtype.is_floating_point and str(sample["boxes"].dtype) == "torch.float32"
    assert sample["boxes"].tolist() == [[1, 1, 6, 5]] and sample["labels"].tolist() == [1]  # label 0 + 1
    assert sample["image_id"] == 1 and isinstance(sample["image_id"], int)
    with_difficult = DetectionDataset(data, train_on_difficult=True)[(0, 24, True)]  # crowd still left out
    assert with_difficult["labels"].tolist() == [1, 2, 1]
    assert with_difficult["boxes"].tolist() == [[20, 2, 30, 10], [6, 4, 18, 16], [11, 20, 12, 21]]  # mirrored
    negative = DetectionDataset(data)[(1, 24, False)]
    assert negative["boxes"].shape == (0, 4) and negative["labels"].shape == (0,) and negative["image_id"] == 2


def test_detection_dataset_replaces_an_unreadable_image_with_a_warning(tmp_path, capsys):
    data = small_coco(tmp_path)
    (tmp_path / "images" / "one.jpg").write_bytes(b"not a jpeg")
    sample = DetectionDataset(data)[(0, 24, False)]
    assert sample["image_id"] == 2 and "one.jpg" in capsys.readouterr().out
    write_image(tmp_path / "images" / "one.jpg", 30, 24)  # readable, but not the annotated size
    assert DetectionDataset(data)[(0, 24, False)]["image_id"] == 2 and "30x24" in capsys.readouterr().out


# ---- the downstream sample -------------------------------------------------------------------

def test_downstream_sample_is_deterministic_for_a_seed(tmp_path):
    config = DownstreamSampleConfig(num_train=6, num_test=3, num_classes=3, image_size=64, seed=2)
    a = make_downstream_sample(tmp_path / "a", config)
    b = make_downstream_sample(tmp_path / "b", config)
    c = make_downstream_sample(tmp_path / "c", DownstreamSampleConfig(num_train=6, num_test=3, num_classes=3,
                                                                      image_size=64, seed=3))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 2 + 9 + 9 + 9 + 2 + 2  # json, images twice, XML, split lists, classes + config
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "coco" / "train.json").read_bytes() != (c / "coco" / "train.json").read_bytes()


def test_downstream_classes_are_new_to_the_step1_sample(sample):
    step1_pairs = set(zip(SHAPES, PATTERNS))  # class i of the Step 1 sample: SHAPES[i] filled with PATTERNS[i]
    assert not {name for name, _ in DOWNSTREAM_CLASSES} & set(SHAPES)
    assert not set(DOWNSTREAM_CLASSES) & step1_pairs
    assert not {pattern for _, pattern in DOWNSTREAM_CLASSES} & set(PATTERNS[:6])  # nor the default six's patterns
    coco = json.loads((sample / "coco" / "train.json").read_text())
    assert [c["name"] for c in coco["categories"]] == [name for name, _ in DOWNSTREAM_CLASSES[:4]]


def test_downstream_sample_objects_and_voc_boxes(sample):
    coco = json.loads((sample / "coco" / "train.json").read_text())
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=len(coco["images"]) + 1)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 4 and (per_image > 1).any()
    import xml.etree.ElementTree as ET

    for xml in sorted((sample / "VOCdevkit" / "VOC2007" / "Annotations").glob("*.xml"))[:10]:
        tree = ET.parse(xml).getroot()
        width, height = int(tree.findtext("size/width")), int(tree.findtext("size/height"))
        assert min(width, height) >= 64
        for box in tree.iter("bndbox"):
            x1, y1, x2, y2 = (box.findtext(k) for k in ("xmin", "ymin", "xmax", "ymax"))
            assert all(v.isdigit() for v in (x1, y1, x2, y2))  # integer pixel corners
            assert 1 <= int(x1) <= int(x2) <= width and 1 <= int(y1) <= int(y2) <= height


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(num_train=0), "num_train"), (dict(num_test=0), "num_test"), (dict(num_classes=0), "num_classes"),
     (dict(num_classes=len(DOWNSTREAM_CLASSES) + 1), "num_classes"), (dict(image_size=32), "image_size")],
)
def test_bad_downstream_sample_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DownstreamSampleConfig(**kwargs)


def test_make_downstream_sample_job_answers_help():
    result = subprocess.run([sys.executable, "jobs/make_downstream_sample.py", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--output" in result.stdout and "--num-train" in result.stdout
