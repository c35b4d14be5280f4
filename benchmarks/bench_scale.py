"""Mining at ImageNet-21K scale without pixels: what grows with the dataset in the driver.

Fabricates the outputs of a 14.2M-image run (ids, labels, random boxes at 3.2 per image, in
files of --rows-per-file images with their shard records, as jobs/mine.py writes them) and a
synthetic folder tree of empty files, then measures, each in a fresh process so that its
peak memory is its own:

- resume planning over the finished output and over a half-finished one (half the files
  gone, as if the driver died): read_progress + plan_resume against the listing's shards;
- the summary (images, boxes, errors) over the whole output (count_boxes);
- listing the folder tree into shards: serial, and as Ray tasks (jobs/mine.py's way);
- the number of output files;
- for contrast, the ways they replace: resuming by reading every id into a set (still the
  fallback for outputs without shard records) and listing every path in the driver
  (list_image_folder, which Step 1 still uses for its smaller training sets).

    python benchmarks/bench_scale.py --work /tmp/dap_scale [--images 14200000] [--tree-images 1420000]

--images sets the fabricated output (default the full 14.2M); --tree-images the folder tree
(default 1.42M empty files in 2,184 class folders of 650, a tenth of ImageNet-21K: the listing
figure is scaled by the ratio, and said so). Fabricating the full output takes a few minutes
and about 2 GB of disk; it is kept in --work and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGES_PER_CLASS = 650  # ImageNet-21K: 14.2M images in 21,841 classes
SHARD_SIZE = 64  # jobs/mine.py's default folder shard


def fabricate_output(output: Path, images: int, rows_per_file: int, seed: int = 0) -> None:
    """A finished run's boxes/ as jobs/mine.py writes it: ids in class folders of 650, shards of 64."""
    import numpy as np
    import pyarrow as pa

    from dap_ray.localisation.stages import BOXES_SCHEMA, _write_atomic

    boxes_dir = output / "boxes"
    if (output / "fabricated.json").is_file():
        return
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    for file_index, first in enumerate(range(0, images, rows_per_file)):
        n = min(rows_per_file, images - first)
        index = np.arange(first, first + n)
        cls, within = index // IMAGES_PER_CLASS, index % IMAGES_PER_CLASS
        ids = pa.array([f"n{c:08d}/n{c:08d}_{w}.JPEG" for c, w in zip(cls.tolist(), within.tolist())])
        counts = rng.poisson(3.2, n).astype(np.int32)
        total = int(counts.sum())
        corners = rng.uniform(0, 300, (total, 2)).astype(np.float32)
        xyxy = np.concatenate([corners, corners + rng.uniform(1, 200, (total, 2)).astype(np.float32)], axis=1)
        flat_boxes = pa.FixedSizeListArray.from_arrays(pa.array(xyxy.ravel()), 4)
        offsets = pa.array(np.r_[0, np.cumsum(counts)].astype(np.int32))
        boxes = pa.ListArray.from_arrays(offsets, flat_boxes.cast(pa.list_(pa.float32(), 4)))
        scores = pa.ListArray.from_arrays(offsets, pa.array(rng.uniform(0, 1, total).astype(np.float32)))
        table = pa.table({"image_id": ids, "label": pa.array(cls.astype(np.int32)),
                          "width": pa.array(np.full(n, 500, np.int32)), "height": pa.array(np.full(n, 375, np.int32)),
                          "boxes": boxes, "scores": scores}, schema=BOXES_SCHEMA)
        shard_counts: dict[str, list[int]] = {}
        for c, w in zip(cls.tolist(), within.tolist()):
            count = min(IMAGES_PER_CLASS, images - c * IMAGES_PER_CLASS)
            start = w // SHARD_SIZE * SHARD_SIZE
            stop = min(count, start + SHARD_SIZE)
            shard_counts.setdefault(f"n{c:08d}#{start}-{stop}/{count}", [0, stop - start])[0] += 1
        _write_atomic(table, boxes_dir / f"part-{file_index:07d}.parquet", shard_counts)
        if file_index % 100 == 0:
            print(f"  fabricated {first + n} of {images} images ({time.perf_counter() - started:.0f} s)", flush=True)
    (output / "fabricated.json").write_text(json.dumps({"images": images, "rows_per_file": rows_per_file}))


