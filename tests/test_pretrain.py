import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dap_ray.models.detectors import build_detector
from dap_ray.steps.pretrain import PretrainConfig, pretrain
from dap_ray.steps.pretrain.torchvision_backend import schedule_factor
from tests.helpers import pseudo_run_as
from tests.test_tracking import mlflow_runs

ROOT = Path(__file__).resolve().parents[1]
TINY = "tests.factories:tiny_resnet"


def small_config(pseudo_run, output, **overrides):
    boxes_dir, _, weights = pseudo_run
    values = dict(boxes=str(boxes_dir), output=str(output), backbone=TINY, backbone_weights=str(weights),
                  num_workers=2, cpus_per_worker=1, loader_workers=0, batch_size=2, max_iters=4, checkpoint_every=2,
                  warmup_iters=2, lr=0.01, min_sizes=(32, 48), max_size=96, roi_batch_size_per_image=16,
                  log_every_s=0.0)
    return PretrainConfig(**(values | overrides))


def in_format(pseudo_run, fmt, root):
    """The pseudo run with its images in a tar per class, a WebDataset shard or a Parquet file."""
    boxes_dir, sample, weights = pseudo_run
    boxes, _, _ = pseudo_run_as(fmt, root, boxes_dir, sample / "images", sample / "classes.txt")
    return boxes, sample, weights


@pytest.mark.resume
def test_two_workers_pretrain_die_and_a_rerun_resumes_from_the_checkpoint(pseudo_run, ray_session, tmp_path, capfd):
    from dap_ray.steps.ray_setup import TrainingFailedError
    from tests.factories import FAIL_AT_STEP_THREE_MARKER

    FAIL_AT_STEP_THREE_MARKER.unlink(missing_ok=True)
    backbone = "tests.factories:fail_at_step_three_tiny_resnet"
    # From synset tars, each image one positioned read, in two forked loader processes per worker.
    cfg = small_config(in_format(pseudo_run, "tar", tmp_path), tmp_path / "run", backbone=backbone,
                       backbone_weights=None, max_iters=3, checkpoint_every=1, max_failures=0, loader_workers=1,
                       mlflow_uri="local")
    with pytest.raises(TrainingFailedError, match="simulated failure at training step 3"):
        pretrain(cfg)  # a rank dies in iteration 3, after the iteration-2 checkpoint
    capfd.readouterr()
    meta = pretrain(cfg)
    out = capfd.readouterr()
    assert "resuming at iteration 2/3" in out.out + out.err
    assert "iter 3/3 loss" in out.out + out.err and "100%, 0s left" in out.out + out.err  # where the run is
    assert meta["iterations"] == 3 and meta["num_classes"] == 4 and meta["classes"][0] == "__background__"
    assert meta["images"] == 22 and meta["skipped_without_boxes"] == 2 and "skipping" not in out.out + out.err
    assert [h["iteration"] for h in meta["history"]] == [1, 2, 3]
    runs = mlflow_runs(f"sqlite:///{(tmp_path / 'run').resolve()}/mlflow.db", "pretrain")
    assert len(runs) == 1 and runs.iloc[0]["params.max_iters"] == "3" and runs.iloc[0]["metrics.final/iterations"] == 3
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in meta["history"])
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "lr", "images_per_s"} <= \
        set(meta["history"][0])
    state = torch.load(tmp_path / "run" / "detector_final.pt", weights_only=True)
    build_detector("faster_rcnn_fpn", backbone, 3).load_state_dict(state, strict=True)
    assert (tmp_path / "run" / "config.yaml").is_file()

    # Settings that change what is learnt cannot change on a rerun: it would mix two runs.
    with pytest.raises(ValueError, match=r"other settings \(max_iters: 3 then, 4 now\)"):
        pretrain(dataclasses.replace(cfg, max_iters=4))


def test_retinanet_worker_group_that_fails_once_is_restarted_and_finishes(pseudo_run, ray_session, tmp_path):
    from tests.factories import FAIL_ONCE_MARKER

    FAIL_ONCE_MARKER.unlink(missing_ok=True)
    meta = pretrain(small_config(in_format(pseudo_run, "parquet", tmp_path), tmp_path / "run", detector="retinanet_fpn",
                                 backbone="tests.factories:fail_once_tiny_resnet", num_workers=1, cpus_per_worker=2,
                                 max_iters=2, max_failures=1))
    assert FAIL_ONCE_MARKER.exists() and meta["iterations"] == 2  # the first attempt raised, the restart trained
    state = torch.load(tmp_path / "run" / "detector_final.pt", weights_only=True)
    build_detector("retinanet_fpn", TINY, 3).load_state_dict(state, strict=True)
    assert set(meta["history"][0]) >= {"classification", "bbox_regression"}
    # Each progress line once: in the worker's stdout, not again in its stderr (then the driver shows it twice).
    logs = Path(ray_session._private.worker._global_node.get_logs_dir_path())
    printed = {suffix: sum(f.read_text(errors="replace").count("iter 2/2 loss") for f in logs.glob(f"worker-*.{suffix}"))
               for suffix in ("out", "err")}
    assert printed == {"out": 1, "err": 0}


