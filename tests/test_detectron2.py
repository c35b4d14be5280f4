"""The detectron2 adapter: what can be checked without detectron2, and training when it is installed."""

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch

from dap_ray.data.pseudo_boxes import load_pseudo_boxes
from dap_ray.models.classifiers import load_classifier
from dap_ray.models.detectron2_names import torchvision_to_detectron2

HAS_DETECTRON2 = importlib.util.find_spec("detectron2") is not None


@pytest.mark.skipif(not HAS_DETECTRON2, reason="detectron2 is not installed (it is built from source; see README)")
def test_detectron2_samples_are_the_torchvision_samples_as_instances(pseudo_run):
    from dap_ray.data.locations import LocatedImages, load_locations
    from dap_ray.data.pseudo_boxes import PseudoBoxDataset
    from dap_ray.steps.pretrain.detectron2_backend import Detectron2Samples

    boxes_dir, sample, _ = pseudo_run
    pseudo = load_pseudo_boxes(boxes_dir)
    images = LocatedImages(pseudo, load_locations(pseudo, sample / "images", "folder"))
    for key in [(0, 48, False), (5, 32, True), (21, 64, True)]:
        ours = PseudoBoxDataset(pseudo, images, max_size=96)[key]
        theirs = Detectron2Samples(pseudo, images, max_size=96)[key]
        assert torch.equal(theirs["image"], ours["image"]) and theirs["image_id"] == ours["image_id"]
        assert theirs["instances"].image_size == tuple(ours["image"].shape[1:])
        assert torch.equal(theirs["instances"].gt_boxes.tensor, ours["boxes"])
        assert torch.equal(theirs["instances"].gt_classes, ours["labels"] - 1)  # detectron2: no background class
        assert (theirs["width"], theirs["height"]) == tuple(int(v) for v in pseudo.sizes[key[0]])


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
def test_detectron2_backend_trains_writes_a_checkpoint_and_a_killed_run_resumes(pseudo_run, ray_session, tmp_path,
                                                                                 capfd):
    from dap_ray.steps.pretrain import PretrainConfig, pretrain
    from tests.helpers import pseudo_run_as

    boxes_dir, sample, _ = pseudo_run
    # From synset tars, on the torchvision backend's data path (one positioned read per image).
    boxes_dir, _, _ = pseudo_run_as("tar", tmp_path, boxes_dir, sample / "images", sample / "classes.txt")
    run = tmp_path / "run"
    # Two workers on the CPU, as jobs/pretrain.py's embedded default runs: detectron2 wrapped them
    # for DDP with GPU device ids and every worker failed.
    cfg = PretrainConfig(boxes=str(boxes_dir), output=str(run), backbone="resnet18", backend="detectron2",
                         max_iters=2, checkpoint_every=1, batch_size=1, num_workers=2, min_sizes=(32, 48),
                         max_size=96, loader_workers=0)
    meta = pretrain(cfg)
    assert meta["backend"] == "detectron2" and meta["num_classes"] == 4
    assert torch.load(run / "detector_final_d2.pth", weights_only=True)
    assert [h["iteration"] for h in meta["history"]] == [2] and meta["last_loss"] > 0
    # The same weights in torchvision's names: Step 4 starts from either backend.
    from dap_ray.models.detectors import build_detector, initialise

    state = torch.load(run / "detector_final.pt", weights_only=True)
    build_detector("faster_rcnn_fpn", "resnet18", 3).load_state_dict(state, strict=True)
    report = initialise(build_detector("faster_rcnn_fpn", "resnet18", 5), f"dap:{run}",
                        detector="faster_rcnn_fpn", backbone="resnet18")
    assert report["fresh_layers"] and report["modules"]["backbone.fpn"]["fresh"] == 0

    # What a run killed in iteration 2 leaves: detectron2's checkpoint of iteration 1, no final
    # files, no logged metrics (detectron2 logs every 20 iterations and at the end).
    checkpoints = run / "detectron2"
    uninterrupted = torch.load(run / "detector_final_d2.pth", weights_only=True)
    for path in [checkpoints / "model_final.pth", checkpoints / "model_0000001.pth", checkpoints / "metrics.json",
                 run / "detector_final_d2.pth", run / "detector_final.pt", run / "meta.json"]:
        path.unlink()
    (checkpoints / "last_checkpoint").write_text("model_0000000.pth")
    after_one = torch.load(checkpoints / "model_0000000.pth", weights_only=False)["model"]
    capfd.readouterr()
    meta = pretrain(cfg)
    out = capfd.readouterr()
    assert "resuming at iteration 1/2" in out.out + out.err
    assert [h["iteration"] for h in meta["history"]] == [2]
    final = torch.load(run / "detector_final_d2.pth", weights_only=True)
    moved = [k for k in after_one if k.startswith("roi_heads") and not torch.equal(final[k], after_one[k])]
    assert moved  # one more step from the iteration-1 weights
    # ... on the batch and with the proposal draws the uninterrupted run had: the same weights.
    differ = [k for k in final if not torch.equal(final[k], uninterrupted[k])]
    assert not differ, differ[:5]
    assert (run / "detector_final.pt").is_file()


