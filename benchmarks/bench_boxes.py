"""CAM-to-box speed on one CPU core: vectorised batch vs. one map at a time vs. the
straightforward per-component reference, on CAM-like 18x24 maps (a 4:3 image at 576).

    python benchmarks/bench_boxes.py [--maps 4000] [--preset official|paper]

Prints maps/s and ms/map for each and the speed-ups. Target (issue 2): the batched path at
<= 0.09 ms per map per core, 10x the authors' released script (~0.9 ms on these machines).
"""

import os

# One core: pin before numpy/OpenCV start their thread pools.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

import argparse  # noqa: E402
import time  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from dap_ray.localisation.boxes import BoxConfig, cam_to_boxes, cam_to_boxes_batch  # noqa: E402
from dap_ray.localisation.boxes_reference import cam_to_boxes_reference  # noqa: E402


def cam_like_maps(count: int, shape=(18, 24), seed: int = 0) -> list[np.ndarray]:
    """Min-max normalised sums of 1-3 Gaussian blobs plus smooth noise, like real CAMs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    maps = []
    for _ in range(count):
        cam = np.zeros(shape, np.float32)
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
            sy, sx = rng.uniform(1, shape[0] / 3), rng.uniform(1, shape[1] / 3)
            cam += rng.uniform(0.3, 1) * np.exp(-((x - cx) ** 2) / (2 * sx**2) - ((y - cy) ** 2) / (2 * sy**2))
        noise = cv2.resize(rng.random((shape[0] // 3, shape[1] // 3)).astype(np.float32), shape[::-1])
        cam += 0.15 * noise
        maps.append((cam - cam.min()) / (cam.max() - cam.min()))
    return maps


def rate(fn, count: int) -> float:
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", type=int, default=4000, help="maps per measurement (default 4000)")
    parser.add_argument("--preset", default="official", choices=["official", "paper"])
    args = parser.parse_args()
    cv2.setNumThreads(1)
    config = BoxConfig.from_preset(args.preset)
    maps = cam_like_maps(args.maps)
    sizes = [(500, 375)] * len(maps)
    few = max(1, len(maps) // 4)

    cam_to_boxes_batch(maps[:64], sizes[:64], config)  # warm-up
    results = {
        "vectorised, batched": rate(lambda: cam_to_boxes_batch(maps, sizes, config), len(maps)),
        "vectorised, one map a call": rate(
            lambda: [cam_to_boxes(m, s, preset=args.preset) for m, s in zip(maps[:few], sizes)], few
        ),
        "per-component reference": rate(
            lambda: [cam_to_boxes_reference(m, s, config) for m, s in zip(maps[:few], sizes)], few
        ),
    }
    boxes = sum(len(b) for b, _ in cam_to_boxes_batch(maps, sizes, config)) / len(maps)
    print(f"preset={args.preset} maps={len(maps)} shape=18x24 cores=1 boxes/map={boxes:.2f}")
    for name, per_s in results.items():
        print(f"{name:>28}: {per_s:10.0f} maps/s  {1e3 / per_s:7.4f} ms/map")
    base = results["per-component reference"]
    print(f"speed-up over the reference: batched {results['vectorised, batched'] / base:.1f}x, "
          f"one map a call {results['vectorised, one map a call'] / base:.1f}x")


if __name__ == "__main__":
    main()
