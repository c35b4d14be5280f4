import numpy as np
import pytest
import torch

from dap_ray.data.detection import (
    AspectBatchSampler,
    collate_detection,
    resize_with_boxes,
)
from dap_ray.data.locations import LocatedImages, load_locations
from dap_ray.data.pseudo_boxes import PseudoBoxDataset, load_pseudo_boxes
from dap_ray.data.sources import ImageReader
from dap_ray.models.classifiers import load_classifier
from dap_ray.models.detectors import build_detector, detector_state_dict
from tests.helpers import write_pseudo_run

TINY = "tests.factories:tiny_resnet"


def tiny_detector(detector="faster_rcnn_fpn", weights=None, **kwargs):
    torch.manual_seed(0)
    return build_detector(detector, TINY, 3, backbone_weights=weights, min_size=(48,), max_size=96,
                          **({"roi_batch_size_per_image": 16} if detector == "faster_rcnn_fpn" else {}), **kwargs)


@pytest.mark.parametrize("detector", ["faster_rcnn_fpn", "retinanet_fpn"])
def test_trunk_weights_equal_the_classifiers_and_the_rest_is_random(pseudo_run, detector):
    _, _, weights = pseudo_run
    classifier = load_classifier(TINY, weights).state_dict()
    model = tiny_detector(detector, weights)
    body = {k[len("backbone.body."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.body.")}
    assert body, "no trunk found"
    for key, value in body.items():
        assert torch.equal(value, classifier[key]), key
    assert set(classifier) - set(body) - {k for k in classifier if k.endswith("num_batches_tracked")} == \
        {"fc.weight", "fc.bias"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("backbone.body.conv1", "backbone.body.layer1")) for n in trainable)
    assert any(n.startswith("backbone.body.layer2") for n in trainable)
    assert any(n.startswith("backbone.fpn") for n in trainable)


@pytest.mark.parametrize("detector, builder", [
    ("faster_rcnn_fpn", "fasterrcnn_resnet50_fpn"), ("retinanet_fpn", "retinanet_resnet50_fpn")])
def test_state_dict_loads_strictly_into_the_torchvision_builder(detector, builder):
    import torchvision.models.detection as tvd

    model = build_detector(detector, "resnet50", 6)
    reference = getattr(tvd, builder)(weights=None, weights_backbone=None, num_classes=7)
    reference.load_state_dict(detector_state_dict(model), strict=True)
    again = build_detector(detector, "resnet50", 6)
    again.load_state_dict(detector_state_dict(model), strict=True)  # and back into our own build


@pytest.mark.parametrize("kwargs, message", [
    (dict(detector="yolo"), "unknown detector"),
    (dict(num_classes=0), "num_classes"),
    (dict(backbone="tests.factories:tiny_cam_net"), "torchvision ResNet"),
    (dict(trainable_layers=6), "trainable_layers"),
    (dict(backbone="vgg16"), "unknown classifier"),
])
def test_build_detector_rejects_bad_arguments(kwargs, message):
    args = dict(detector="faster_rcnn_fpn", backbone=TINY, num_classes=3) | kwargs
    with pytest.raises(ValueError, match=message):
        build_detector(args.pop("detector"), args.pop("backbone"), args.pop("num_classes"), **args)


@pytest.mark.parametrize("detector", ["faster_rcnn_fpn", "retinanet_fpn"])
def test_an_image_without_boxes_gives_finite_losses(detector):
    model = tiny_detector(detector)
    images = [torch.rand(3, 48, 64), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)},
               {"boxes": torch.tensor([[4.0, 6.0, 40.0, 30.0]]), "labels": torch.tensor([2])}]
    losses = model(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


@pytest.mark.parametrize("boxes, size, short, max_size, flip, expected", [
    (np.zeros((0, 4)), (20, 10), 20, 100, False, np.zeros((0, 4))),  # empty stays (0, 4)
    ([[0, 0, 10, 5]], (20, 10), 20, 100, False, [[0, 0, 20, 10]]),  # upscale 2x
    ([[0, 0, 10, 5]], (20, 10), 20, 100, True, [[20, 0, 40, 10]]),  # mirrored
    ([[2, 2, 6, 8]], (200, 10), 20, 100, False, [[1, 1, 3, 4]]),  # very wide: long side capped at 100 (0.5x)
    ([[2, 2, 2.4, 8]], (20, 10), 10, 100, False, np.zeros((0, 4))),  # under one pixel wide after resizing: dropped
    ([[-5, 0, 30, 10]], (20, 10), 10, 100, False, [[0, 0, 20, 10]]),  # clipped to the image
])
def test_resize_with_boxes(boxes, size, short, max_size, flip, expected):
    width, height = size
    image = np.zeros((height, width, 3), np.uint8)
    out_image, out, keep = resize_with_boxes(image, np.asarray(boxes, np.float32), short, max_size, flip)
    assert out.dtype == np.float32 and out.shape == np.asarray(expected).reshape(-1, 4).shape
    assert keep.dtype == bool and keep.shape == (len(boxes),) and keep.sum() == len(out)
    np.testing.assert_allclose(out, np.asarray(expected, np.float32).reshape(-1, 4), atol=1e-4)
    assert min(out_image.shape[:2]) == short or max(out_image.shape[:2]) == max_size


def test_load_pseudo_boxes_skips_images_without_boxes_or_label_and_caps_boxes(tmp_path):
    rows = [
        {"image_id": "b.jpg", "label": 1, "width": 30, "height": 20, "boxes": [[0, 0, 5, 5], [1, 1, 9, 9], [2, 2, 4, 4]],
         "scores": [0.2, 0.9, 0.5]},
        {"image_id": "a.jpg", "label": 0, "width": 10, "height": 10, "boxes": np.zeros((0, 4)), "scores": []},
        {"image_id": "c.jpg", "label": -1, "width": 10, "height": 10, "boxes": [[0, 0, 5, 5]], "scores": [1.0]},
        {"image_id": "d.jpg", "label": 2, "width": 12, "height": 10, "boxes": [[0, 0, 5, 5]], "scores": [1.0]},
    ]
    boxes_dir = write_pseudo_run(tmp_path, rows, tmp_path)
    pseudo = load_pseudo_boxes(boxes_dir, max_boxes_per_image=2)
    assert list(pseudo.image_ids) == ["b.jpg", "d.jpg"] and pseudo.num_boxes == 3
    assert pseudo.skipped_without_boxes == 1 and pseudo.skipped_without_label == 1
    np.testing.assert_array_equal(pseudo.labels, [1, 2])
    np.testing.assert_array_equal(pseudo.sizes, [[30, 20], [12, 10]])
    np.testing.assert_array_equal(pseudo.boxes_of(0), [[1, 1, 9, 9], [2, 2, 4, 4]])  # best two by score
    assert pseudo.boxes.dtype == np.float32 and pseudo.boxes.shape == (4, 4)  # all held, capped when served
    with pytest.raises(ValueError, match="no Parquet files"):
        load_pseudo_boxes(tmp_path / "nothing")


def test_aspect_batches_are_deterministic_resumable_disjoint_and_grouped():
    rng = np.random.default_rng(0)
    sizes = np.stack([rng.integers(20, 400, 100), rng.integers(20, 400, 100)], 1)
    def take(sampler, n):
        stream = iter(sampler)
        return [next(stream) for _ in range(n)]
    first = take(AspectBatchSampler(sizes, 4, (96, 160), rank=0, world=2, seed=1), 30)
    assert first == take(AspectBatchSampler(sizes, 4, (96, 160), rank=0, world=2, seed=1), 30)
    assert take(AspectBatchSampler(sizes, 4, (96, 160), rank=0, world=2, seed=1, start=12), 18) == first[12:]
    groups = AspectBatchSampler(sizes, 4, (96,)).groups
    for batch in first:
        assert len(batch) == 4 and len({groups[i] for i, _, _ in batch}) == 1 and len({s for _, s, _ in batch}) == 1
    assert {s for batch in first for _, s, _ in batch} == {96, 160}
    other = take(AspectBatchSampler(sizes, 4, (96, 160), rank=1, world=2, seed=1), 5)
    ours = {i for batch in first[:5] for i, _, _ in batch}
    assert not ours & {i for batch in other for i, _, _ in batch}  # first epoch: disjoint halves
    with pytest.raises(ValueError, match="cannot feed 2 workers"):
        AspectBatchSampler(sizes[:1], 4, (96,), world=2)


def test_dataset_gives_torchvision_targets_and_replaces_unreadable_images(pseudo_run, tmp_path):
    boxes_dir, sample, _ = pseudo_run
    pseudo = load_pseudo_boxes(boxes_dir)
    dataset = PseudoBoxDataset(pseudo, LocatedImages(pseudo, load_locations(pseudo, sample / "images", "folder")),
                               max_size=200)
    item = dataset[(0, 64, True)]
    assert item["image"].dtype == torch.uint8 and item["image"].shape[0] == 3 and min(item["image"].shape[1:]) == 64
    assert item["boxes"].dtype == torch.float32 and item["boxes"].shape == (len(pseudo.boxes_of(0)), 4)
    assert (item["labels"] == int(pseudo.labels[0]) + 1).all() and item["image_id"] == pseudo.image_ids[0]

    broken = tmp_path / "images"
    import shutil

    shutil.copytree(sample / "images", broken)
    (broken / pseudo.image_ids[0]).write_bytes(b"not an image")
    replaced = PseudoBoxDataset(pseudo, LocatedImages(pseudo, load_locations(pseudo, broken, "folder")))[(0, 64, False)]
    assert replaced["image_id"] == pseudo.image_ids[1]
    assert len(collate_detection([item, replaced])) == 2


def test_image_reader_reads_tar_and_parquet_ids_as_read_shard_names_them(tmp_path, rng):
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dap_ray.data.sources import list_shards, read_shard
    from tests.helpers import encode, photo

    images = [encode(photo(rng, 8, 8 + i)) for i in range(3)]
    with tarfile.open(tmp_path / "n01.tar", "w") as tar:
        for i, data in enumerate(images):
            info = tarfile.TarInfo(f"n01_{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"image": images, "label": [0, 1, 2]}), tmp_path / "p.parquet", row_group_size=2)
    for fmt in ("tar", "parquet"):
        shards, _, _ = list_shards(tmp_path, fmt)
        reader = ImageReader(tmp_path, fmt)
        records = [r for s in shards for r in read_shard(s)]
        assert len(records) == 3
        for record in reversed(records):
            assert reader.read(record["image_id"]) == record["data"], record["image_id"]
        with pytest.raises(KeyError):
            reader.read(records[0]["image_id"].split("::")[0] + "::999")


def test_training_keeps_the_loaders_sizes_in_a_batch_whose_long_sides_were_capped():
    """The model used to take the first image's short side for the whole batch: (133, 1333) and
    (571, 1333) trained as (133, 1333) and (133, 310)."""
    model = tiny_detector(resize_in_training=False).train()
    images = [torch.rand(3, 13, 133), torch.rand(3, 57, 133)]
    resized, _ = model.transform(images, [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}] * 2)
    assert resized.image_sizes == [(13, 133), (57, 133)]
    model.eval()  # evaluation resizes to the test size
    assert model.transform(images)[0].image_sizes == [(9, 96), (41, 96)]  # min(48 / short, 96 / long)


@pytest.mark.parametrize("bias_lr_factor, bias_weight_decay", [(2.0, 0.0), (1.0, 1e-4)])
def test_optimizer_gives_biases_their_own_rate_and_decay(bias_lr_factor, bias_weight_decay):
    from dap_ray.models.training import detector_optimizer

    model = tiny_detector()
    optimizer = detector_optimizer(model, 0.01, 0.9, 1e-4, bias_lr_factor, bias_weight_decay)
    weights, biases = optimizer.param_groups
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    assert {trainable[id(p)] for p in biases["params"]} == {n for n in trainable.values() if n.endswith(".bias")}
    assert len(weights["params"]) + len(biases["params"]) == len(trainable)
    assert (weights["lr"], weights["weight_decay"]) == (0.01, 1e-4)
    assert (biases["lr"], biases["weight_decay"]) == (pytest.approx(0.01 * bias_lr_factor), bias_weight_decay)


def test_a_pretraining_run_loads_as_it_was_trained(tmp_path):
    import json

    from torchvision.ops.misc import FrozenBatchNorm2d

    from dap_ray.models.detectors import load_pretrained_detector

    model = tiny_detector()
    torch.save(detector_state_dict(model), tmp_path / "detector_final.pt")
    (tmp_path / "meta.json").write_text(json.dumps({
        "detector": "faster_rcnn_fpn", "backbone": TINY, "num_classes": 4,
        "config": {"trainable_layers": 3, "min_sizes": [48], "max_size": 96, "roi_batch_size_per_image": 16}}))
    loaded = load_pretrained_detector(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert isinstance(loaded.backbone.body.bn1, FrozenBatchNorm2d)
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if n.startswith(("backbone.body.conv1",
                                                                                          "backbone.body.layer1")))
    with pytest.raises(ValueError, match="meta.json not found"):
        load_pretrained_detector(tmp_path / "elsewhere")
