"""The two Step 3 backends side by side: torchvision and detectron2 pre-training on the same
pseudo boxes, image reader, sizes, flips and schedule, for the same iterations, in the same run.

    python benchmarks/bench_backends.py [--iters 60] [--lr LR] [--output /tmp/bench_backends]

Uses the built-in sample's pseudo boxes and classifier (made on first use) with jobs/pretrain.py's
embedded settings, one worker each. Prints each backend's loss at its first and last logged
iteration and its wall time. They need not be equal (the libraries differ in details: anchor
rounding, data loading order, the proposals sampled), but a gross gap means something differs.
Needs detectron2 (see the README).
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dap_ray.steps.embedded import pretrain_defaults  # noqa: E402
from dap_ray.steps.pretrain import PretrainConfig, pretrain  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate for both (default: jobs/pretrain.py's embedded one, 0.01)")
    parser.add_argument("--output", default="bench_backends")
    args = parser.parse_args()
    rows = []
    for backend in ("torchvision", "detectron2"):
        cfg = pretrain_defaults(PretrainConfig(output=str(Path(args.output) / backend)))
        cfg = dataclasses.replace(cfg, backend=backend, max_iters=args.iters, checkpoint_every=20, num_workers=1,
                                  cpus_per_worker=2, warmup_iters=10, lr=args.lr if args.lr is not None else cfg.lr)
        started = time.perf_counter()
        meta = pretrain(cfg)
        wall = time.perf_counter() - started
        history = meta.get("history") or []
        rows.append((backend, history[0]["iteration"] if history else None, meta.get("first_loss"),
                     history[-1]["iteration"] if history else None, meta.get("last_loss"), wall))
    print(f"{'backend':<12} {'first logged':>14} {'loss':>8} {'last logged':>12} {'loss':>8} {'wall s':>8}")
    for backend, first_it, first, last_it, last, wall in rows:
        print(f"{backend:<12} {first_it!s:>14} {first or float('nan'):8.4f} {last_it!s:>12} "
              f"{last or float('nan'):8.4f} {wall:8.1f}")


if __name__ == "__main__":
    main()