@pytest.mark.parametrize("max_iters", [1, 2, 3, 10, 40038])
def test_the_schedule_is_valid_for_any_length_and_shaped_as_the_torchvision_one(max_iters, tmp_path):
    """fvcore refused the steps of short runs (repeated or past the end): 'Total num_updates must be
    greater than length of param schedule'."""
    from dap_ray.models.training import lr_factor, step_iterations
    from dap_ray.steps.pretrain import PretrainConfig

    # Warm-up ending before the first drop, as in every real schedule: detectron2 ramps towards the
    # value at the warm-up's end, which differs from ours only when a drop falls inside the warm-up.
    cfg = PretrainConfig(boxes="x", max_iters=max_iters, warmup_iters=min(2000, max_iters // 4), lr=0.01)
    steps = step_iterations(cfg.lr_steps, max_iters)
    assert steps == sorted(set(steps)) and all(0 < s < max_iters for s in steps)
    if not HAS_DETECTRON2:
        return
    from detectron2.solver import build_lr_scheduler

    from dap_ray.steps.pretrain.detectron2_backend import _detectron2_config

    d2 = _detectron2_config(dataclasses.replace(cfg, backbone="resnet18"), 3, tmp_path, None)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=d2.SOLVER.BASE_LR)
    scheduler = build_lr_scheduler(d2, optimizer)
    ours = [lr_factor(i, warmup_iters=cfg.warmup_iters, warmup_factor=cfg.warmup_factor, steps=steps)
            for i in range(min(max_iters, 50))]
    theirs = []
    for _ in range(min(max_iters, 50)):
        theirs.append(optimizer.param_groups[0]["lr"] / d2.SOLVER.BASE_LR)
        optimizer.step()
        scheduler.step()
    np.testing.assert_allclose(theirs, ours, rtol=1e-6)


def test_detector_weights_rename_both_ways():
    from dap_ray.models.detectors import build_detector
    from dap_ray.models.detectron2_names import detectron2_detector_to_torchvision, torchvision_detector_to_detectron2

    torch.manual_seed(0)
    state = build_detector("faster_rcnn_fpn", "resnet18", 3).state_dict()
    d2 = torchvision_detector_to_detectron2(state)
    assert d2["roi_heads.box_predictor.cls_score.weight"].shape == (4, 1024)  # 3 classes, background last
    assert d2["roi_heads.box_predictor.bbox_pred.weight"].shape == (12, 1024)  # no background rows
    assert torch.equal(d2["roi_heads.box_predictor.cls_score.weight"][-1], state["roi_heads.box_predictor.cls_score.weight"][0])
    back = detectron2_detector_to_torchvision({"model": d2})
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key == "roi_heads.box_predictor.bbox_pred.weight" or key == "roi_heads.box_predictor.bbox_pred.bias":
            assert torch.equal(back[key][4:], value[4:]) and not back[key][:4].any()  # background rows: unused
        else:
            assert torch.equal(back[key], value), key


def _detector_pair(seed: int = 0):
    """A torchvision Faster R-CNN (resnet18, 3 classes, test size 128) and detectron2's model of the
    same architecture, both in eval mode, the second holding the first's weights renamed."""
    from dap_ray.models.detectors import build_detector
    from dap_ray.models.detectron2_names import torchvision_detector_to_detectron2
    from dap_ray.steps.pretrain.detectron2_backend import build_detectron2_model, detectron2_architecture

    torch.manual_seed(seed)
    tv = build_detector("faster_rcnn_fpn", "resnet18", 3, min_size=(128,)).eval()
    with torch.no_grad():  # scores spread well apart, so that no near-tie decides what is kept
        tv.roi_heads.box_predictor.cls_score.weight.mul_(4)
        tv.rpn.head.cls_logits.weight.mul_(4)
    d2 = build_detectron2_model(detectron2_architecture("faster_rcnn_fpn", "resnet18", 3)).eval()
    missing, unexpected = d2.load_state_dict(torchvision_detector_to_detectron2(tv.state_dict()), strict=False)
    assert not unexpected and all(k.startswith("pixel_") for k in missing)
    return tv, d2


def _detections(tv, d2, image):
    """Both models' detections on one (3, H, W) image in [0, 1] whose short side is the test size,
    so that neither resizes it: (boxes, scores, 0-based labels) each, highest score first."""
    with torch.no_grad():
        ours = tv([image])[0]
        theirs = d2([{"image": image * 255, "height": image.shape[1], "width": image.shape[2]}])[0]["instances"]
    return ((ours["boxes"], ours["scores"], ours["labels"] - 1),
            (theirs.pred_boxes.tensor, theirs.scores, theirs.pred_classes))


@pytest.mark.skipif(not HAS_DETECTRON2, reason="detectron2 is not installed (it is built from source; see README)")
def test_a_renamed_detector_computes_the_same_in_detectron2():
    """The renaming checked for real: the same features, RPN outputs and box-head scores and deltas
    in detectron2's model as in torchvision's, on the same image and boxes."""
    from detectron2.structures import Boxes

    tv, d2 = _detector_pair()
    image = torch.rand(1, 3, 128, 160)
    with torch.no_grad():
        normalised = (image - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
            torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        ours = list(tv.backbone(normalised).values())
        theirs = d2.backbone(normalised)
        theirs = [theirs[f"p{k}"] for k in range(2, 7)]
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        objectness, deltas = tv.rpn.head(ours)
        d2_objectness, d2_deltas = d2.proposal_generator.rpn_head(theirs)
        for a, b in zip(objectness + deltas, d2_objectness + d2_deltas):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        tv_anchors = tv.rpn.anchor_generator.cell_anchors
        for a, b in zip(tv_anchors, d2.proposal_generator.anchor_generator.cell_anchors):
            torch.testing.assert_close(a, b)  # rounded to whole pixels, as torchvision's
        boxes = torch.tensor([[10.0, 12.0, 70.0, 90.0], [0.0, 0.0, 160.0, 128.0], [40.0, 30.0, 56.0, 50.0]])
        pooled = tv.roi_heads.box_roi_pool(dict(zip(["0", "1", "2", "3"], ours[:4])), [boxes], [(128, 160)])
        scores, regression = tv.roi_heads.box_predictor(tv.roi_heads.box_head(pooled))
        d2_pooled = d2.roi_heads.box_pooler(theirs[:4], [Boxes(boxes)])
        d2_scores, d2_deltas = d2.roi_heads.box_predictor(d2.roi_heads.box_head(d2_pooled))
        torch.testing.assert_close(torch.cat([scores[:, 1:], scores[:, :1]], 1), d2_scores, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(regression[:, 4:], d2_deltas, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAS_DETECTRON2, reason="detectron2 is not installed (it is built from source; see README)")
@pytest.mark.parametrize("direction", ["torchvision to detectron2", "detectron2 to torchvision"])
def test_renamed_weights_give_the_same_detections_in_both_libraries(pseudo_run, direction):
    """Whole detectors, end to end (proposals, pooling, NMS, per-class boxes) on sample images:
    torchvision's weights run by detectron2, and detectron2's weights run by torchvision."""
    from dap_ray.data.images import decode_image
    from dap_ray.models.detectors import build_detector
    from dap_ray.models.detectron2_names import detectron2_detector_to_torchvision

    tv, d2 = _detector_pair()
    if direction == "detectron2 to torchvision":
        tv = build_detector("faster_rcnn_fpn", "resnet18", 3, min_size=(128,)).eval()
        tv.load_state_dict(detectron2_detector_to_torchvision(d2.state_dict()), strict=True)
    _, sample, _ = pseudo_run
    paths = sorted((sample / "images").rglob("*.jpg"))[:3]
    for path in paths:
        pixels = torch.from_numpy(decode_image(path.read_bytes())).permute(2, 0, 1).float() / 255
        image = torch.nn.functional.interpolate(pixels[None], size=(128, 160), mode="bilinear")[0]
        (boxes, scores, labels), (d2_boxes, d2_scores, d2_labels) = _detections(tv, d2, image)
        assert len(boxes) > 10, "too few detections to compare"
        assert len(boxes) == len(d2_boxes)
        torch.testing.assert_close(scores, d2_scores, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(labels, d2_labels)
        torch.testing.assert_close(boxes, d2_boxes, rtol=0, atol=1e-2)
