"""Step 3's data path at ImageNet-21K scale, without a model.

Two parts, each measured in a fresh process so that its figures are its own:

1. **Formats.** The same --images JPEGs (crops of the photos that installed packages ship, at
   ImageNet's aspects: benchmarks/bench_gpu_mine.py's maker) as an image folder, synset tars
   (one tar of 650 members per class, as ImageNet-21K ships), WebDataset shards (``key.jpg``
   + ``key.cls``, 10,000 members a shard) and Parquet (bytes and label columns, one row group
   of 1,000 rows per file) twice: ``parquet_default`` as pyarrow's default writer writes it
   (the whole row group's images in one data page), ``parquet`` the same files rewritten by
   jobs/repack_parquet.py (pages of about 1 MiB, same rows and ids). Each gets a mining run's boxes (random boxes inside each image)
   and is read through the very dataset, sampler and collate that jobs/pretrain.py uses
   (one DataLoader process, the paper's sizes 96..640 and batch 2 per worker; the sampler's
   batches are drawn once, over the folder's images, and given to every format as the same
   images, so that formats differ only in how they read), timed over --batches batches after
   10 of warm-up, the fastest of --rounds
   interleaved rounds. Also timed: one read of an
   image's bytes by the index (``read_ms``) and by the id-based ``ImageReader`` that Step 3
   used before (``idread_ms``), in the sampler's order; and the one-time index build, also
   for --index-tars synset tars of 650 members (``ms_per_tar``, scaled to ImageNet-21K's 21,841
   tars on one core: the build runs as Ray tasks, so a cluster divides it by its cores).
2. **Pseudo boxes of 14.2M images** (benchmarks/bench_scale.py's fabricated output: 45M boxes
   in files of 10,000 rows): building the cache once (``build``), what each training process
   then does (``open``: map the cache, the sampler's aspect groups, one epoch's permutation,
   10,000 random images' boxes and ids), what the driver does (``driver``: map, count), and
   matching those images to 21,841 synset tars' members (``locations``: the index build with
   each tar's scan faked, its real cost being ``ms_per_tar``).

    python benchmarks/bench_pretrain_data.py --work /tmp/dap_pretrain_data [--images 13000] [--batches 150]
        [--rounds 2] [--index-tars 300] [--box-images 14200000]
        [--skip-formats] [--skip-boxes]

Inputs and the fabricated output are kept in --work and reused (about 3 GB of disk at the
defaults; the page cache is warm after the first run). The last lines, one per format and
two for the boxes:

    format=tar images_per_s=123.4 vs_folder=0.93
    boxes_14m peak_gib=2.1 load_s=41      (building the cache: once per mining output)
    boxes_14m_open peak_gib=0.4 load_s=0.9 (every training process, and the driver's peak)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORMATS = ("folder", "tar", "webdataset", "parquet", "parquet_default")
PER_SYNSET = 650  # ImageNet-21K: 14.2M images in 21,841 synset tars
WDS_MEMBERS = 10_000
PARQUET_ROWS = 1_000


def fabricate_inputs(work: Path, images: int) -> None:
    """The same JPEGs in the four layouts, and one mining run's boxes for each."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from benchmarks.bench_gpu_mine import make_photos, source_photos

    done = work / "inputs.json"
    if done.is_file() and json.loads(done.read_text())["images"] == images:
        return
    started = time.perf_counter()
    datas = make_photos(images, source_photos())
    names = [f"n{i // PER_SYNSET:08d}_{i % PER_SYNSET}" for i in range(images)]
    labels = [i // PER_SYNSET for i in range(images)]
    sizes = []
    for data in datas:
        with Image.open(io.BytesIO(data)) as image:
            sizes.append(image.size)
    print(f"  {images} photos, {sum(map(len, datas)) / images / 1e3:.0f} KB on average "
          f"({time.perf_counter() - started:.0f} s)", flush=True)

    folder = work / "folder"
    for name, data in zip(names, datas):
        (folder / name[:9]).mkdir(parents=True, exist_ok=True)
        (folder / name[:9] / f"{name}.JPEG").write_bytes(data)
    (work / "tar").mkdir(exist_ok=True)
    (work / "webdataset").mkdir(exist_ok=True)
    for first in range(0, images, PER_SYNSET):
        with tarfile.open(work / "tar" / f"{names[first][:9]}.tar", "w") as tar:
            for i in range(first, min(images, first + PER_SYNSET)):
                _add(tar, f"{names[i]}.JPEG", datas[i])
    for first in range(0, images, WDS_MEMBERS // 2):
        with tarfile.open(work / "webdataset" / f"shard-{first // (WDS_MEMBERS // 2):06d}.tar", "w") as tar:
            for i in range(first, min(images, first + WDS_MEMBERS // 2)):
                _add(tar, f"{i:09d}.jpg", datas[i])
                _add(tar, f"{i:09d}.cls", str(labels[i]).encode())
    (work / "parquet_default").mkdir(exist_ok=True)
    for first in range(0, images, PARQUET_ROWS):
        stop = min(images, first + PARQUET_ROWS)
        pq.write_table(pa.table({"image": pa.array(datas[first:stop], pa.binary()), "label": labels[first:stop]}),
                       work / "parquet_default" / f"part-{first // PARQUET_ROWS:05d}.parquet",
                       row_group_size=PARQUET_ROWS)
    from dap_ray.data.parquet_pages import rewrite_folder_with_small_pages

    rewrite_folder_with_small_pages(work / "parquet_default", work / "parquet", "image", progress=None)
    (work / "classes.txt").write_text("".join(f"n{c:08d}\n" for c in range(max(labels) + 1)))

    from dap_ray.data.sources import list_shards, read_shard
    from dap_ray.localisation.stages import BOXES_SCHEMA

    rng = np.random.default_rng(0)
    for fmt in FORMATS:
        source_fmt = {"webdataset": "tar", "parquet_default": "parquet"}.get(fmt, fmt)
        shards, _, _ = list_shards(work / fmt, source_fmt, class_map=work / "classes.txt")
        ids, labels_read = [], []
        for shard in shards:
            for record in read_shard(shard):
                ids.append(record["image_id"])
                labels_read.append(record["label"])
        rows = {"image_id": [], "label": [], "width": [], "height": [], "boxes": [], "scores": []}
        for image_id, label in zip(ids, labels_read):
            width, height = sizes[_image_number(fmt, image_id)]
            x0, y0 = rng.uniform(0, width / 2), rng.uniform(0, height / 2)
            rows["image_id"].append(image_id)
            rows["label"].append(label)
            rows["width"].append(width)
            rows["height"].append(height)
            rows["boxes"].append([[x0, y0, x0 + rng.uniform(8, width / 2), y0 + rng.uniform(8, height / 2)]])
            rows["scores"].append([1.0])
        run = work / f"{fmt}_run"
        (run / "boxes").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(rows, schema=BOXES_SCHEMA), run / "boxes" / "part-0.parquet")
        import yaml

        (run / "config.yaml").write_text(yaml.safe_dump({"input": str(work / fmt), "format": source_fmt,
                                                         "class_map": str(work / "classes.txt")}))
    done.write_text(json.dumps({"images": images}))
    print(f"  inputs written ({time.perf_counter() - started:.0f} s)", flush=True)


def _image_number(fmt: str, image_id: str) -> int:
    """Which of the made images an id names, in any layout."""
    name, _, key = image_id.rpartition("::")
    if fmt.startswith("parquet"):
        return int(name.split("-")[1].split(".")[0]) * PARQUET_ROWS + int(key)
    if fmt == "webdataset":
        return int(key.split(".")[0])
    stem = (key or image_id).split("/")[-1].split(".")[0]  # n00000003_12
    return int(stem[1:9]) * PER_SYNSET + int(stem.split("_")[1])


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def measure_format(work: Path, fmt: str, batches: int) -> dict:
    import numpy as np

    from dap_ray.data.sources import ImageReader
    from dap_ray.steps.pretrain import PretrainConfig, prepare_data
    from dap_ray.steps.pretrain.torchvision_backend import training_dataset

    run = work / f"{fmt}_run"
    cache = work / "cache" / fmt
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    cfg = PretrainConfig(boxes=str(run / "boxes"), output=str(work / "out" / fmt), cache_dir=str(cache),
                         loader_workers=1, batch_size=2)
    t0 = time.perf_counter()
    cfg, pseudo, _ = prepare_data(cfg)
    index_s = time.perf_counter() - t0

    # Every format gets the same images in the same batches: the sampler's stream over the folder
    # run's images, each mapped to this format's index by which made image it is.
    import torch

    from dap_ray.data.detection import AspectBatchSampler, collate_detection
    from dap_ray.data.pseudo_boxes import load_pseudo_boxes

    folder = load_pseudo_boxes(work / "folder_run" / "boxes", cache_dir=work / "cache" / "folder_ids")
    here = {_image_number(fmt, image_id): i for i, image_id in enumerate(pseudo.image_ids)}
    to_here = np.asarray([here[_image_number("folder", image_id)] for image_id in folder.image_ids])
    sampler = iter(AspectBatchSampler(folder.sizes, cfg.batch_size, cfg.min_sizes, seed=cfg.seed))
    batches = [[(int(to_here[i]), size, flip) for i, size, flip in next(sampler)] for _ in range(batches + 10)]
    order = [i for batch in batches[:300] for i, _, _ in batch]
    dataset = training_dataset(cfg, pseudo)
    images = dataset.images
    t0 = time.perf_counter()
    for i in order:
        images.read(i)
    read_ms = (time.perf_counter() - t0) / len(order) * 1e3
    reader = ImageReader(cfg.input, cfg.format, cfg.image_column)
    t0 = time.perf_counter()
    for i in order[:200]:
        reader.read(pseudo.image_id(i))
    idread_ms = (time.perf_counter() - t0) / 200 * 1e3

    # training_loader's DataLoader, over those batches.
    loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_detection,
                                              num_workers=cfg.loader_workers))
    for _ in range(10):
        next(loader)
    t0 = time.perf_counter()
    count = sum(len(batch) for batch in loader)
    wall = time.perf_counter() - t0
    return {"images_per_s": round(count / wall, 1), "read_ms": round(read_ms, 3), "idread_ms": round(idread_ms, 2),
            "index_s": round(index_s, 2), "images": len(pseudo), "mean_kb": round(float(np.mean(
                [len(images.read(i)) for i in order[:100]])) / 1e3, 1)}


def measure_tar_index(work: Path, tars: int) -> dict:
    """Indexing synset tars of 650 members (what Step 3 does once per input): ms per tar, one core."""
    from dap_ray.data.locations import scan_input_file

    folder = work / "index_tars"
    if len(list(folder.glob("*.tar"))) != tars:
        folder.mkdir(parents=True, exist_ok=True)
        payload = bytes(1000)
        for t in range(tars):
            with tarfile.open(folder / f"n{t:08d}.tar", "w") as tar:
                for i in range(PER_SYNSET):
                    _add(tar, f"n{t:08d}_{i}.JPEG", payload)
    names = sorted(p.name for p in folder.glob("*.tar"))
    t0 = time.perf_counter()
    members = sum(len(scan_input_file("tar", str(folder), name)["members"]) for name in names)
    per_tar_ms = (time.perf_counter() - t0) / len(names) * 1e3
    return {"tars": len(names), "members": members, "ms_per_tar": round(per_tar_ms, 2),
            "imagenet21k_core_s": round(per_tar_ms * 21_841 / 1e3, 1)}


def measure_boxes(what: str, work: Path) -> dict:
    import numpy as np

    from dap_ray.data.detection import AspectBatchSampler
    from dap_ray.data.pseudo_boxes import box_cache_folder, build_box_cache, open_box_cache

    boxes = work / "boxes14m" / "output" / "boxes"
    folder = box_cache_folder(boxes, work / "boxes14m_cache")
    t0 = time.perf_counter()
    if what == "build":
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        meta = build_box_cache(boxes, folder)
        result = {"images": meta["images"], "boxes": meta["boxes"]}
    elif what == "open":
        pseudo = open_box_cache(str(folder))
        sampler = AspectBatchSampler(pseudo.sizes, 2, (96, 160, 320, 640), rank=0, world=8)
        first = next(iter(sampler))  # draws one epoch's permutation
        rng = np.random.default_rng(0)
        picked = rng.integers(0, len(pseudo), 10_000)
        held = sum(len(pseudo.boxes_of(int(i))) for i in picked)
        ids = [pseudo.image_id(int(i)) for i in picked]
        result = {"images": len(pseudo), "boxes_read": held, "ids_read": len(ids), "first_batch": len(first)}
    elif what == "locations":
        result = _locations_at_scale(open_box_cache(str(folder)), work)
    else:  # driver
        pseudo = open_box_cache(str(folder))
        result = {"images": len(pseudo), "boxes": pseudo.num_boxes, "max_label": pseudo.max_label}
    result["load_s"] = round(time.perf_counter() - t0, 2)
    result["peak_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return result


def _locations_at_scale(pseudo, work: Path) -> dict:
    """Matching 14.2M images to the members of 21,841 synset tars, the scans themselves faked
    (each tar lists its 650 members by name without any I/O; ``ms_per_tar`` times real ones).

    The fabricated output's folder ids (``SYNSET/SYNSET_K.JPEG``) are rewritten once into a box
    cache with tar ids (``SYNSET.tar::SYNSET_K.JPEG``), which this process memory-maps as a
    training run would; the figures are the index build's alone.
    """
    import shutil

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    import dap_ray.data.locations as locations
    from dap_ray.data.pseudo_boxes import open_box_cache

    tar_cache = work / "boxes14m_tar_ids"
    if not (tar_cache / "meta.json").is_file():
        tar_cache.mkdir(parents=True, exist_ok=True)
        ids = pa.LargeStringArray.from_buffers(len(pseudo), pa.py_buffer(np.asarray(pseudo.id_offsets)),
                                               pa.py_buffer(np.asarray(pseudo.id_bytes)))
        renamed = pc.replace_substring(ids, "/", ".tar::", max_replacements=1)
        ends = np.frombuffer(renamed.buffers()[1], np.int64)[: len(renamed) + 1]
        np.save(tar_cache / "id_offsets.npy", ends - ends[0])
        np.save(tar_cache / "id_bytes.npy", np.frombuffer(renamed.buffers()[2], np.uint8)[ends[0] : ends[-1]])
        for name in ("labels", "sizes", "offsets", "boxes"):
            os.link(Path(pseudo.folder) / f"{name}.npy", tar_cache / f"{name}.npy")
        shutil.copy(Path(pseudo.folder) / "meta.json", tar_cache / "meta.json")
        del ids, renamed
    for old in tar_cache.glob("locations-*"):
        shutil.rmtree(old)
    tarred = open_box_cache(str(tar_cache))

    def listed(fmt, root, name, image_column="image"):
        synset = name[: -len(".tar")]
        count = PER_SYNSET
        return {"size": 0, "members": pa.array([f"{synset}_{w}.JPEG" for w in range(count)], pa.large_string()),
                "offsets": np.arange(count, dtype=np.int64) * 1024, "sizes": np.full(count, 1000, np.int64)}

    locations.scan_input_file = listed
    (work / "no_tars").mkdir(exist_ok=True)
    found = locations.load_locations(tarred, work / "no_tars", "tar")
    return {"images": len(tarred), "tars": len(found.files), "missing": found.missing}


def _in_process(args: argparse.Namespace, what: str) -> dict:
    run = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--batches", str(args.batches),
                          "--measure", what], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{what} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, type=Path, help="folder for inputs and outputs (kept, reused)")
    parser.add_argument("--images", type=int, default=13_000, help="images in each format (20 synset tars of 650)")
    parser.add_argument("--batches", type=int, default=150, help="timed batches of 2 per format")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the formats; the fastest counts")
    parser.add_argument("--index-tars", type=int, default=300, help="synset tars of 650 members indexed for timing")
    parser.add_argument("--box-images", type=int, default=14_200_000, help="images in the fabricated mining output")
    parser.add_argument("--skip-formats", action="store_true")
    parser.add_argument("--skip-boxes", action="store_true")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        kind, _, what = args.measure.partition(":")
        if kind == "format":
            result = measure_format(args.work, what, args.batches)
        elif kind == "index":
            result = measure_tar_index(args.work, int(what))
        else:
            result = measure_boxes(what, args.work)
        print(json.dumps(result))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    lines = []
    if not args.skip_formats:
        print(f"inputs: {args.images} images in each of {', '.join(FORMATS)} under {args.work}", flush=True)
        fabricate_inputs(args.work, args.images)
        results: dict[str, dict] = {}
        for round_ in range(args.rounds):  # interleaved, so that a noisy minute hits every format alike
            for fmt in FORMATS:
                result = _in_process(args, f"format:{fmt}")
                print(f"round {round_ + 1} {fmt}: {json.dumps(result)}", flush=True)
                if result["images_per_s"] > results.get(fmt, {}).get("images_per_s", 0):
                    results[fmt] = result
        folder = results["folder"]["images_per_s"]
        lines += [f"format={fmt} images_per_s={r['images_per_s']} vs_folder={r['images_per_s'] / folder:.2f}"
                  for fmt, r in results.items()]
        index = _in_process(args, f"index:{args.index_tars}")
        print(f"tar index: {json.dumps(index)}", flush=True)
        lines.append(f"index_tars ms_per_tar={index['ms_per_tar']} imagenet21k_core_s={index['imagenet21k_core_s']}")
    if not args.skip_boxes:
        from benchmarks.bench_scale import fabricate_output

        print(f"fabricating a {args.box_images}-image mining output (kept for reruns)", flush=True)
        fabricate_output(args.work / "boxes14m" / "output", args.box_images, 10_000)
        boxes = {}
        for what in ("build", "open", "driver", "locations"):
            boxes[what] = _in_process(args, f"boxes:{what}")
            print(f"boxes {what}: {json.dumps(boxes[what])}", flush=True)
        lines.append(f"boxes_14m peak_gib={boxes['build']['peak_gib']} load_s={boxes['build']['load_s']:.0f}")
        lines.append(f"boxes_14m_open peak_gib={boxes['open']['peak_gib']} load_s={boxes['open']['load_s']} "
                     f"driver_peak_gib={boxes['driver']['peak_gib']}")
        lines.append(f"index_14m_join peak_gib={boxes['locations']['peak_gib']} load_s={boxes['locations']['load_s']}")
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
