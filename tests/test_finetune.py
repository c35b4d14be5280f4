"""Step 4: initialisation, schedules, fine-tuning on Ray Train with evaluation, resume and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dap_ray.models.detectors import CLASS_DEPENDENT_LAYERS, build_detector, detector_state_dict, initialise
from dap_ray.steps.finetune import FinetuneConfig, finetune, resolve_schedule
from tests.test_tracking import mlflow_runs

ROOT = Path(__file__).resolve().parents[1]
TINY = "tests.factories:tiny_resnet"


def tiny(detector="faster_rcnn_fpn", num_classes=3, backbone=TINY, seed=0):
    torch.manual_seed(seed)
    return build_detector(detector, backbone, num_classes, min_size=(48,), max_size=96,
                          **({"roi_batch_size_per_image": 16} if detector == "faster_rcnn_fpn" else {}))


def fake_dap_run(folder: Path, detector="faster_rcnn_fpn", num_classes=3, backbone=TINY) -> Path:
    """What jobs/pretrain.py leaves: detector_final.pt and meta.json."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(detector_state_dict(tiny(detector, num_classes, backbone, seed=1)), folder / "detector_final.pt")
    (folder / "meta.json").write_text(json.dumps({
        "detector": detector, "backbone": backbone, "num_classes": num_classes + 1,
        "config": {"trainable_layers": 3, "min_sizes": [48], "max_size": 96, "roi_batch_size_per_image": 16}}))
    return folder


@pytest.mark.parametrize("detector", ["faster_rcnn_fpn", "retinanet_fpn"])
@pytest.mark.parametrize("downstream_classes", [3, 5])  # as many classes as the pre-training, and more
def test_dap_init_loads_every_tensor_but_the_class_dependent_layers(tmp_path, detector, downstream_classes):
    run = fake_dap_run(tmp_path / "dap", detector)
    checkpoint = torch.load(run / "detector_final.pt", weights_only=True)
    model = tiny(detector, downstream_classes, seed=7)
    fresh_before = {k: v.clone() for k, v in model.state_dict().items()}
    report = initialise(model, f"dap:{run}", detector=detector, backbone=TINY)
    fresh = CLASS_DEPENDENT_LAYERS[detector]
    state = model.state_dict()
    for key, value in state.items():
        if any(key.startswith(layer + ".") for layer in fresh):
            assert torch.equal(value, fresh_before[key]), f"{key} should start fresh"
        elif key in checkpoint:
            assert torch.equal(value, checkpoint[key]), f"{key} should come from the checkpoint"
    assert report["fresh_layers"] == list(fresh)
    assert report["loaded"] == len([k for k in state if not any(k.startswith(f + ".") for f in fresh)])
    assert report["modules"]["backbone.body"]["fresh"] == 0 and report["modules"]["backbone.fpn"]["fresh"] == 0
    if detector == "retinanet_fpn":  # the fresh classification layer keeps RetinaNet's prior-probability bias
        bias = state["head.classification_head.cls_logits.bias"]
        assert torch.allclose(bias, torch.full_like(bias, -4.59512), atol=1e-4)


