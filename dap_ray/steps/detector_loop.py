"""The iteration loop that Step 3 (pre-training) and Step 4 (fine-tuning) run inside Ray Train workers.

Training counts iterations, as the paper's does. Every ``checkpoint_every`` iterations, at
the end, and on a preemption notice, a checkpoint is reported to Ray Train: model,
optimiser, schedule, iteration, every rank's torch RNG state, loss history and whatever the
step adds (Step 4: its evaluations). :func:`restore` starts a worker from the last one, so a
resumed run continues the same stream as an uninterrupted one (the samplers draw from the
seed and batch number).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Callable, Iterator

import numpy as np
import torch

from dap_ray.models.classifiers import unwrap_ddp
from dap_ray.models.detectors import detector_state_dict
from dap_ray.models.training import train_step
from dap_ray.progress import Progress

__all__ = ["STATE_FILE", "restore", "train_iterations"]

STATE_FILE = "state.pt"
# How often a worker asks Ray Train whether a node is to be preempted, per checkpoint interval. Each
# ask is a barrier of all ranks through Ray Train's synchronisation actor, which lives on the
# controller's node: 1.2 ms with one worker, 2.7 ms with two on an idle 2-core machine
# (benchmarks/bench_preemption_ask.py), a cross-node round trip after the slowest rank on a
# cluster. The default intervals (2,000 and 1,000 iterations) ask every 20 and 10 iterations, a
# few seconds on a GPU, well inside a cloud's 30 s to 2 min notice; intervals under 200
# iterations ask at every one.
NOTICE_ASKS_PER_CHECKPOINT = 100


def restore(model, optimizer, scheduler, *, rank: int, seed: int, max_iters: int) -> tuple[int, dict]:
    """Load the last checkpoint into ``model`` (DDP or not), ``optimizer`` and ``scheduler``; return
    (iteration to start at, the whole saved state). Without one: (0, {}), the ranks seeded apart
    (proposal sampling and flips then differ between ranks)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        torch.manual_seed(seed + 1 + rank)
        return 0, {}
    with checkpoint.as_directory() as directory:
        state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    unwrap_ddp(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if rank < len(state["rng"]):
        torch.set_rng_state(state["rng"][rank])  # again in train_iterations, after the loader is made
    if rank == 0:
        print(f"resuming at iteration {state['iteration']}/{max_iters} from the last checkpoint", flush=True)
    return state["iteration"], state


def train_iterations(model, optimizer, scheduler, batches: Iterator[list[dict]], device, *, rank: int, world: int,
                     start: int, max_iters: int, checkpoint_every: int, log_every_s: float, history: list,
                     eval_every: int | None = None, evaluate: Callable[[int], dict] | None = None,
                     extra_state: Callable[[], dict] | None = None, report: Callable | None = None,
                     rng_state: list | None = None, checkpoint_on_notice: bool = True) -> None:
    """Train from iteration ``start`` to ``max_iters`` on ``batches`` (this rank's endless stream).

    A progress line every ``log_every_s`` seconds (rank 0), ending with the share done and the
    time left at this run's rate. At every checkpoint or evaluation
    point the window's mean losses, learning rate and images/s go into ``history`` and to Ray
    Train (``ray.train.report``); ``evaluate(iteration)`` (every ``eval_every`` and at the
    end; all ranks call it) returns metrics to add. The losses stay on the device between
    those points (a GPU never waits for the host to read a float), and are read there: a
    non-finite loss then stops the run with its iteration and rank in the message, before
    any checkpoint holds the weights it produced. When Ray Train hears that a node of this run
    is to be reclaimed (a spot instance's notice: the node drained with the PREEMPTION reason),
    a checkpoint is written once, at the next of the iterations where the workers ask (every
    ``checkpoint_every / NOTICE_ASKS_PER_CHECKPOINT``), and training goes on: the restarted
    run resumes there instead of at the last regular checkpoint. That checkpoint adds no row to
    ``history`` and leaves the loss window open; ``checkpoint_on_notice=False`` turns it off
    (a Tune trial running Ray Train, whose every report must carry the trial's metric).
    ``report(metrics)``, when given, takes the metrics instead of Ray Train, and no checkpoint
    is written (a Tune trial that trains in its own process). ``rng_state``: the checkpoint's
    per-rank torch RNG states, set here, after the caller made its data iterator (which draws
    from the RNG), so that a resumed run's draws (proposal sampling) continue exactly where the
    uninterrupted run's were.
    """
    import ray.train
    import torch.distributed as dist

    detector = unwrap_ddp(model)
    if rng_state and rank < len(rng_state):
        torch.set_rng_state(rng_state[rank])
    model.train()
    names: list[str] = []
    rows: list[torch.Tensor] = []  # this window's loss parts, one row per iteration, on the device
    window_images = 0
    window_start = time.perf_counter()
    progress = Progress(max_iters, "iterations", done=start, every_s=log_every_s)
    notice_saved = False
    notice_every = max(1, checkpoint_every // NOTICE_ASKS_PER_CHECKPOINT)
    for iteration in range(start, max_iters):
        batch = next(batches)
        losses = train_step(model, batch, optimizer, scheduler, device)
        names = names or list(losses)
        rows.append(torch.stack([losses[k].float() for k in names]))
        window_images += len(batch)
        done = iteration + 1
        now = time.perf_counter()
        regular = done % checkpoint_every == 0 or done == max_iters
        # Every rank asks at the same iterations: the call agrees rank 0's answer across ranks.
        ask = checkpoint_on_notice and report is None and not notice_saved and done % notice_every == 0
        notice = ray.train.get_preemption_info() if ask else None
        notice_saved = notice_saved or notice is not None
        is_checkpoint = regular or notice is not None
        is_eval = evaluate is not None and (done % (eval_every or checkpoint_every) == 0 or done == max_iters)
        notice_only = notice is not None and not (regular or is_eval)
        printing = rank == 0 and progress.due()
        if not (printing or is_checkpoint or is_eval):
            continue
        # The one place the losses come to the host: where they are logged or a checkpoint is written.
        table = torch.stack(rows).cpu().double().numpy()
        totals = table.sum(1)
        bad = np.flatnonzero(~np.isfinite(totals))
        if len(bad):
            at = int(bad[0])
            parts = {k: float(v) for k, v in zip(names, table[at])}
            raise FloatingPointError(f"loss became {float(totals[at])} at iteration {done - len(rows) + at + 1} "
                                     f"(rank {rank}): {parts}")
        means = {k: float(v) for k, v in zip(names, table.mean(0))} | {"loss": float(totals.mean())}
        if printing or ((is_checkpoint or is_eval) and rank == 0):
            parts = " ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "loss")
            print(f"iter {done}/{max_iters} loss {means['loss']:.4f} ({parts}) "
                  f"lr {scheduler.get_last_lr()[0]:.5f} {window_images * world / (now - window_start):.1f} images/s, "
                  f"{progress.left(done)}", flush=True)
        if not (is_checkpoint or is_eval):
            continue  # the window goes on to the next checkpoint; only its rows so far were read
        metrics = dict(means)
        metrics.update(iteration=done, lr=scheduler.get_last_lr()[0],
                       images_per_s=window_images * world / (now - window_start))
        if not notice_only:
            history.append(metrics)
        if is_eval:
            metrics.update(evaluate(done))
            model.train()
        if report is not None:
            report(metrics)
            rows, window_images = [], 0
            window_start = time.perf_counter()
            continue
        rng_states = [torch.get_rng_state()]
        if world > 1:
            rng_states = [None] * world
            dist.all_gather_object(rng_states, torch.get_rng_state())
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if rank == 0 and is_checkpoint:
                torch.save({"model": detector_state_dict(detector), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "iteration": done, "rng": rng_states,
                            "history": history, **(extra_state() if extra_state else {})},
                           os.path.join(directory, STATE_FILE))
                saved = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=saved)
        if notice is not None and rank == 0:
            left = "" if notice.deadline_ms is None else f", {notice.deadline_ms / 1000 - time.time():.0f} s before it"
            print(f"preemption notice for node(s) {', '.join(n[:12] for n in notice.preempted_node_ids)}{left}: "
                  f"checkpoint at iteration {done}/{max_iters} handed to Ray Train", flush=True)
        if notice_only:
            continue  # the loss window goes on to the next regular checkpoint
        rows, window_images = [], 0
        window_start = time.perf_counter()