def listing_shards(images: int) -> list[dict]:
    """The shards jobs/mine.py would list for the fabricated output's input (no files needed)."""
    shards = []
    classes = -(-images // IMAGES_PER_CLASS)
    for c in range(classes):
        count = min(IMAGES_PER_CLASS, images - c * IMAGES_PER_CLASS)
        for start in range(0, count, SHARD_SIZE):
            stop = min(count, start + SHARD_SIZE)
            shards.append({"shard_id": f"n{c:08d}#{start}-{stop}/{count}", "key": f"n{c:08d}", "format": "folder"})
    return shards


def fabricate_tree(tree: Path, images: int) -> None:
    if (tree / ".done").is_file():
        return
    started = time.perf_counter()
    for c in range(-(-images // IMAGES_PER_CLASS)):
        folder = tree / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for w in range(min(IMAGES_PER_CLASS, images - c * IMAGES_PER_CLASS)):
            (folder / f"n{c:08d}_{w}.JPEG").touch()
        if c % 500 == 0:
            print(f"  tree: {c} folders ({time.perf_counter() - started:.0f} s)", flush=True)
    (tree / ".done").touch()


# Each measurement runs in its own process (see main) and prints one JSON line.
def measure(what: str, work: Path, images: int) -> dict:
    started = time.perf_counter()
    if what in ("plan-finished", "plan-half"):
        from dap_ray.localisation.stages import plan_resume, read_progress

        output = work / ("output" if what == "plan-finished" else "half")
        shards = listing_shards(images)
        t0 = time.perf_counter()
        progress = read_progress(output)
        remaining, how = plan_resume(shards, progress, output)
        result = {"shards_listed": len(shards), "shards_left": len(remaining), "done_images": progress.images,
                  "how": how, "plan_s": round(time.perf_counter() - t0, 2)}
    elif what == "plan-every-id":
        from dap_ray.localisation.stages import read_done_ids

        result = {"ids": len(read_done_ids(work / "output"))}
    elif what == "list-every-path":
        from dap_ray.data.images import list_image_folder

        t0 = time.perf_counter()
        listing = list_image_folder(work / "tree")
        result = {"paths": len(listing.items), "list_s": round(time.perf_counter() - t0, 2)}
    elif what == "summary":
        from dap_ray.data.export import count_boxes

        counted, boxes = count_boxes(work / "output" / "boxes")
        result = {"images": counted, "boxes": boxes}
    elif what in ("list-serial", "list-ray"):
        from dap_ray.data.sources import list_shards

        map_fn = map
        if what == "list-ray":
            import ray

            from dap_ray.steps.ray_setup import map_on_ray

            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            map_fn = map_on_ray
        t0 = time.perf_counter()
        shards, _, _ = list_shards(work / "tree", "folder", shard_size=SHARD_SIZE, map_fn=map_fn)
        wall = time.perf_counter() - t0
        result = {"shards": len(shards), "list_s": round(wall, 2), "shards_per_s": round(len(shards) / wall)}
    else:
        raise ValueError(what)
    result["wall_s"] = round(time.perf_counter() - started, 2)
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="folder for the fabricated output and tree (kept, reused)")
    parser.add_argument("--images", type=int, default=14_200_000, help="images in the fabricated output")
    parser.add_argument("--tree-images", type=int, default=1_420_000, help="empty files in the synthetic tree")
    parser.add_argument("--rows-per-file", type=int, default=10_000, help="jobs/mine.py's --rows-per-file")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    if args.measure:
        print(json.dumps(measure(args.measure, work, args.images if "plan" in args.measure else args.tree_images)))
        return

    print(f"fabricating {args.images} images' output in {work} (kept for reruns)", flush=True)
    fabricate_output(work / "output", args.images, args.rows_per_file)
    half = work / "half"
    if not (half / "boxes").is_dir():
        (half / "boxes").mkdir(parents=True)
        files = sorted((work / "output" / "boxes").glob("part-*.parquet"))
        for path in files[: len(files) // 2]:
            os.link(path, half / "boxes" / path.name)
    print(f"fabricating a tree of {args.tree_images} empty files", flush=True)
    fabricate_tree(work / "tree", args.tree_images)

    files = len(list((work / "output" / "boxes").glob("part-*.parquet")))
    print(f"\noutput files for {args.images} images at --rows-per-file {args.rows_per_file}: {files} "
          f"(boxes; errors add at most as many, usually far fewer)")
    scale = 14_200_000 / args.tree_images
    for what in ("plan-finished", "plan-half", "plan-every-id", "summary", "list-serial", "list-ray",
                 "list-every-path"):
        run = subprocess.run([sys.executable, __file__, "--work", str(work), "--images", str(args.images),
                              "--tree-images", str(args.tree_images), "--measure", what],
                             capture_output=True, text=True)
        if run.returncode:
            print(f"{what}: failed\n{run.stderr[-2000:]}")
            continue
        result = json.loads(run.stdout.strip().splitlines()[-1])
        if what.startswith("list") and "list_s" in result:
            result["list_s_scaled_to_14.2M"] = round(result["list_s"] * scale, 1)
        print(f"{what}: {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    main()
