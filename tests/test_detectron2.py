"""The detectron2 adapter: what can be checked without detectron2, and training when it is installed."""

import importlib.util

import numpy as np
import pytest
import torch

from dap_ray.data.pseudo_boxes import PseudoBoxes, load_pseudo_boxes
from dap_ray.models.classifiers import load_classifier
from dap_ray.steps.pretrain.detectron2_backend import (
    XYXY_ABS,
    to_detectron2_dicts,
    torchvision_to_detectron2,
)

HAS_DETECTRON2 = importlib.util.find_spec("detectron2") is not None


def test_no_images_give_no_dicts():
    empty = PseudoBoxes([], np.zeros(0, np.int64), np.zeros((0, 2), np.int32), np.zeros(1, np.int64),
                        np.zeros((0, 4), np.float32))
    assert to_detectron2_dicts(empty) == []


def test_pseudo_boxes_become_detectron2_dataset_dicts(pseudo_run):
    boxes_dir, sample, _ = pseudo_run
    pseudo = load_pseudo_boxes(boxes_dir)
    dicts = to_detectron2_dicts(pseudo, sample / "images", "folder")
    assert len(dicts) == len(pseudo)
    first = dicts[0]
    assert first["file_name"] == str(sample / "images" / pseudo.image_ids[0]) and first["image_id"] == pseudo.image_ids[0]
    assert (first["width"], first["height"]) == tuple(int(v) for v in pseudo.sizes[0])
    assert len(first["annotations"]) == len(pseudo.boxes_of(0))
    for annotation, box in zip(first["annotations"], pseudo.boxes_of(0)):
        assert annotation["bbox_mode"] == XYXY_ABS and annotation["category_id"] == int(pseudo.labels[0])
        np.testing.assert_allclose(annotation["bbox"], box)
    assert to_detectron2_dicts(pseudo, "/data", "tar")[0]["file_name"] == pseudo.image_ids[0]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_resnet_keys_become_detectron2_names(arch):
    state = load_classifier(arch).state_dict()
    renamed = torchvision_to_detectron2(state)
    assert "fc.weight" not in renamed and not any(k.endswith("num_batches_tracked") for k in renamed)
    assert {"stem.conv1.weight", "stem.conv1.norm.weight", "stem.conv1.norm.running_var", "res2.0.conv1.weight",
            "res2.0.conv1.norm.bias", "res5.1.conv2.norm.running_mean", "res3.0.shortcut.weight",
            "res3.0.shortcut.norm.weight"} <= set(renamed)
    np.testing.assert_array_equal(renamed["res4.0.conv2.weight"], state["layer3.0.conv2.weight"].numpy())
    expected = len([k for k in state if not k.startswith("fc.") and not k.endswith("num_batches_tracked")])
    assert len(renamed) == expected


@pytest.mark.skipif(not HAS_DETECTRON2, reason="detectron2 is not installed (it is built from source; see README)")
def test_detectron2_backend_trains_and_writes_a_checkpoint(pseudo_run, ray_session, tmp_path):
    from dap_ray.steps.pretrain import PretrainConfig, pretrain

    boxes_dir, _, _ = pseudo_run
    meta = pretrain(PretrainConfig(boxes=str(boxes_dir), output=str(tmp_path / "run"), backbone="resnet18",
                                   backend="detectron2", max_iters=2, checkpoint_every=1, batch_size=2,
                                   min_sizes=(32, 48), max_size=96, loader_workers=0))
    assert meta["backend"] == "detectron2"
    assert torch.load(tmp_path / "run" / "detector_final_d2.pth", weights_only=True)
