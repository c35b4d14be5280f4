"""Ray Train overhead for fine-tuning (Step 4): one Ray Train worker against a plain in-process
loop on the same downstream images, batch, model, initialisation, data order and threads, in
the same run.

    python benchmarks/bench_finetune.py [--init dap:RUN_DIR|cls:FILE|scratch] [--batch-size 4]
        [--iters 30] [--warmup 5] [--threads 2] [--use-gpu]

Uses the built-in downstream sample and, by default, the sample's DAP pre-training (both made
on first use, as jobs/finetune.py's default). Prints training images/s of the plain loop and
of the Ray Train worker (both after --warmup iterations; Ray's checkpoints every --warmup
iterations and the final evaluation are not timed), their ratio (target, issue 14: >= 0.9)
and the Ray run's whole wall time.
"""

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dap_ray.models.detectors import initialise  # noqa: E402
from dap_ray.models.training import train_step  # noqa: E402
from dap_ray.steps.embedded import finetune_defaults  # noqa: E402
from dap_ray.steps.finetune import (  # noqa: E402
    FinetuneConfig,
    build_model,
    finetune,
    load_split,
    make_optimizer,
    resolve_architecture,
    resolve_schedule,
    training_loader,
)


def plain_loop(cfg: FinetuneConfig, train, warmup: int, iters: int) -> tuple[float, list[float]]:
    """Images/s of iterations warmup..warmup+iters of an in-process loop, overall and per --warmup iterations."""
    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    if not cfg.use_gpu:
        torch.set_num_threads(cfg.cpus_per_worker)
    torch.manual_seed(0)
    model = build_model(cfg, len(train.classes))
    initialise(model, cfg.init, detector=cfg.detector, backbone=cfg.backbone)
    model = model.to(device).train()
    optimizer, scheduler = make_optimizer(cfg, model)
    batches = iter(training_loader(cfg, train, seed=0))
    marks = []
    for step in range(warmup + iters + 1):
        if step >= warmup and (step - warmup) % warmup == 0:
            if cfg.use_gpu:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
        if step == warmup + iters:
            break
        train_step(model, next(batches), optimizer, scheduler, device)
    windows = [warmup * cfg.batch_size / (b - a) for a, b in zip(marks, marks[1:])]
    return iters * cfg.batch_size / (marks[-1] - marks[0]), windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", help="default: the sample's DAP pre-training")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--iters", type=int, default=30, help="timed iterations (a multiple of --warmup)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--use-gpu", action="store_true")
    args = parser.parse_args()
    if args.iters % args.warmup:
        parser.error("--iters must be a multiple of --warmup")

    cfg = finetune_defaults(FinetuneConfig(init=args.init))
    cfg = dataclasses.replace(cfg, batch_size=args.batch_size, num_workers=1, cpus_per_worker=args.threads,
                              use_gpu=args.use_gpu, max_iters=args.warmup + args.iters, checkpoint_every=args.warmup,
                              eval_every=10 ** 9, log_every_s=1e9, lr=0.0025, warmup_iters=20)

    cfg = resolve_architecture(cfg)
    train = load_split(cfg, "train")
    train = train.subset(train.training_indices())
    cfg = resolve_schedule(cfg, len(train))
    print(f"{cfg.detector} {cfg.backbone} from {cfg.init}, batch {cfg.batch_size}, sizes {cfg.min_sizes}, "
          f"{args.threads} threads, {args.warmup} warm-up + {args.iters} timed iterations", flush=True)

    plain, plain_windows = plain_loop(cfg, train, args.warmup, args.iters)
    print(f"plain loop: {plain:.2f} images/s", flush=True)

    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        meta = finetune(dataclasses.replace(cfg, output=directory))
        wall = time.perf_counter() - started
    timed = meta["history"][1:]  # the first window holds the warm-up (and worker start-up)
    per_window = cfg.checkpoint_every * cfg.batch_size
    ray_rate = len(timed) * per_window / sum(per_window / h["images_per_s"] for h in timed)
    print(f"plain loop:          {plain:.2f} images/s")
    print("plain loop windows:  " + " ".join(f"{r:.2f}" for r in plain_windows) + " images/s")
    print("Ray Train windows:   " + " ".join(f"{h['images_per_s']:.2f}" for h in timed) + " images/s")
    print(f"Ray Train, 1 worker: {ray_rate:.2f} images/s ({ray_rate / plain:.2f}x the plain loop; target >= 0.9x)")
    print(f"Ray Train whole run: {wall:.1f} s for {cfg.max_iters} iterations, start-up, checkpoints and the final "
          f"evaluation included")


if __name__ == "__main__":
    main()