def test_pretrain_from_webdataset_shards(pseudo_run, ray_session, tmp_path, capfd):
    meta = pretrain(small_config(in_format(pseudo_run, "webdataset", tmp_path), tmp_path / "run", num_workers=1,
                                 cpus_per_worker=2, loader_workers=1, max_iters=2))
    out = capfd.readouterr()
    from dap_ray.data.pseudo_boxes import load_pseudo_boxes

    assert meta["iterations"] == 2 and meta["images"] == 22
    assert meta["pseudo_boxes"] == load_pseudo_boxes(pseudo_run[0]).num_boxes  # the same boxes as the folder run's
    assert "skipping" not in out.out + out.err and "input indexed (1 files" in out.out + out.err
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in meta["history"])


def test_a_diverging_run_stops_with_a_one_line_reason(pseudo_run, ray_session, tmp_path):
    from dap_ray.steps.ray_setup import TrainingFailedError

    with pytest.raises(TrainingFailedError, match="loss became (nan|inf).*the same command resumes"):
        pretrain(small_config(pseudo_run, tmp_path / "run", lr=1e8, warmup_iters=0, num_workers=1, cpus_per_worker=2,
                              max_iters=6, max_failures=0))


@pytest.mark.parametrize("overrides, message", [
    (dict(boxes="/nonexistent/boxes"), "not a folder"),
    (dict(backbone_weights="/nonexistent/classifier.pt"), "backbone weights not found"),
    (dict(input="/nonexistent/images"), "input not found"),
    (dict(num_workers=30), "30 workers need more"),
])
def test_pretrain_rejects_bad_input_before_training(pseudo_run, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        pretrain(small_config(pseudo_run, tmp_path / "run", **overrides))


@pytest.mark.parametrize("requested, use_gpu, loader_workers, expected", [
    (None, True, 0, 1),  # a GPU worker without loader processes: its own CPU
    (None, True, 2, 3),  # and one per DataLoader process, which decode and resize for it
    (4, True, 2, 4),  # as asked, with GPUs too
    (3, False, 2, 3),
])
def test_gpu_workers_reserve_cpus_to_decode_with(requested, use_gpu, loader_workers, expected):
    from dap_ray.steps.ray_setup import cpus_per_worker

    assert cpus_per_worker(requested, use_gpu, 2, loader_workers) == expected


@pytest.mark.parametrize("overrides, message", [
    (dict(max_iters=0), "max_iters"),
    (dict(min_sizes=()), "min_sizes"),
    (dict(lr_steps=(1.5,)), "lr_steps"),
    (dict(warmup_factor=0.0), "warmup_factor"),
    (dict(max_boxes_per_image=0), "max_boxes_per_image"),
])
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        PretrainConfig(**overrides)


def test_learning_rate_warms_up_then_steps_down():
    cfg = PretrainConfig(max_iters=1000, warmup_iters=100, warmup_factor=0.01, lr_steps=(0.5, 0.9), batch_size=4,
                         num_workers=4)
    assert cfg.learning_rate() == pytest.approx(0.008 * 16 / 64)
    assert [round(schedule_factor(cfg, i), 4) for i in (0, 50, 100, 499, 500, 899, 900)] == \
        [0.01, 0.505, 1.0, 1.0, 0.1, 0.1, 0.01]


def test_detectron2_backend_without_detectron2_says_how_to_install(pseudo_run, tmp_path):
    if importlib.util.find_spec("detectron2") is not None:
        pytest.skip("detectron2 is installed here: tests/test_detectron2.py trains with it")
    with pytest.raises(ValueError, match="pip install .*detectron2"):
        pretrain(small_config(pseudo_run, tmp_path / "run", backend="detectron2"))


def test_pretrain_job_help_and_bad_input_exit_cleanly(tmp_path):
    shown = subprocess.run([sys.executable, "jobs/pretrain.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert shown.returncode == 0 and "--min-sizes" in shown.stdout and "--backbone-weights" in shown.stdout
    bad = subprocess.run([sys.executable, "jobs/pretrain.py", "--boxes", str(tmp_path / "missing")], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "missing" in bad.stderr and "Traceback" not in bad.stderr
