"""The iteration loop of Steps 3 and 4 (dap_ray.steps.detector_loop), its Ray Train calls replaced:
when and what it checkpoints."""

import itertools
import os

import pytest
import torch

import dap_ray.steps.detector_loop as detector_loop
from dap_ray.steps.detector_loop import NOTICE_ASKS_PER_CHECKPOINT, STATE_FILE, train_iterations


class FakeTrain:
    """Stands in for ray.train: a preemption notice from iteration ``notice_from`` on (None: never),
    and the iteration of every checkpoint reported."""

    def __init__(self, notice_from):
        from ray.train import PreemptionInfo

        self.notice_from, self.iteration, self.asked = notice_from, 0, []
        self.info = PreemptionInfo(deadline_ms=None, preempted_node_to_ranks={"a" * 56: [0]})
        self.checkpoints: list[int] = []
        self.saved_history: list[list[int]] = []  # per checkpoint, the iterations of its history rows

    def get_preemption_info(self):
        self.asked.append(self.iteration)
        return self.info if self.notice_from is not None and self.iteration >= self.notice_from else None

    def report(self, metrics, checkpoint=None):
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                state = torch.load(os.path.join(directory, STATE_FILE), weights_only=True)
            assert state["iteration"] == metrics["iteration"]
            self.checkpoints.append(state["iteration"])
            self.saved_history.append([row["iteration"] for row in state["history"]])


def run_loop(monkeypatch, fake: FakeTrain | None, max_iters: int, checkpoint_every: int, **options) -> list[dict]:
    """``max_iters`` iterations of a linear model, each counted by ``fake`` (ray.train's stand-in; None: a
    loop that must never ask Ray Train for a notice); ``options`` go to ``train_iterations``. Returns the history."""
    import ray.train

    def refuse():
        raise AssertionError("get_preemption_info is for Ray Train workers only")

    def step(model, batch, optimizer, scheduler, device):
        if fake is not None:
            fake.iteration += 1
        return {"loss_a": torch.tensor(1.0)}

    monkeypatch.setattr(ray.train, "get_preemption_info", fake.get_preemption_info if fake else refuse)
    if fake is not None:
        monkeypatch.setattr(ray.train, "report", fake.report)
    monkeypatch.setattr(detector_loop, "train_step", step)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    history: list[dict] = []
    train_iterations(model, optimizer, scheduler, itertools.repeat([{}]), torch.device("cpu"), rank=0, world=1,
                     start=0, max_iters=max_iters, checkpoint_every=checkpoint_every, log_every_s=1e9, history=history,
                     **options)
    return history


@pytest.mark.parametrize("notice_from, checkpoints", [
    (None, [4, 8, 10]),   # no notice: every 4 iterations and at the end
    (3, [3, 4, 8, 10]),   # a notice heard after iteration 3: one checkpoint at once, then as before
    (4, [4, 8, 10]),      # heard where a checkpoint was due anyway: that one
    (10, [4, 8, 10]),     # heard after the last iteration: the final checkpoint is that one
])
def test_a_preemption_notice_checkpoints_once_at_the_iteration_it_is_heard(monkeypatch, capsys, notice_from,
                                                                           checkpoints):
    fake = FakeTrain(notice_from)
    history = run_loop(monkeypatch, fake, max_iters=10, checkpoint_every=4)
    assert fake.checkpoints == checkpoints
    # The notice's checkpoint adds no history row: the rows stay those of the regular checkpoints.
    assert [row["iteration"] for row in history] == [4, 8, 10]
    assert fake.saved_history == [[i for i in (4, 8, 10) if i <= at] for at in checkpoints]
    # Asked after every iteration until the notice came, never after it.
    assert fake.asked == list(range(1, (notice_from or 10) + 1))
    said = [line for line in capsys.readouterr().out.splitlines() if "preemption notice" in line]
    assert said == ([] if notice_from is None else
                    [f"preemption notice for node(s) {'a' * 12}: checkpoint at iteration {notice_from}/10 handed "
                     "to Ray Train"])


def test_workers_ask_for_a_notice_a_hundred_times_per_checkpoint_interval(monkeypatch):
    fake = FakeTrain(notice_from=7)
    run_loop(monkeypatch, fake, max_iters=10, checkpoint_every=3 * NOTICE_ASKS_PER_CHECKPOINT)  # asks every 3
    assert fake.asked == [3, 6, 9]  # the notice came after 7, heard at 9
    assert fake.checkpoints == [9, 10]


def test_a_notice_at_an_evaluation_keeps_that_evaluations_row(monkeypatch):
    fake = FakeTrain(notice_from=3)
    history = run_loop(monkeypatch, fake, max_iters=6, checkpoint_every=4, eval_every=3,
                       evaluate=lambda done: {"AP50": float(done)})
    assert fake.checkpoints == [3, 4, 6]
    assert [(row["iteration"], row.get("AP50")) for row in history] == [(3, 3.0), (4, None), (6, 6.0)]


def test_a_tune_trial_never_asks_for_a_notice(monkeypatch):
    reported = []  # a trial that trains in its own process reports itself
    run_loop(monkeypatch, None, max_iters=4, checkpoint_every=2, report=reported.append)
    assert [r["iteration"] for r in reported] == [2, 4]
    # A trial running Ray Train: every report must carry the trial's metric, so no notice checkpoint.
    fake = FakeTrain(notice_from=None)
    fake.get_preemption_info = lambda: pytest.fail("asked for a notice")
    run_loop(monkeypatch, fake, max_iters=4, checkpoint_every=2, checkpoint_on_notice=False)
    assert fake.checkpoints == [2, 4]
