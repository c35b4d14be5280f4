"""Steps 1, 3 and 4 on several nodes: a node preempted (drained with the PREEMPTION reason, then
killed), later another killed outright, mid-run; each run resumes from its last checkpoint on
the nodes that remain or join, and ends with the asked iteration count."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.cluster.conftest import LossSequence, record_figure, top_up

pytestmark = pytest.mark.cluster
SLOW = "tests.factories:slow_tiny_resnet"  # tiny_resnet's weights, 0.1 s per forward pass
# Runs given an 8 s preemption notice train through it (the worker checkpoints and goes on until the kill):
# at 0.4 s or more per iteration the notice covers at most 20, so the first loss (at the first checkpoint,
# iteration 4) is over by iteration 25 and the second (at the next checkpoint after the resume) by about 29,
# before 36 iterations however fast the machine. With SLOW a fast machine finished a 16-iteration run inside
# the notice, and the second loss never came. The runs' lengths differ so that :func:`redone` can tell their
# progress lines apart in the session's logs.
SLOWER = "tests.factories:slower_tiny_resnet"
PRETRAIN_ITERS, FINETUNE_ITERS = 40, 44


def checkpointed(storage: Path):
    """Whether Ray Train wrote a checkpoint under ``storage`` since the loss at ``since`` (a folder not
    there when that loss was seen here: an old folder's time changes as Ray Train tidies it)."""
    before: dict[float, set[str]] = {}

    def progressed(since: float) -> bool:
        names = {p.name for p in storage.glob("*/checkpoint_*")}
        return bool(names - before.setdefault(since, names if since else set()))
    return progressed


def worker_logs(nodes) -> list[list[str]]:
    """The lines of each Ray worker's stdout file in ``nodes``' session (each Ray Train attempt is a new
    worker process; files of dead nodes stay on this machine's disk)."""
    return [path.read_text(errors="replace").splitlines()
            for path in Path(nodes.tmp).glob("ray/session_2*/logs/worker-*.out")]  # not session_latest, a link


def redone(nodes, progress: str, resumed: str, per_unit: int = 1) -> list[int]:
    """Work done twice, in iterations (or steps), once per resume: how far the lost attempt's progress
    lines had gone past the checkpoint the next attempt resumed from, read from :func:`worker_logs`.
    ``progress``/``resumed``: patterns whose groups give the position (iteration, or epoch and step)."""
    attempts = []
    for lines in worker_logs(nodes):
        start, reached = None, None
        for line in lines:
            if (m := re.search(resumed, line)):
                start = int(m.group(1)) * per_unit
            elif (m := re.search(progress, line)):
                groups = [int(g) for g in m.groups()]
                at = groups[0] if len(groups) == 1 else (groups[0] - 1) * per_unit + groups[1]
                reached = max(reached or 0, at)
        if reached is not None:
            attempts.append((start or 0, reached))
    attempts.sort()
    return [previous[1] - current[0] for previous, current in zip(attempts, attempts[1:], strict=False)]


def worker_lines(nodes, pattern: str) -> list[int]:
    """The first group of ``pattern`` in every line of the workers' logs that matches, as integers."""
    return sorted(int(m.group(1)) for lines in worker_logs(nodes) for line in lines if (m := re.search(pattern, line)))


def resumed_at_the_notice(nodes, total: int) -> tuple[int, int]:
    """(the iteration of the checkpoint written on the preemption notice, the one the next attempt resumed
    at): nothing before the notice is redone. Attempts never resume earlier than the one before, so the
    first resume is the smallest."""
    noticed = worker_lines(nodes, rf"preemption notice .*: checkpoint at iteration (\d+)/{total}")
    assert len(noticed) == 1, f"one checkpoint on the preemption notice expected, got {noticed}"
    resumed = worker_lines(nodes, rf"resuming at iteration (\d+)/{total}")
    assert resumed and resumed[0] >= noticed[0], f"resumed at {resumed}, before the notice's checkpoint {noticed[0]}"
    return noticed[0], resumed[0]


def assert_redone(counts: list[int], every: int, notice_iterations: int = 20) -> None:
    """``counts`` (from :func:`redone`: the preemption's, then the kill's) within what each loss allows.
    A preempted worker trains on through its notice (at most ``notice_iterations``: 8 s at 0.4 s or more
    each), and Ray Train may stop taking its checkpoints once it has the one written on the notice, so
    the preemption's redone work is what the notice covered, plus the iteration the notice came in
    (:func:`resumed_at_the_notice` checks that nothing before the notice is redone). A kill comes
    without notice: less than two checkpoint intervals (the one in progress, and a checkpoint written
    as the node died but never taken). Two counts are expected; one only when an attempt's resume line
    never reached its log (see :func:`report`), and then the kill's goes unchecked."""
    message = f"redone per loss (preempted, killed): {counts}"
    assert 1 <= len(counts) <= 2 and all(c >= 0 for c in counts), message
    assert counts[0] <= notice_iterations + 1 and all(c <= 2 * every for c in counts[1:]), message


def report(step: str, back_after: list[float], counts: list[int], unit: str,
           notice: tuple[int, int] | None = None) -> None:
    """One line per loss. A resume line can go missing (a line printed as a node dies may never reach
    the driver): then the work redone is said to be unseen, not guessed."""
    counts = counts + [None] * (len(back_after) - len(counts))
    for how, seconds, count in zip(("preempted", "killed"), back_after, counts, strict=False):
        redone_text = "work redone not seen" if count is None else f"{count} {unit} redone"
        if how == "preempted" and notice is not None:
            redone_text += (f" (a checkpoint written on the notice at iteration {notice[0]}; resumed at "
                            f"{notice[1]}, the latest)")
        record_figure(f"{step}, node {how}: a new Ray Train worker up {seconds:.1f} s after the loss; {redone_text}")


def test_classifier_training_survives_a_preemption_and_a_node_loss(node_cluster, tmp_path):
    from dap_ray.data.sample import SampleConfig, make_sample_dataset
    from dap_ray.steps.classify import ClassifierTrainConfig, train_classifier

    top_up(node_cluster)
    sample = make_sample_dataset(tmp_path / "sample", SampleConfig(num_images=40, num_classes=3, image_size=48))
    run = tmp_path / "run"
    losses = LossSequence(node_cluster, "RayTrainWorker", checkpointed(run / "ray"))
    losses.start()
    meta = train_classifier(ClassifierTrainConfig(
        data=str(sample / "images"), class_map=str(sample / "classes.txt"), output=str(run), arch=SLOW, epochs=3,
        batch_size=4, image_size=32, num_workers=1, cpus_per_worker=2, max_failures=1, log_every_s=0.0))
    back_after = losses.check()
    steps = len(json.loads((run / "split.json").read_text())["train"]) // 4  # whole batches: the last is dropped
    counts = redone(node_cluster, r"epoch (\d+)/3 step (\d+)/", r"resuming after epoch (\d+)/3", per_unit=steps)
    assert meta["epochs"] == 3 and counts and all(0 <= c < 2 * steps for c in counts)
    assert (run / "classifier.pt").is_file()
    report("Step 1 (classifier)", back_after, counts, f"steps (of {steps} per epoch; checkpoints every epoch)")


def test_pretraining_survives_a_preemption_and_a_node_loss(node_cluster, pseudo_run, tmp_path):
    from dap_ray.steps.pretrain import PretrainConfig, pretrain

    top_up(node_cluster)
    boxes_dir, _, weights = pseudo_run
    run = tmp_path / "run"
    # The notice 8 s before the kill (clouds give 30 s to 2 min): Ray Train hears it within a second, the
    # worker checkpoints at its next iteration, and the controller takes the checkpoint at its next poll (every 2 s).
    losses = LossSequence(node_cluster, "RayTrainWorker", checkpointed(run / "ray"), notice_s=8.0)
    losses.start()
    total = PRETRAIN_ITERS
    meta = pretrain(PretrainConfig(
        boxes=str(boxes_dir), output=str(run), backbone=SLOWER, backbone_weights=str(weights), num_workers=1,
        cpus_per_worker=2, loader_workers=0, batch_size=2, max_iters=total, checkpoint_every=4, warmup_iters=2,
        lr=0.01, min_sizes=(32,), max_size=64, roi_batch_size_per_image=16, log_every_s=0.0, max_failures=1))
    back_after = losses.check()
    counts = redone(node_cluster, rf"iter (\d+)/{total} loss", rf"resuming at iteration (\d+)/{total}")
    assert meta["iterations"] == total and [h["iteration"] for h in meta["history"]][-1] == total
    assert_redone(counts, every=4)
    notice = resumed_at_the_notice(node_cluster, total)
    report("Step 3 (pre-training)", back_after, counts, "iterations (checkpoints every 4)", notice)


def test_finetuning_survives_a_preemption_and_a_node_loss(node_cluster, tmp_path):

    from dap_ray.data.downstream_sample import DownstreamSampleConfig, make_downstream_sample
    from dap_ray.steps.finetune import FinetuneConfig, finetune

    top_up(node_cluster)
    data = make_downstream_sample(tmp_path / "downstream",
                                  DownstreamSampleConfig(num_train=16, num_test=4, num_classes=3, image_size=64))
    run = tmp_path / "run"
    losses = LossSequence(node_cluster, "RayTrainWorker", checkpointed(run / "ray"), notice_s=8.0)
    losses.start()
    total = FINETUNE_ITERS
    meta = finetune(FinetuneConfig(
        train=str(data / "coco" / "train.json"), test=str(data / "coco" / "test.json"), train_images=str(data / "images"),
        test_images=str(data / "images"), format="coco", output=str(run), init="scratch", backbone=SLOWER,
        batch_size=2, num_workers=1, cpus_per_worker=2, loader_workers=0, max_iters=total, checkpoint_every=4,
        eval_every=total // 2, min_sizes=(48,), max_size=96, roi_batch_size_per_image=16, lr=0.01, log_every_s=0.0,
        max_failures=1))
    back_after = losses.check()
    counts = redone(node_cluster, rf"iter (\d+)/{total} loss", rf"resuming at iteration (\d+)/{total}")
    assert meta["iterations"] == total
    assert_redone(counts, every=4)
    evaluations = [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert evaluations == [total // 2, total]  # each evaluation once, whatever was redone
    notice = resumed_at_the_notice(node_cluster, total)
    report("Step 4 (fine-tuning)", back_after, counts, "iterations (checkpoints every 4)", notice)
