"""CAM-to-box speed on one CPU core: batched calls vs. one map a call vs. the
straightforward per-component reference (the authors' released script's method), on
CAM-like maps of two kinds: uniform 18x24 maps (a 4:3 image at 576) and mixed shapes (image
sides drawn from 48 to 1,400 px, as in web-crawled data with panoramas and thin strips; the
map is the image at short side 576 on the stride-32 grid, 18 x 18 to 18 x 525).

    python benchmarks/bench_boxes.py [--maps 4000] [--batch 64] [--preset official|paper] [--repeats 5]

Prints maps/s and ms/map for each (the fastest of ``--repeats`` runs) and the speed-ups. Targets: the batched path at <= 0.09 ms
per map per core on uniform maps (issue 2), and at least 10x the reference per map for both
uniform and mixed shapes (issue 12), batched as the pipeline batches (``--batch``).
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


def mixed_shape_maps(count: int, seed: int = 0) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """CAM-like maps of images with sides drawn from 48 to 1,400 px, and the images' (W, H)."""
    rng = np.random.default_rng(seed)
    sizes = [tuple(int(v) for v in rng.integers(48, 1401, 2)) for _ in range(count)]
    shapes = [tuple(-(-576 * side // min(w, h) // 32) for side in (h, w)) for w, h in sizes]
    by_shape: dict[tuple[int, int], list[np.ndarray]] = {}
    for shape in set(shapes):
        by_shape[shape] = cam_like_maps(shapes.count(shape), shape, seed)
    return [by_shape[shape].pop() for shape in shapes], sizes


def rates(runs: dict[str, tuple], repeats: int) -> dict[str, float]:
    """Maps per second of each ``name: (fn, maps)``: the fastest of ``repeats`` rounds, the runs
    taking turns in each round, so that a shared machine's slow spells only slow runs and
    fall on all of them alike."""
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, (fn, _count) in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: count / best[name] for name, (_fn, count) in runs.items()}


def measure(name: str, maps: list[np.ndarray], sizes: list, batch: int, preset: str, repeats: int) -> dict[str, float]:
    config = BoxConfig.from_preset(preset)
    few = max(1, len(maps) // 4)
    # Warm-ups: the first calls compile the boxes (or load them from numba's cache) and import
    # scipy for the reference, which must not count as work.
    cam_to_boxes_batch(maps[:batch], sizes[:batch], config)
    cam_to_boxes(maps[0], sizes[0], preset=preset)
    cam_to_boxes_reference(maps[0], sizes[0], config)
    batches = [(maps[i : i + batch], sizes[i : i + batch]) for i in range(0, len(maps), batch)]
    results = rates({
        f"batches of {batch}": (lambda: [cam_to_boxes_batch(m, s, config) for m, s in batches], len(maps)),
        "one map a call": (
            lambda: [cam_to_boxes(m, s, preset=preset) for m, s in zip(maps[:few], sizes)], few
        ),
        "per-component reference": (
            lambda: [cam_to_boxes_reference(m, s, config) for m, s in zip(maps[:few], sizes)], few
        ),
    }, repeats)
    boxes = sum(len(b) for b, _ in cam_to_boxes_batch(maps, sizes, config)) / len(maps)
    cells = sum(m.size for m in maps) / len(maps)
    print(f"{name}: preset={preset} maps={len(maps)} cells/map={cells:.0f} cores=1 boxes/map={boxes:.2f}")
    for label, per_s in results.items():
        print(f"{label:>28}: {per_s:10.0f} maps/s  {1e3 / per_s:7.4f} ms/map")
    base = results["per-component reference"]
    batched = results[f"batches of {batch}"]
    print(f"speed-up over the reference: batched {batched / base:.1f}x, "
          f"one map a call {results['one map a call'] / base:.1f}x\n")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", type=int, default=4000, help="maps per measurement (default 4000)")
    parser.add_argument("--batch", type=int, default=64, help="maps per batched call (default 64)")
    parser.add_argument("--preset", default="official", choices=["official", "paper"])
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each figure is its fastest round (default 5)")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    maps = cam_like_maps(args.maps)
    measure("uniform 18x24", maps, [(500, 375)] * len(maps), args.batch, args.preset, args.repeats)
    mixed, sizes = mixed_shape_maps(args.maps)
    measure("mixed shapes", mixed, sizes, args.batch, args.preset, args.repeats)


if __name__ == "__main__":
    main()
