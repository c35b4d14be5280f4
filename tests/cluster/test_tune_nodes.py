"""A sweep on several nodes: a trial's node preempted, later another trial's node killed; the
finished trials are kept, each lost trial is retried, and the sweep ends with every trial."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.cluster.conftest import LossSequence, record_figure, top_up

pytestmark = pytest.mark.cluster
TRIAL_ACTOR = "ImplicitFunc"  # Ray Tune's actor class for a function trainable


def finished_trials(experiment: Path) -> dict[str, str]:
    """Trial folder -> its results (one JSON line per report), for trials whose last result says done."""
    finished = {}
    for path in experiment.glob("*/result.json"):
        text = path.read_text()
        lines = text.splitlines()
        if lines and json.loads(lines[-1]).get("done"):
            finished[path.parent.name] = text
    return finished


def test_a_sweep_keeps_finished_trials_and_retries_lost_ones(node_cluster, tmp_path):
    from dap_ray.data.downstream_sample import DownstreamSampleConfig, make_downstream_sample
    from dap_ray.steps.tune import TuneFinetuneConfig, tune_finetune

    top_up(node_cluster)
    data = make_downstream_sample(tmp_path / "data", DownstreamSampleConfig(num_train=16, num_test=2, num_classes=2,
                                                                           image_size=64))
    output = tmp_path / "sweep"
    experiment = output / "ray" / "finetune_k2"
    finished_before: dict[str, str] = {}

    def progressed(since: float) -> bool:
        # The first loss once a trial has finished; the next once the lost trial runs again.
        finished = finished_trials(experiment)
        if since == 0.0 and finished:
            finished_before.update(finished)
        return bool(finished) and time.time() > since + 3

    losses = LossSequence(node_cluster, TRIAL_ACTOR, progressed)
    losses.start()
    started = time.time()
    summary = tune_finetune(TuneFinetuneConfig(
        train=str(data / "coco" / "train.json"), train_images=str(data / "images"), init="scratch",
        backbone="tests.factories:slow_tiny_resnet", output=str(output), shots=(2,), search="grid", iterations=(8,),
        lrs=(0.01, 0.02, 0.03), val_images=2, evals_per_trial=1, min_sizes=(48,), max_size=96,
        roi_batch_size_per_image=16, test_proposals=50, max_concurrent_trials=1))
    losses.check()
    assert len(summary["trials"]) == 3 and all(not t["stopped_early"] for t in summary["trials"])
    assert all(t["iterations_run"] == 8 for t in summary["trials"])
    finished = finished_trials(experiment)
    kept = sorted(name for name, results in finished_before.items() if finished.get(name) == results)
    assert kept and kept == sorted(finished_before)  # a finished trial's results: not one line more
    record_figure(f"sweep (3 trials, one at a time): {len(kept)} finished trial(s) kept untouched through a "
                  f"preemption and a node loss; each lost trial retried from its start (trials keep no checkpoint); "
                  f"the sweep took {time.time() - started:.0f} s")
