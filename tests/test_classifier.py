"""Classifier training on Ray Train, at tiny sizes."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dap_ray.data.sample import SampleConfig, make_sample_dataset
from dap_ray.models.classifiers import load_classifier
from dap_ray.steps.classify import ClassifierTrainConfig, split_items, train_classifier
from tests.test_tracking import mlflow_runs

ROOT = Path(__file__).resolve().parents[1]
TINY = "tests.factories:tiny_resnet"


@pytest.fixture(scope="module")
def tiny_sample(tmp_path_factory):
    return make_sample_dataset(tmp_path_factory.mktemp("sample"), SampleConfig(num_images=36, num_classes=3, image_size=48))


def tiny_config(sample, output, **overrides):
    values = dict(data=str(sample / "images"), class_map=str(sample / "classes.txt"), output=str(output), arch=TINY,
                  epochs=2, batch_size=8, image_size=32, num_workers=1, cpus_per_worker=2)
    return ClassifierTrainConfig(**{**values, **overrides})


def test_training_writes_a_loadable_classifier_and_a_rerun_resumes(ray_session, tiny_sample, tmp_path, capfd):
    from dap_ray.steps.ray_setup import TrainingFailedError
    from tests.factories import FAIL_IN_EPOCH_TWO_MARKER

    FAIL_IN_EPOCH_TWO_MARKER.unlink(missing_ok=True)
    run = tmp_path / "run"
    cfg = tiny_config(tiny_sample, run, arch="tests.factories:fail_in_epoch_two_tiny_resnet", max_failures=0,
                      mlflow_uri="local")
    with pytest.raises(TrainingFailedError, match="simulated failure at training step 6"):
        train_classifier(cfg)  # dies in epoch 2, after the epoch-1 checkpoint
    split = json.loads((run / "split.json").read_text())
    # The same command resumes after epoch 1, on the split it saved.
    meta = train_classifier(cfg)
    out = capfd.readouterr().out
    assert "resuming after epoch 1/2" in out
    # Each epoch's line ends with where the run is: epoch 2 of 2 done, nothing left.
    assert re.search(r"epoch 2/2: loss .* images/s, 100%, 0s left", out), out[-2000:]
    runs = mlflow_runs(f"sqlite:///{run.resolve()}/mlflow.db", "classifier")  # the finished run, logged once
    assert len(runs) == 1 and runs.iloc[0]["params.arch"] == "tests.factories:fail_in_epoch_two_tiny_resnet"
    assert runs.iloc[0]["metrics.val_top1"] == pytest.approx(meta["val_top1"])
    assert meta["epochs"] == 2 and len(meta["history"]) == 2
    assert json.loads((run / "split.json").read_text()) == split
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in meta["history"])
    model = load_classifier(cfg.arch, weights=run / "classifier.pt", num_classes=3)
    assert model.fc.out_features == 3
    saved = json.loads((run / "meta.json").read_text())
    assert saved["classes"] == ["disc", "square", "triangle"] and saved == meta
    assert 0.0 <= saved["val_top1"] <= 1.0
    assert saved["val_images"] + saved["train_images"] == 36
    assert yaml.safe_load((run / "config.yaml").read_text())["arch"] == cfg.arch


def test_two_workers_train_with_ddp(ray_session, tiny_sample, tmp_path):
    meta = train_classifier(tiny_config(tiny_sample, tmp_path / "run", epochs=1, num_workers=2, cpus_per_worker=1))
    assert meta["epochs"] == 1 and meta["config"]["num_workers"] == 2


def test_a_rerun_with_other_settings_is_refused_before_resuming(tiny_sample, tmp_path):
    """A rerun used to resume any checkpoint found in its output, whatever its settings."""
    from dap_ray.config import save_config

    run = tmp_path / "run"
    (run / "ray" / "classifier" / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    first = tiny_config(tiny_sample, run)
    save_config(first, run / "config.yaml")
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.001 then, 0.01 now\)"):
        train_classifier(tiny_config(tiny_sample, run, lr=0.01))


def test_validation_split_is_kept_when_the_folder_changes(tmp_path, capsys):
    """The split was recomputed on every start: after one file was added, images that earlier epochs
    trained on moved into validation."""
    from dap_ray.steps.classify import saved_split

    items = [(f"c{c}/{i}.jpg", c) for c in range(2) for i in range(15)]
    cfg = ClassifierTrainConfig(data="x", val_fraction=0.2)
    train, val = saved_split(tmp_path, items, cfg, resuming=False)
    grown = sorted(items + [("c0/new.jpg", 0)])
    assert split_items(grown, 0.2, 0)[1] != val  # what a fresh split would hold out now
    assert saved_split(tmp_path, grown, cfg, resuming=True) == (train, val)
    assert "1 images not in this run's saved split are left out" in capsys.readouterr().out


def test_an_unreadable_training_image_is_replaced_so_every_rank_takes_every_step(tmp_path):
    """A rank whose whole batch was unreadable skipped the step, and the ranks fell out of step."""
    import numpy as np

    from dap_ray.steps.classify import ImageListDataset, _collate
    from tests.helpers import encode, photo

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bad.jpg").write_bytes(b"not an image")
    (tmp_path / "a" / "good.png").write_bytes(encode(photo(np.random.default_rng(0), 8, 8)))
    items = [("a/bad.jpg", 0), ("a/good.png", 1)]
    train = ImageListDataset(tmp_path, items, lambda x: x, replace_unreadable=True)
    images, labels = _collate([train[0], train[0]])  # a batch of nothing but the unreadable image
    assert images.shape == (2, 3, 8, 8) and labels.tolist() == [1, 1]
    assert ImageListDataset(tmp_path, items, lambda x: x)[0] is None  # validation just drops it


def test_split_is_deterministic_stratified_and_disjoint():
    items = [(f"{c}/{i}.jpg", c) for c in range(3) for i in range(10)]
    train, val = split_items(items, 0.2, seed=0)
    assert split_items(items, 0.2, seed=0) == (train, val)
    assert not set(train) & set(val) and len(train) + len(val) == 30
    assert sorted(label for _, label in val) == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [([], "data (the image folder) is required"), (["--data", "/nonexistent"], "image folder not found"),
     (["--data", "x", "--epochs", "0"], "epochs must be at least 1")],
)
def test_job_reports_bad_input_clearly(argv, message):
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / "train_classifier.py"), *argv],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("job", ["train_classifier.py", "make_sample.py"])
def test_jobs_answer_help(job):
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / job), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--output" in result.stdout