def test_cls_init_loads_the_trunk_only_and_scratch_nothing(tmp_path):
    from dap_ray.models.classifiers import load_classifier
    from tests.factories import tiny_resnet

    torch.manual_seed(3)
    torch.save(tiny_resnet(num_classes=6).state_dict(), tmp_path / "classifier.pt")
    classifier = load_classifier(TINY, tmp_path / "classifier.pt").state_dict()
    model = tiny(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = initialise(model, f"cls:{tmp_path / 'classifier.pt'}", detector="faster_rcnn_fpn", backbone=TINY)
    for key, value in model.state_dict().items():
        if key.startswith("backbone.body."):
            name = key[len("backbone.body."):]
            if name in classifier:
                assert torch.equal(value, classifier[name])
        else:
            assert torch.equal(value, before[key])  # FPN, RPN and heads stay as built
    assert report["modules"]["backbone.body"]["fresh"] == 0 and report["modules"]["rpn"]["loaded"] == 0
    scratch = initialise(tiny(), "scratch", detector="faster_rcnn_fpn", backbone=TINY)
    assert scratch["loaded"] == 0


@pytest.mark.parametrize("init, message", [
    ("", "expected dap:RUN_DIR_OR_FILE"),
    ("dap:", "expected dap:RUN_DIR_OR_FILE"),
    ("imagenet", "expected dap:RUN_DIR_OR_FILE"),
    ("dap:{tmp}/missing", "meta.json not found"),
    ("dap:{tmp}/resnet18_run", "pre-trained a faster_rcnn_fpn on resnet18, but this run builds"),
    ("dap:{tmp}/retinanet_run", "pre-trained a retinanet_fpn"),
    ("cls:{tmp}/not_a_trunk.pt", "not_a_trunk.pt do not fit classifier"),
    ("cls:resnet18", "not this run's trunk"),
])
def test_an_init_that_would_load_nothing_or_the_wrong_model_is_refused(tmp_path, init, message):
    fake_dap_run(tmp_path / "resnet18_run", backbone="resnet18")
    fake_dap_run(tmp_path / "retinanet_run", detector="retinanet_fpn")
    torch.save({"something.else": torch.zeros(3)}, tmp_path / "not_a_trunk.pt")
    with pytest.raises(ValueError, match=message):
        initialise(tiny(), init.format(tmp=tmp_path), detector="faster_rcnn_fpn", backbone=TINY)


def test_a_checkpoint_of_another_shape_is_refused_not_loaded_in_part(tmp_path):
    run = fake_dap_run(tmp_path / "dap")
    state = torch.load(run / "detector_final.pt", weights_only=True)
    state["rpn.head.conv.0.0.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, run / "detector_final.pt")
    with pytest.raises(ValueError, match="does not fit"):
        initialise(tiny(), f"dap:{run}", detector="faster_rcnn_fpn", backbone=TINY)


@pytest.mark.parametrize("overrides, images, expected", [
    # VOC: 14 epochs of the training set at the total batch, lr 0.01 x batch / 16, steps at epoch 10
    (dict(format="voc"), 5011, dict(max_iters=4385, lr=0.01, lr_steps=(10 / 14,), min_sizes=(640,), max_size=1066,
                                    warmup_iters=500)),
    (dict(format="voc", batch_size=2, num_workers=2), 16551, dict(max_iters=57929, lr=0.0025, warmup_iters=2000)),
    # COCO 1x: 90K iterations at 16 images, steps at 60K and 80K
    (dict(format="coco"), 118287, dict(max_iters=90000, lr=0.02, lr_steps=(60 / 90, 80 / 90), min_sizes=(800,),
                                       max_size=1333)),
    # k-shot: the preset's table, in images seen; warm-up at most a quarter of the run
    (dict(format="voc", shots=5), 100, dict(max_iters=800, warmup_iters=200)),
    (dict(format="voc", shots=7, batch_size=4), 140, dict(max_iters=4480)),  # 7 is nearest 5: 800 x 16 x 7/5 / 4
    (dict(format="coco", shots=10, max_iters=123, lr=0.5, min_sizes=(100, 200)), 800,
     dict(max_iters=123, lr=0.5, min_sizes=(100, 200), max_size=1333)),  # what the user set is kept
])
def test_schedules_follow_the_papers_presets_scaled_to_the_batch(overrides, images, expected):
    resolved = resolve_schedule(FinetuneConfig(**({"batch_size": 16} | overrides)), images)
    for key, value in expected.items():
        assert getattr(resolved, key) == pytest.approx(value), key


@pytest.mark.parametrize("overrides, message", [
    (dict(init="pretrained"), "expected dap:RUN_DIR_OR_FILE"),
    (dict(shots=0), "shots must be at least 1"),
    (dict(seeds=()), "seeds must be distinct"),
    (dict(seeds=(1, 1)), "seeds must be distinct"),
    (dict(train_splits=("2007",)), "YEAR:SPLIT"),
    (dict(lr_steps=(1.2,)), "lr_steps"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_options_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(**overrides)


@pytest.fixture(scope="module")
def downstream(tmp_path_factory):
    from dap_ray.data.downstream_sample import DownstreamSampleConfig, make_downstream_sample

    return make_downstream_sample(tmp_path_factory.mktemp("downstream"),
                                  DownstreamSampleConfig(num_train=24, num_test=10, num_classes=3, image_size=64))


def small_config(downstream, output, **overrides):
    values = dict(train=str(downstream / "coco" / "train.json"), test=str(downstream / "coco" / "test.json"),
                  train_images=str(downstream / "images"), test_images=str(downstream / "images"), format="coco",
                  output=str(output), init="scratch", backbone=TINY, batch_size=2, num_workers=1, cpus_per_worker=2, loader_workers=0,
                  max_iters=4, checkpoint_every=2, eval_every=2, min_sizes=(48,), max_size=96,
                  roi_batch_size_per_image=16, lr=0.01, log_every_s=0.0)
    return FinetuneConfig(**(values | overrides))


def test_a_k_shot_run_evaluates_writes_its_outputs_and_resumes_after_dying(ray_session, downstream, tmp_path, capfd):
    from dap_ray.steps.ray_setup import TrainingFailedError
    from tests.factories import FAIL_AT_STEP_THREE_MARKER

    FAIL_AT_STEP_THREE_MARKER.unlink(missing_ok=True)
    run = tmp_path / "run"
    cfg = small_config(downstream, run, backbone="tests.factories:fail_at_step_three_tiny_resnet", shots=2,
                       seeds=(4,), max_failures=0, mlflow_uri="local")
    with pytest.raises(TrainingFailedError, match="simulated failure at training step 3"):
        finetune(cfg)  # dies in iteration 3, after the iteration-2 checkpoint and evaluation
    capfd.readouterr()
    meta = finetune(cfg)
    out = capfd.readouterr().out
    assert "resuming at iteration 2/4" in out
    assert meta["iterations"] == 4 and meta["seed"] == 4 and meta["classes"] == ["chevron", "frame", "heart"]
    evaluations = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evaluations] == [2, 4]  # whole after the resume, no line twice
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "VOC_AP50", "VOC07_AP50", "per_class"} <= set(metrics)
    detections = json.loads((run / "detections.json").read_text())
    test_ids = {i["id"] for i in json.loads((downstream / "coco" / "test.json").read_text())["images"]}
    assert all(d["image_id"] in test_ids and d["category_id"] in (1, 2, 3) and len(d["bbox"]) == 4 for d in detections)
    kshot = json.loads((run / "kshot_images.json").read_text())
    assert kshot["k"] == 2 and kshot["seed"] == 4 and len(kshot["image_ids"]) == len(set(kshot["image_ids"])) >= 2
    assert meta["train_images"] <= len(kshot["image_ids"])
    assert json.loads((run / "init_report.json").read_text())["init"] == "scratch"
    assert (run / "learning_curve.png").stat().st_size > 1000
    state = torch.load(run / "detector_final.pt", weights_only=True)
    tiny(backbone=cfg.backbone).load_state_dict(state, strict=True)
    runs = mlflow_runs(f"sqlite:///{run.resolve()}/mlflow.db", "finetune")
    assert len(runs) == 1 and runs.iloc[0]["metrics.final/AP50"] == pytest.approx(meta["final"]["AP50"])
    assert runs.iloc[0]["params.shots"] == "2"
    again = finetune(cfg)  # everything done: found, not trained again
    assert again["iterations"] == 4 and "already done" in capfd.readouterr().out


def test_several_seeds_give_mean_and_spread():
    from dap_ray.steps.finetune import _summarise

    runs = [{"seed": s, "iterations": 4, "final": {k: v for k in ("AP", "AP50", "AP75", "APs", "APm", "APl",
                                                                    "VOC_AP50", "VOC07_AP50")}}
            for s, v in ((0, 10.0), (1, 14.0), (2, None))]
    summary = _summarise(FinetuneConfig(init="scratch", seeds=(0, 1, 2)), runs)
    assert summary["metrics"]["AP"]["mean"] == 12.0
    assert summary["metrics"]["AP"]["std"] == pytest.approx(2 ** 0.5 * 2)
    assert summary["metrics"]["AP"]["values"] == [10.0, 14.0]  # an unmeasured value (nan) is left out


@pytest.mark.parametrize("overrides, message", [
    (dict(train="{tmp}/missing.json"), "missing.json"),
    (dict(init="dap:{tmp}/nowhere"), "meta.json not found"),
    (dict(num_workers=40), "cannot feed 40 workers"),
])
def test_bad_input_is_named_before_training(downstream, tmp_path, overrides, message):
    overrides = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in overrides.items()}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        finetune(small_config(downstream, tmp_path / "run", **overrides))


def test_annotations_that_name_unknown_classes_are_counted_not_fatal(downstream, tmp_path):
    from dap_ray.steps.finetune import load_split

    coco = json.loads((downstream / "coco" / "train.json").read_text())
    coco["annotations"][0]["category_id"] = 99
    coco["annotations"][1]["bbox"] = [0, 0, 0, 5]
    (tmp_path / "train.json").write_text(json.dumps(coco))
    data = load_split(small_config(downstream, tmp_path, train=str(tmp_path / "train.json")), "train")
    assert sum(data.report["skipped"].values()) == 2


def test_finetune_job_help_and_bad_input_exit_cleanly(tmp_path):
    shown = subprocess.run([sys.executable, "jobs/finetune.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert shown.returncode == 0 and "--init" in shown.stdout and "--shots" in shown.stdout
    bad = subprocess.run([sys.executable, "jobs/finetune.py", "--train", str(tmp_path / "missing.json"),
                          "--init", "scratch"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.json" in bad.stderr and "Traceback" not in bad.stderr


def test_the_embedded_default_is_the_downstream_sample_from_the_samples_dap_run(tmp_path, monkeypatch):
    from dap_ray.steps.embedded import finetune_defaults

    monkeypatch.setenv("DAP_RAY_CACHE", str(tmp_path))
    fake_dap_run(tmp_path / "sample-v1" / "pretrained")
    cfg = finetune_defaults(FinetuneConfig(batch_size=8))
    assert cfg.init == f"dap:{tmp_path / 'sample-v1' / 'pretrained'}" and cfg.format == "coco"
    assert Path(cfg.train).is_file() and Path(cfg.test).is_file() and cfg.min_sizes == (160,)
    assert cfg.batch_size == 8  # what the user set is kept
    assert cfg.max_iters == 150
    tuned = finetune_defaults(FinetuneConfig(shots=5, kshot_table="kshot_preset.yaml"))
    assert tuned.max_iters is None  # regression: the sample's 150 overrode the table's iterations for K
    mine = FinetuneConfig(train="my.json", init="scratch")
    assert finetune_defaults(mine) == mine


def test_the_reproductions_table_pairs_seeds_and_its_quick_grid():
    from dap_ray.steps.reproduce import ReproduceConfig, _difference, _markdown, _stats

    dap, cls = _stats([10.0, 12.0, 14.0]), _stats([9.0, 12.5, 11.0])
    diff = _difference(dap, cls)
    assert diff["mean"] == pytest.approx(12.0 - 32.5 / 3) and diff["values"] == [1.0, -0.5, 3.0]
    assert ReproduceConfig(quick=True).grid() == (("5", "all"), (40, 80), (0,))
    with pytest.raises(ValueError, match="one --iterations entry per --shots entry"):
        ReproduceConfig(shots=("5",), iterations=(1, 2))
    with pytest.raises(ValueError, match="positive numbers or 'all'"):
        ReproduceConfig(shots=("five",), iterations=(1,))
    table = {"seeds": [0, 1, 2], "pretrain_iters": 400, "shots": ["5"], "iterations": [40],
             "rows": {"5": {"CLS": {"AP": cls, "AP50": cls}, "DAP": {"AP": dap, "AP50": dap},
                            "DAP-CLS": {"AP": diff, "AP50": diff}}}}
    assert "| 5 | 40 | 10.8 ± 1.8 | 12.0 ± 2.0 | +1.2 ± 1.8 |" in _markdown(table)  # differences signed
