"""Classifier training on Ray Train, at tiny sizes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dap_ray.data.sample import SampleConfig, make_sample_dataset
from dap_ray.models.classifiers import load_classifier
from dap_ray.steps.classify import ClassifierTrainConfig, split_items, train_classifier

ROOT = Path(__file__).resolve().parents[1]
TINY = "tests.factories:tiny_resnet"


@pytest.fixture(scope="module")
def tiny_sample(tmp_path_factory):
    return make_sample_dataset(tmp_path_factory.mktemp("sample"), SampleConfig(num_images=36, num_classes=3, image_size=48))


def tiny_config(sample, output, **overrides):
    values = dict(data=str(sample / "images"), class_map=str(sample / "classes.txt"), output=str(output), arch=TINY,
                  epochs=2, batch_size=8, image_size=32, num_workers=1, cpus_per_worker=2)
    return ClassifierTrainConfig(**{**values, **overrides})


def test_training_writes_a_loadable_classifier_and_a_rerun_resumes(ray_session, tiny_sample, tmp_path):
    run = tmp_path / "run"
    first = train_classifier(tiny_config(tiny_sample, run, epochs=1))
    model = load_classifier(TINY, weights=run / "classifier.pt", num_classes=3)
    assert model.fc.out_features == 3
    saved = json.loads((run / "meta.json").read_text())
    assert saved["classes"] == ["disc", "square", "triangle"] and saved["epochs"] == 1
    assert 0.0 <= saved["val_top1"] <= 1.0 and saved == first
    assert saved["val_images"] + saved["train_images"] == 36
    assert yaml.safe_load((run / "config.yaml").read_text())["arch"] == TINY

    # The same command with more epochs continues from the epoch-1 checkpoint.
    second = train_classifier(tiny_config(tiny_sample, run, epochs=2))
    assert second["epochs"] == 2 and len(second["history"]) == 2
    assert second["history"][0] == first["history"][0]  # restored, not trained again
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in second["history"])


def test_two_workers_train_with_ddp(ray_session, tiny_sample, tmp_path):
    meta = train_classifier(tiny_config(tiny_sample, tmp_path / "run", epochs=1, num_workers=2, cpus_per_worker=1))
    assert meta["epochs"] == 1 and meta["config"]["num_workers"] == 2


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
