"""End-to-end mining speed and memory on CPU: jobs/mine.py against an in-process loop doing
the same decode, resize, CAM and box work on the same images, in the same run.

    python benchmarks/bench_mine.py [--images 600] [--arch resnet18] [--scales 96 192]

Prints images/s of the in-process loop (on the N images), of the pipeline alone (the job's
summary: Ray running, from the first read to the last write) and of the whole command
(Python and Ray start-up included) at N and 4N images, and the peak memory of the job's
process tree, Ray's processes included (:func:`tree_memory`), at N and 4N. Targets (issue 4): the job
at least 0.8x the loop; peak memory at 4N at most 1.25x that at N. The job's start-up
(Ray, then the model actors importing torch) is a fixed 15-20 s on 2 cores, so its ratio
grows with N; 4N shows where it is headed.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dap_ray.data.images import decode_image, list_image_folder  # noqa: E402
from dap_ray.data.sample import SampleConfig, make_sample_dataset  # noqa: E402
from dap_ray.localisation.boxes import BoxConfig, cam_to_boxes_batch  # noqa: E402
from dap_ray.localisation.cam import CamExtractor  # noqa: E402
from dap_ray.models.classifiers import load_classifier  # noqa: E402


def tree_memory(root_pid: int) -> int:
    """Memory of a process and all its descendants, in bytes (Linux /proc): private memory
    (``RssAnon``) summed, plus the largest shared-memory residence (``RssShmem``: Ray's
    object store, mapped by every worker, counted once). Libraries' file pages are left
    out: torch's are mapped by every worker and live in the page cache. Cheap enough to
    sample often (``smaps_rollup``, which gives PSS, costs the benchmark a tenth of a core).
    """
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
                parents[int(entry)] = int(fields[1])
            except OSError:
                continue
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    private, shared = 0, 0
    for pid in tree:
        try:
            status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
        except (OSError, ValueError):
            continue
        private += int(status.get("RssAnon", "0 kB").split()[0]) * 1024
        shared = max(shared, int(status.get("RssShmem", "0 kB").split()[0]) * 1024)
    return private + shared


def in_process(root: Path, arch: str, weights: Path, scales, batch: int) -> float:
    torch.set_num_threads(os.cpu_count())
    listing = list_image_folder(root)
    extractor = CamExtractor(load_classifier(arch, weights), scales=scales, batch_size=batch)
    config = BoxConfig(scale=max(scales))
    start = time.perf_counter()
    for i in range(0, len(listing.items), batch):
        chunk = listing.items[i : i + batch]
        images = [decode_image((root / p).read_bytes()) for p, _ in chunk]
        cams = extractor(images, [label for _, label in chunk])
        cam_to_boxes_batch(cams, [(im.shape[1], im.shape[0]) for im in images], config)
    return len(listing.items) / (time.perf_counter() - start)


def run_job(root: Path, arch: str, weights: Path, scales, batch: int, output: Path) -> tuple[float, float, int]:
    command = [sys.executable, str(ROOT / "jobs" / "mine.py"), "--input", str(root), "--classifier", arch,
               "--weights", str(weights), "--scales", *map(str, scales), "--batch-size", str(batch),
               "--output", str(output)]
    start = time.perf_counter()
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = [0]

    def sample_memory():
        while job.poll() is None:
            peak[0] = max(peak[0], tree_memory(job.pid))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample_memory)
    sampler.start()
    job.wait()
    sampler.join()
    wall = time.perf_counter() - start
    if job.returncode != 0:
        raise SystemExit(f"mine.py failed ({job.returncode}): {' '.join(command)}")
    summary = json.loads((output / "summary.json").read_text())
    return summary["this_run"]["images_per_s"], summary["images"] / wall, peak[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--scales", type=int, nargs="+", default=[96, 192])
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tmp / "weights.pt"
        torch.manual_seed(0)
        torch.save(load_classifier(args.arch, num_classes=6).state_dict(), weights)
        small = make_sample_dataset(tmp / "small", SampleConfig(num_images=args.images)) / "images"
        large = make_sample_dataset(tmp / "large", SampleConfig(num_images=4 * args.images)) / "images"
        loop = in_process(small, args.arch, weights, args.scales, args.batch_size)
        pipeline, whole, peak_small = run_job(small, args.arch, weights, args.scales, args.batch_size, tmp / "out_small")
        pipeline_large, whole_large, peak_large = run_job(large, args.arch, weights, args.scales, args.batch_size,
                                                          tmp / "out_large")
    print(f"{args.arch}, scales {args.scales}, flips, {args.images} sample images, {os.cpu_count()} CPUs")
    print(f"in-process loop:            {loop:7.1f} images/s")
    print(f"jobs/mine.py, pipeline:     {pipeline:7.1f} images/s  ({pipeline / loop:.2f}x the loop)")
    print(f"jobs/mine.py, whole command:{whole:7.1f} images/s  ({whole / loop:.2f}x, Ray start-up included)")
    print(f"at {4 * args.images} images: pipeline {pipeline_large:.1f} images/s ({pipeline_large / loop:.2f}x), "
          f"whole command {whole_large:.1f} ({whole_large / loop:.2f}x)")
    print(f"peak memory: {peak_small / 2**30:.2f} GiB at {args.images} images, {peak_large / 2**30:.2f} GiB at "
          f"{4 * args.images} ({peak_large / peak_small:.2f}x)")


if __name__ == "__main__":
    main()
