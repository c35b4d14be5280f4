"""Step 2 on Ray Data: stream images through model actors and write pseudo boxes.

Stages: read shards (tasks) -> decode and resize to each CAM scale (CPU tasks; on CPU-only
runs Ray Data fuses them into the model actors) -> CAMs and boxes
(:class:`dap_ray.mining.CamBoxStage` on an actor pool, GPU or CPU, sized by
:func:`dap_ray.mining.resolve_actor_pool`) -> write Parquet (tasks). Resume: outputs are
written per batch, each file whole and named after its images, and a rerun skips every
image already in ``boxes/`` or ``errors/``; so a rerun after a killed driver writes exactly
the images that were missing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from dap_ray.config import config_to_dict, save_config
from dap_ray.mining import (CamBoxStage, MineConfig, decode_and_resize, pool_problem, read_done_ids,
                            resolve_actor_pool, write_results)
from dap_ray.ray_setup import init_ray
from dap_ray.sources import list_shards, read_shard

__all__ = ["SAMPLE_SCALES", "embedded_default", "mine", "sample_cache"]

# The sample's 128 px images and 96 px training crops stand to (96, 192) as ImageNet's
# ~400 px images and 224 px crops stand to the paper's (288, 576).
SAMPLE_SCALES = (96, 192)


def sample_cache(cache: str | Path | None = None) -> Path:
    """Where the embedded default keeps the sample set, its classifier and its pseudo boxes."""
    return Path(cache or os.environ.get("DAP_RAY_CACHE", Path.home() / ".cache" / "dap_ray")) / "sample-v1"


def embedded_default(cfg: MineConfig, cache: str | Path | None = None) -> MineConfig:
    """``cfg`` pointed at the built-in sample set and a resnet18 trained on it, made on first use."""
    from dap_ray.classifier import ClassifierTrainConfig, train_classifier
    from dap_ray.sample import SampleConfig, make_sample_dataset

    cache = sample_cache(cache)
    sample, run = cache / "data", cache / "classifier"
    if not (sample / "gt_boxes.json").is_file():
        print(f"first run: generating the built-in sample set in {sample} (seconds)", flush=True)
        make_sample_dataset(sample, SampleConfig())
    if not (run / "classifier.pt").is_file():
        print(f"first run: training a resnet18 on it, cached in {run} (about 4 minutes on 2 CPU cores)", flush=True)
        train_classifier(ClassifierTrainConfig(data=str(sample / "images"), class_map=str(sample / "classes.txt"),
                                               output=str(run)))
    meta = json.loads((run / "meta.json").read_text())
    print(f"mining the built-in sample set ({sample}) with the {meta['arch']} in {run}", flush=True)
    return dataclasses.replace(cfg, input=str(sample / "images"), format="folder", classifier=meta["arch"],
                               num_classes=meta["num_classes"], weights=str(run / "classifier.pt"),
                               class_map=str(sample / "classes.txt"),
                               scales=SAMPLE_SCALES, gt_boxes=cfg.gt_boxes or str(sample / "gt_boxes.json"))


def mine(cfg: MineConfig) -> dict:
    """Run Step 2 and return the summary written to ``cfg.output/summary.json``."""
    import ray
    from ray.data import ActorPoolStrategy

    if cfg.input is None:
        cfg = embedded_default(cfg)
    cfg = dataclasses.replace(cfg, input=str(Path(cfg.input).resolve()),
                              weights=str(Path(cfg.weights).resolve()) if cfg.weights else None)
    if cfg.weights and not Path(cfg.weights).is_file():
        raise ValueError(f"classifier weights not found: {cfg.weights}")
    output = Path(cfg.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    done = read_done_ids(output)
    shards, classes, problems = list_shards(cfg.input, cfg.format, cfg.class_map, cfg.shard_size, done,
                                            cfg.image_column, cfg.label_column)
    for line in problems:
        print(f"warning: {line}", flush=True)
    num_classes = cfg.num_classes or (len(classes) if classes and not cfg.weights else None)
    if done:
        print(f"resuming: {len(done)} images already in {output}", flush=True)

    init_ray()
    node_cpus = max([n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]] or [0])
    cfg = resolve_actor_pool(cfg, node_cpus, len(shards))
    problem = pool_problem(cfg, ray.cluster_resources().get("CPU", 0))
    if problem and not os.environ.get("RAY_ADDRESS"):
        raise ValueError(problem)
    if problem:  # an autoscaling cluster may yet add CPUs
        print(f"warning: {problem}", flush=True)
    save_config(cfg, output / "config.yaml")
    on_gpu = cfg.num_gpus_per_actor > 0
    started = time.perf_counter()
    counts = {"images": 0, "errors": 0, "boxes": 0}
    if shards:
        ds = ray.data.from_items(shards, override_num_blocks=len(shards))
        ds = ds.flat_map(read_shard)
        if cfg.limit is not None:
            ds = ds.limit(max(0, cfg.limit - len(done)))
        scales = tuple(sorted(cfg.scales))
        # On CPU, decode tasks ask for what a model actor holds, so that Ray Data fuses them into
        # the actors: decoding is ~1% of the work there, and fusing saves a worker that imports
        # torch at start-up and the pixels' trip through the object store (~3% on 2 cores).
        # With GPUs they stay a pool of 1-CPU tasks feeding the GPUs.
        ds = ds.map_batches(decode_and_resize, batch_format="pyarrow", batch_size=16, fn_kwargs={"scales": scales},
                            num_cpus=1 if on_gpu else cfg.cpus_per_actor)
        ds = ds.map_batches(
            CamBoxStage,
            batch_format="pyarrow",
            batch_size=cfg.batch_size,
            compute=ActorPoolStrategy(min_size=cfg.actors[0], max_size=cfg.actors[1]),
            num_gpus=cfg.num_gpus_per_actor or None,
            num_cpus=cfg.cpus_per_actor,
            fn_constructor_kwargs=dict(classifier=cfg.classifier, weights=cfg.weights, num_classes=num_classes,
                                       scales=scales, flip=cfg.flip, box_config=cfg.box_config(),
                                       batch_size=cfg.batch_size, device="cuda" if on_gpu else "cpu",
                                       torch_threads=cfg.torch_threads),
        )  # Ray Data's actor pools restart a dead actor and retry its batches (max_restarts=-1 by default).
        ds = ds.map_batches(write_results, batch_format="pyarrow", batch_size=None, fn_kwargs={"output": str(output)})
        last = 0.0
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for key in counts:
                counts[key] += sum(batch.column(key).to_pylist())
            now = time.perf_counter()
            if now - last > 10:
                done_now = counts["images"] + counts["errors"]
                print(f"mined {done_now} images ({counts['errors']} errors), "
                      f"{done_now / (now - started):.1f} images/s", flush=True)
                last = now
    wall = time.perf_counter() - started
    summary = _summary(output, wall, counts, cfg)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2), flush=True)
    return summary


def _summary(output: Path, wall: float, counts: dict, cfg: MineConfig) -> dict:
    from dap_ray.export import read_boxes

    rows = read_boxes(output / "boxes") if list((output / "boxes").glob("part-*.parquet")) else []
    errors = sum(pq.read_metadata(p).num_rows for p in sorted((output / "errors").glob("part-*.parquet")))
    total_boxes = sum(len(r["boxes"]) for r in rows)
    mined_now = counts["images"] + counts["errors"]
    rate = round(mined_now / wall, 2) if wall > 0 else 0.0
    summary = {
        "images": len(rows),
        "boxes": total_boxes,
        "boxes_per_image": total_boxes / len(rows) if rows else 0.0,
        "errors": errors,
        "this_run": {"images": counts["images"], "errors": counts["errors"], "wall_s": round(wall, 2),
                     "images_per_s": rate},
        "wall_s": round(wall, 2),
        "images_per_s": rate,
        "config": config_to_dict(cfg),
    }
    if cfg.gt_boxes and rows:
        from dap_ray.evaluation import load_coco_boxes, localisation_quality

        truth, _ = load_coco_boxes(cfg.gt_boxes)
        predictions = {r["image_id"]: (r["boxes"], r["scores"]) for r in rows}
        try:
            summary["quality"] = localisation_quality(predictions, truth)
        except ValueError as exc:
            print(f"warning: no quality figures: {exc}", file=sys.stderr)
    return summary
