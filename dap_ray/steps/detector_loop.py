"""The iteration loop that Step 3 (pre-training) and Step 4 (fine-tuning) run inside Ray Train workers.

Training counts iterations, as the paper's does. Every ``checkpoint_every`` iterations (and
at the end) a checkpoint is reported to Ray Train: model, optimiser, schedule, iteration,
every rank's torch RNG state, loss history and whatever the step adds (Step 4: its
evaluations). :func:`restore` starts a worker from the last one, so a resumed run continues
the same stream as an uninterrupted one (the samplers draw from the seed and batch number).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Callable, Iterator

import torch

from dap_ray.models.classifiers import unwrap_ddp
from dap_ray.models.detectors import detector_state_dict
from dap_ray.models.training import train_step

__all__ = ["STATE_FILE", "restore", "train_iterations"]

STATE_FILE = "state.pt"


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
                     rng_state: list | None = None) -> None:
    """Train from iteration ``start`` to ``max_iters`` on ``batches`` (this rank's endless stream).

    A progress line every ``log_every_s`` seconds (rank 0). At every checkpoint or evaluation
    point the window's mean losses, learning rate and images/s go into ``history`` and to Ray
    Train (``ray.train.report``); ``evaluate(iteration)`` (every ``eval_every`` and at the
    end; all ranks call it) returns metrics to add. A non-finite loss stops the run with the
    iteration and rank in the message. ``report(metrics)``, when given, takes the metrics
    instead of Ray Train, and no checkpoint is written (a Tune trial that trains in its own
    process). ``rng_state``: the checkpoint's per-rank torch RNG states, set here, after the
    caller made its data iterator (which draws from the RNG), so that a resumed run's draws
    (proposal sampling) continue exactly where the uninterrupted run's were.
    """
    import ray.train
    import torch.distributed as dist

    detector = unwrap_ddp(model)
    if rng_state and rank < len(rng_state):
        torch.set_rng_state(rng_state[rank])
    model.train()
    window: dict[str, float] = {}
    window_images = window_iters = 0
    window_start = last_print = time.perf_counter()
    for iteration in range(start, max_iters):
        batch = next(batches)
        losses = train_step(model, batch, optimizer, scheduler, device)
        loss = sum(losses.values())
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at iteration {iteration} (rank {rank}): {losses}")
        for key, value in losses.items():
            window[key] = window.get(key, 0.0) + value
        window["loss"] = window.get("loss", 0.0) + loss
        window_images += len(batch)
        window_iters += 1
        done = iteration + 1
        now = time.perf_counter()
        is_checkpoint = done % checkpoint_every == 0 or done == max_iters
        is_eval = evaluate is not None and (done % (eval_every or checkpoint_every) == 0 or done == max_iters)
        if rank == 0 and (now - last_print >= log_every_s or is_checkpoint or is_eval):
            parts = " ".join(f"{k} {v / window_iters:.4f}" for k, v in window.items() if k != "loss")
            print(f"iter {done}/{max_iters} loss {window['loss'] / window_iters:.4f} ({parts}) "
                  f"lr {scheduler.get_last_lr()[0]:.5f} {window_images * world / (now - window_start):.1f} images/s",
                  flush=True)
            last_print = now
        if not (is_checkpoint or is_eval):
            continue
        metrics = {k: v / window_iters for k, v in window.items()}
        metrics.update(iteration=done, lr=scheduler.get_last_lr()[0],
                       images_per_s=window_images * world / (now - window_start))
        history.append(metrics)
        if is_eval:
            metrics.update(evaluate(done))
            model.train()
        if report is not None:
            report(metrics)
            window, window_images, window_iters = {}, 0, 0
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
        window, window_images, window_iters = {}, 0, 0
        window_start = time.perf_counter()
