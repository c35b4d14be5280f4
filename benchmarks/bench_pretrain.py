"""Ray Train overhead for detector pre-training: one Ray Train worker against a plain in-process
torchvision training loop on the same pseudo boxes, batch, model, data order and threads, in
the same run.

    python benchmarks/bench_pretrain.py [--boxes MINE_DIR/boxes --backbone-weights classifier.pt]
        [--backbone resnet18] [--batch-size 4] [--iters 30] [--warmup 5] [--min-sizes 32 64 96 192] [--use-gpu]
        [--loader-workers 0]

Without --boxes it uses the built-in sample's pseudo boxes and classifier (made on first use,
as jobs/pretrain.py's default). Prints training images/s of the plain loop and of the Ray Train
worker (both after --warmup iterations; Ray's checkpoints every --warmup iterations are not
timed), their ratio (target, issue 5: >= 0.9), and the Ray run's whole wall time.
On a GPU (--use-gpu) the same figures are the per-GPU speed with bf16 autocast.
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

from dap_ray.data.pseudo_boxes import PseudoBoxes  # noqa: E402
from dap_ray.models.training import train_step  # noqa: E402
from dap_ray.steps.embedded import pretrain_defaults  # noqa: E402
from dap_ray.steps.pretrain import PretrainConfig, prepare_data, pretrain  # noqa: E402
from dap_ray.steps.pretrain.torchvision_backend import detector_for, make_optimizer, training_loader  # noqa: E402


def plain_loop(cfg: PretrainConfig, pseudo: PseudoBoxes, num_classes: int, warmup: int,
               iters: int) -> tuple[float, list[float]]:
    """Images/s of iterations warmup..warmup+iters of an in-process loop, overall and per --warmup iterations."""
    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    if not cfg.use_gpu:
        torch.set_num_threads(cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed)
    model = detector_for(cfg, num_classes).to(device)
    optimizer, scheduler = make_optimizer(cfg, model)
    batches = iter(training_loader(cfg, pseudo))
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
    parser.add_argument("--boxes")
    parser.add_argument("--backbone-weights")
    parser.add_argument("--backbone", default="resnet18", help="with --boxes (the sample uses its classifier's)")
    parser.add_argument("--detector", default="faster_rcnn_fpn")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--iters", type=int, default=30, help="timed iterations (a multiple of --warmup)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--min-sizes", type=int, nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--roi-batch-size-per-image", type=int, default=128)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--loader-workers", type=int, default=0,
                        help="DataLoader processes (0: decode in the training process; a GPU wants several)")
    args = parser.parse_args()
    if args.iters % args.warmup:
        parser.error("--iters must be a multiple of --warmup")

    cfg = PretrainConfig(boxes=args.boxes, backbone_weights=args.backbone_weights,
                         **({"backbone": args.backbone} if args.boxes else {}), detector=args.detector,
                         batch_size=args.batch_size, num_workers=1, loader_workers=args.loader_workers,
                         cpus_per_worker=args.threads, use_gpu=args.use_gpu, lr=0.005, warmup_iters=20,
                         roi_batch_size_per_image=args.roi_batch_size_per_image, max_iters=args.warmup + args.iters,
                         checkpoint_every=args.warmup, log_every_s=1e9)
    if cfg.boxes is None:
        cfg = pretrain_defaults(cfg)
        cfg = dataclasses.replace(cfg, num_workers=1, batch_size=args.batch_size, loader_workers=args.loader_workers,
                                  max_iters=args.warmup + args.iters, checkpoint_every=args.warmup,
                                  roi_batch_size_per_image=args.roi_batch_size_per_image, lr=0.005,
                                  warmup_iters=20)
    if args.min_sizes:
        cfg = dataclasses.replace(cfg, min_sizes=tuple(args.min_sizes))
    cfg, pseudo, classes = prepare_data(cfg)
    print(f"{cfg.detector} {cfg.backbone}, batch {cfg.batch_size}, sizes {cfg.min_sizes}, {args.threads} threads, "
          f"{args.warmup} warm-up + {args.iters} timed iterations", flush=True)

    plain, plain_windows = plain_loop(cfg, pseudo, len(classes), args.warmup, args.iters)
    print(f"plain loop: {plain:.2f} images/s", flush=True)

    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        meta = pretrain(dataclasses.replace(cfg, output=directory))
        wall = time.perf_counter() - started
    timed = meta["history"][1:]  # the first window holds the warm-up (and worker start-up)
    per_window = cfg.checkpoint_every * cfg.batch_size
    ray_rate = len(timed) * per_window / sum(per_window / h["images_per_s"] for h in timed)
    print(f"plain loop:          {plain:.2f} images/s")
    print("plain loop windows:  " + " ".join(f"{r:.2f}" for r in plain_windows) + " images/s")
    print("Ray Train windows:   " + " ".join(f"{h['images_per_s']:.2f}" for h in timed) + " images/s")
    print(f"Ray Train, 1 worker: {ray_rate:.2f} images/s ({ray_rate / plain:.2f}x the plain loop; target >= 0.9x)")
    print(f"Ray Train whole run: {wall:.1f} s for {cfg.max_iters} iterations, start-up and checkpoints included "
          f"({cfg.max_iters * cfg.batch_size / wall:.2f} images/s)")


if __name__ == "__main__":
    main()
