"""Step 2 on Ray Data: stream images through model actors and write pseudo boxes.

Stages (:mod:`dap_ray.localisation.stages`, plain functions over pyarrow batches): read
shards (tasks) -> on CPU-only runs, decode and resize to each CAM scale (tasks that Ray Data
fuses into the model actors) -> CAMs and boxes (:class:`CamBoxStage` on an actor pool, GPU
or CPU, sized by :func:`resolve_actor_pool`; with GPUs :class:`EncodedCamBoxStage`, which
takes the encoded bytes and decodes and resizes on the GPU, so the object store carries
JPEGs rather than pixels and the node needs no CPUs to decode) -> write Parquet (tasks).
Resume: outputs are written per batch, each file whole and named after its images, and a rerun skips every
image already in ``boxes/`` or ``errors/``; so a rerun after a killed driver writes exactly
the images that were missing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq
import yaml

from dap_ray.config import config_to_dict, save_config
from dap_ray.data.images import classifier_classes, first_class_difference, read_class_map
from dap_ray.data.sources import check_input, list_shards, read_shard
from dap_ray.localisation.boxes import BoxConfig
from dap_ray.localisation.stages import (
    GPU_FORWARD_IMAGES_PER_16_GIB,
    CamBoxStage,
    EncodedCamBoxStage,
    decode_and_resize,
    drop_retryable_errors,
    plan_resume,
    read_progress,
    write_results,
)
from dap_ray.progress import Progress
from dap_ray.runs import open_run, settings_differ
from dap_ray.steps.ray_setup import check_device, computes_on_gpu, init_ray, map_on_ray

__all__ = ["CPU_BATCH_SIZE", "GPU_BATCH_SIZE", "MAX_CPU_ACTORS", "MineConfig", "actor_pool_sizes", "actor_shapes",
           "mine", "pool_problem", "resolve_actor_pool"]

# CPU pools: on 2 cores two one-thread actors mine about 15% faster than one actor on both
# cores, whose threads stall whenever another process takes a core (benchmarks/bench_mine.py);
# more actors multiply memory (about 7 GB each for ResNet-50 at 288+576, batch 32).
MAX_CPU_ACTORS = 2
# Model batches. On an H200 (benchmarks/bench_gpu_mine.py, ResNet-50 at 288+576 with flips), Ray
# batches of 256 mined 424 images/s against 308 for 64 and 410 for 1,024: a forward pass takes
# only the images of one padded shape, 18 on average at 256 and 8 at 64.
CPU_BATCH_SIZE = 32
GPU_BATCH_SIZE = 256


@dataclass(frozen=True)
class MineConfig:
    """Step 2 (pseudo boxes). Defaults are the paper's; with no ``input`` the built-in sample runs."""

    input: str | None = field(default=None, metadata={
        "help": "images to mine (default: the built-in sample set, generated and a classifier trained on first use)"})
    format: Literal["folder", "tar", "parquet"] = field(default="folder", metadata={
        "help": "folder: ROOT/<class>/<image>; tar: tar shards (one per class, or WebDataset .cls); "
                "parquet: files with image and label columns"})
    output: str = field(default="dap_output", metadata={"help": "output folder"})
    classifier: str = field(default="resnet50", metadata={"help": "torchvision name or package.module:factory"})
    weights: str | None = field(default=None, metadata={"help": "classifier state dict (a torchvision ImageNet checkpoint, or classifier.pt)"})
    class_map: str | None = field(default=None, metadata={
        "help": "class names, one per line, line i = classifier output i (folder default: sorted folder names)"})
    num_classes: int | None = field(default=None, metadata={"help": "classifier outputs (default: from the weights or class map)"})
    scales: tuple[int, ...] = field(default=(288, 576), metadata={"help": "CAM short sides"})
    flip: bool = field(default=True, metadata={"help": "average with the mirrored image"})
    thresholds: tuple[float, ...] = field(default=(0.2, 0.3, 0.4, 0.5), metadata={"help": "CAM thresholds"})
    nms_iou: float = field(default=0.8, metadata={"help": "NMS IoU"})
    preset: Literal["official", "paper"] = field(default="official", metadata={
        "help": "official: the authors' released script; paper: the equations as printed"})
    size_measure: Literal["rectangle", "cells"] | None = field(default=None, metadata={
        "help": "how components are sized, ranked and kept (half the largest): their bounding rectangle's area or "
                "their cell count (default: the preset's; jobs/tune_boxes.py searches it)"})
    batch_size: int | None = field(default=None, metadata={
        "help": f"images per model batch (default: {CPU_BATCH_SIZE} on CPU; {GPU_BATCH_SIZE} with GPUs, where only "
                "images of one padded shape share a forward pass and larger batches fill the GPU)"})
    decode: Literal["auto", "tasks", "actors"] = field(default="auto", metadata={
        "help": "where images are decoded and resized: tasks (CPU tasks send the model actors pixels), actors (the "
                "encoded bytes travel to the model actors, which decode on their device: JPEGs with nvJPEG on GPUs); "
                "auto: actors with GPUs, tasks on CPU"})
    shapes: Literal["auto", "exact", "buckets"] = field(default="auto", metadata={
        "help": "how images share a forward pass: exact (each padded shape its own pass, the authors' "
                "one-image-at-a-time CAMs) or buckets (landscape and portrait 4:3 shapes per scale: an image is "
                "padded, or squeezed when more elongated, its CAM taken on its own cells and its boxes stretched "
                "back; 128 images per pass at batch 256 on ImageNet's aspects against 18, CorLoc on the sample "
                "within 0.002: docs/mining.md); auto: buckets with GPUs, exact on CPU (where fuller passes gain "
                "nothing and padding costs)"})
    forward_images: int | None = field(default=None, metadata={
        "help": "images per forward pass at most, each with its mirror (default: the batch on CPU; on a GPU "
                f"{GPU_FORWARD_IMAGES_PER_16_GIB} per 16 GiB of its memory)"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the CAM network in each model actor (the first batches compile, about a minute on "
                "an H200, then 1.1x there: benchmarks/bench_gpu_mine.py); best with --shapes buckets"})
    compile_mode: Literal["default", "max-autotune", "reduce-overhead", "tensorrt"] = field(
        default="default", metadata={
            "help": "with --compile: torch.compile's mode (reduce-overhead: CUDA graphs) or torch-tensorrt's backend; "
                    "one that cannot run on the actor's device falls back to eager, with a warning in its log"})
    cudnn_benchmark: bool = field(default=False, metadata={
        "help": "let cuDNN time its kernels for each new input shape (pays with --shapes buckets)"})
    num_gpus_per_actor: float = field(default=0.0, metadata={"help": "GPUs per model actor (0: CPU actors)"})
    device: Literal["auto", "cuda", "cpu"] = field(default="auto", metadata={
        "help": "where the model actors compute: auto: cuda when they hold GPUs (a GPU node without a working driver "
                "fails loudly), else cpu; cpu with --num-gpus-per-actor: Ray schedules the GPU path's actors as for GPUs "
                "and they compute on CPU (clusters of fake GPU nodes in tests, debugging a GPU deployment)"})
    actors: tuple[int, ...] | None = field(default=None, metadata={
        "help": "MIN MAX model actors, an autoscaling pool (default with GPUs: from 1 up to every GPU the cluster "
                "has or its autoscaler can add; on CPU a fixed pool of one actor per CPU of the largest node, "
                f"at most {MAX_CPU_ACTORS})"})
    actor_start_timeout_s: float = field(default=1800.0, metadata={
        "help": "stop with an error when no model actor has started after this many seconds (no node fits one and "
                "the autoscaler added none: a GPU node type missing, a quota, a node that fails to start); cloud GPU "
                "nodes take minutes to come; 0 waits for ever"})
    cpus_per_actor: float | None = field(default=None, metadata={
        "help": "CPUs Ray reserves per model actor (default: 1 with GPUs; on CPU, the node's CPUs less the one "
                "kept for the read and write tasks, shared among the actors)"})
    torch_threads: int | None = field(default=None, metadata={
        "help": "torch threads per CPU actor (default: the node's CPUs over the largest pool)"})
    shard_size: int = field(default=64, metadata={"help": "folder images per read task (smaller streams sooner)"})
    rows_per_file: int = field(default=10_000, metadata={
        "help": "images per output file (a 14M-image run writes about 1,400 files; a killed driver loses at most "
                "the rows not yet written, which a rerun mines again)"})
    limit: int | None = field(default=None, metadata={"help": "mine at most this many images"})
    gt_boxes: str | None = field(default=None, metadata={"help": "COCO file of true boxes: report quality in summary.json"})
    image_column: str = field(default="image", metadata={"help": "parquet: image column (bytes or path)"})
    label_column: str = field(default="label", metadata={"help": "parquet: label column (int or class name)"})

    def __post_init__(self) -> None:
        if not self.scales or min(self.scales) < 1:
            raise ValueError(f"scales must be positive, got {self.scales}")
        if self.actors is not None and (len(self.actors) != 2 or not 1 <= self.actors[0] <= self.actors[1]):
            raise ValueError(f"actors must be MIN MAX with 1 <= MIN <= MAX, got {self.actors}")
        if self.cpus_per_actor is not None and self.cpus_per_actor < 0:
            raise ValueError(f"cpus_per_actor must be at least 0, got {self.cpus_per_actor}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be at least 1, got {self.torch_threads}")
        for name in ("batch_size", "shard_size", "rows_per_file", "forward_images"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        check_device(self.device, self.num_gpus_per_actor > 0, "--num-gpus-per-actor above 0")
        if self.actor_start_timeout_s < 0:
            raise ValueError(f"actor_start_timeout_s must be at least 0, got {self.actor_start_timeout_s}")
        if self.decode not in ("auto", "tasks", "actors"):
            raise ValueError(f"decode must be auto, tasks or actors, got {self.decode!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")
        self.box_config()  # thresholds, nms_iou and preset checked where they live

    def box_config(self) -> BoxConfig:
        extra = {"size_measure": self.size_measure} if self.size_measure else {}
        return BoxConfig.from_preset(self.preset, scale=max(self.scales), thresholds=self.thresholds, nms_iou=self.nms_iou,
                                     **extra)


def resolve_actor_pool(cfg: MineConfig, node_cpus: int, shards: int | None = None) -> MineConfig:
    """``cfg`` with the model pool's defaults filled in for a cluster whose largest node has ``node_cpus``.

    With GPUs: ``actors`` left None, an autoscaling pool of at least one actor and no upper
    bound but the cluster's GPUs (see :func:`actor_pool_sizes`), ``cpus_per_actor`` 1. On CPU: a fixed pool of
    ``min(node_cpus, MAX_CPU_ACTORS, shards)`` actors (no more than there are input shards
    to feed them) that together reserve all but one of the node's CPUs (the read and write
    tasks need one each), ``torch_threads`` the node's CPUs over the largest pool.
    ``batch_size``: :data:`GPU_BATCH_SIZE` or :data:`CPU_BATCH_SIZE`. Values the user set are kept.
    """
    if cfg.num_gpus_per_actor > 0:
        return replace(cfg, cpus_per_actor=1.0 if cfg.cpus_per_actor is None else cfg.cpus_per_actor,
                       batch_size=cfg.batch_size or GPU_BATCH_SIZE)
    node_cpus = max(1, int(node_cpus))
    actors = cfg.actors
    if actors is None:
        size = max(1, min(node_cpus, MAX_CPU_ACTORS, shards or MAX_CPU_ACTORS))
        if cfg.cpus_per_actor:  # as many as fit beside the task CPU
            size = max(1, min(size, int((node_cpus - 1) / cfg.cpus_per_actor)))
        actors = (size, size)
    cpus = cfg.cpus_per_actor
    if cpus is None:
        cpus = round(max(0, node_cpus - 1) / actors[1], 3)
    threads = cfg.torch_threads or max(1, node_cpus // actors[1])
    return replace(cfg, actors=tuple(actors), cpus_per_actor=cpus, torch_threads=threads,
                   batch_size=cfg.batch_size or CPU_BATCH_SIZE)


def actor_shapes(shapes: str, on_gpu: bool) -> str:
    """The model actors' shape policy for ``--shapes``: ``auto`` is ``buckets`` for actors that
    compute on GPUs (``on_gpu``: fuller forward passes) and ``exact`` on CPU (where they gain
    nothing and padding costs)."""
    if shapes != "auto":
        return shapes
    return "buckets" if on_gpu else "exact"


def actor_pool_sizes(cfg: MineConfig) -> tuple[int, int | None]:
    """(min, max) of the model pool, max None for no bound but the cluster's resources: Ray Data
    grows the pool while there is work and the cluster has, or its autoscaler can add, a GPU."""
    return (cfg.actors[0], cfg.actors[1]) if cfg.actors else (1, None)


def pool_problem(cfg: MineConfig, cluster_cpus: float) -> str | None:
    """Why the smallest model pool would leave no CPU for the read and write tasks, or None.

    Ray would then wait forever for a CPU: the actors hold them all.
    """
    smallest = actor_pool_sizes(cfg)[0]
    held = smallest * cfg.cpus_per_actor
    if held > cluster_cpus - 1:
        return (f"{smallest} model actor(s) x {cfg.cpus_per_actor:g} CPUs would hold {held:g} of the cluster's "
                f"{cluster_cpus:g} CPUs, leaving less than the 1 CPU the read and write tasks need: "
                f"lower --actors or --cpus-per-actor")
    return None


# Settings that change the boxes: a rerun into an output that holds boxes must keep them.
BOX_SETTINGS = ("input", "format", "classifier", "weights", "num_classes", "class_map", "scales", "flip", "thresholds",
                "nms_iou", "preset", "size_measure", "image_column", "label_column", "shapes")


def mine(cfg: MineConfig) -> dict:
    """Run Step 2 and return the summary written to ``cfg.output/summary.json``.

    Holds ``cfg.output``'s lock for the run (:func:`dap_ray.runs.open_run`); a rerun into an
    output that already holds boxes resumes, and stops if any of :data:`BOX_SETTINGS` differ.
    """
    if cfg.input is None:
        raise ValueError("no --input given (the jobs fill in the built-in sample: dap_ray.steps.embedded)")
    absolute = {k: str(Path(getattr(cfg, k)).resolve()) for k in ("input", "weights", "class_map", "gt_boxes")
                if getattr(cfg, k)}
    cfg = dataclasses.replace(cfg, **absolute)
    if cfg.weights and not Path(cfg.weights).is_file():
        raise ValueError(f"classifier weights not found: {cfg.weights}")
    if cfg.class_map and not Path(cfg.class_map).is_file():
        raise ValueError(f"class map not found: {cfg.class_map}")
    check_input(cfg.input, cfg.format)  # a mistyped path fails at once, not after Ray's start-up
    with open_run(Path(cfg.output).resolve()) as output:
        return _mine(cfg, output)


def _classifier_class_map(cfg: MineConfig, output: Path) -> tuple[MineConfig, list[str] | None]:
    """``cfg`` labelling images in the classifier's own class order, when Step 1's ``meta.json`` gives
    it, and the class list to write to ``output/classes.txt`` (once the run is known to go ahead).

    A class map that disagrees with it is an error: every CAM would be taken for the wrong class.
    """
    known = classifier_classes(cfg.weights)
    if known is None:
        return cfg, None
    meta = Path(cfg.weights).parent / "meta.json"
    if cfg.class_map:
        difference = first_class_difference(read_class_map(cfg.class_map), known)
        if difference:
            raise ValueError(f"class map {cfg.class_map} disagrees with the classes the classifier was trained on "
                             f"({meta}): {difference}")
        return cfg, None
    print(f"labelling images in the classifier's class order ({meta}; written to {output / 'classes.txt'})",
          flush=True)
    return dataclasses.replace(cfg, class_map=str(output / "classes.txt")), known


def _comparable(settings: dict, classes: list[str] | None = None) -> dict:
    """Settings with the class map's path replaced by its classes (``classes`` when given): the same
    list from two paths is the same."""
    path = settings.get("class_map")
    if classes is not None:
        return {**settings, "class_map": classes}
    if path and Path(path).is_file():
        return {**settings, "class_map": read_class_map(path)}
    return settings


def _mine(cfg: MineConfig, output: Path) -> dict:
    import ray
    from ray.data import ActorPoolStrategy

    cfg, classes_to_write = _classifier_class_map(cfg, output)
    # Saved resolved, so that a rerun on other hardware cannot mix the two policies' boxes.
    cfg = replace(cfg, shapes=actor_shapes(cfg.shapes, computes_on_gpu(cfg.num_gpus_per_actor > 0, cfg.device)))
    saved = output / "config.yaml"
    progress = read_progress(output)
    written = progress.images
    if written and saved.is_file():
        # Checked before anything in the output changes: a refused rerun leaves the run as it was.
        # Runs from before --shapes mined with the exact policy.
        previous = _comparable({"shapes": "exact", **(yaml.safe_load(saved.read_text()) or {})})
        differing = settings_differ(previous, _comparable(config_to_dict(cfg), classes_to_write), BOX_SETTINGS)
        if differing:
            details = "; ".join(f"{k}: {previous.get(k)!r} then, {getattr(cfg, k)!r} now" for k in differing)
            raise ValueError(f"{output} already holds images mined with other settings ({details}): "
                             f"mining on would mix two runs. Give another --output, or the same settings to resume")
    if classes_to_write is not None:
        path = Path(cfg.class_map)
        if not path.is_file() or read_class_map(path) != classes_to_write:
            path.write_text("".join(f"{name}\n" for name in classes_to_write))
    retried = drop_retryable_errors(output)
    if retried:
        print(f"retrying {retried} images whose reading failed last time (I/O errors, files not found)", flush=True)
        progress = read_progress(output)
    init_ray()
    shards, classes, problems = list_shards(cfg.input, cfg.format, cfg.class_map, cfg.shard_size, (),
                                            cfg.image_column, cfg.label_column, map_fn=map_on_ray)
    for line in problems:
        print(f"warning: {line}", flush=True)
    num_classes = cfg.num_classes or (len(classes) if classes and not cfg.weights else None)
    done = progress.images
    if written:
        listed = len(shards)
        shards, how = plan_resume(shards, progress, output)
        print(f"resuming: {done} images already in {output}, {len(shards)} of {listed} shards left to read ({how})",
              flush=True)

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
            ds = ds.limit(max(0, cfg.limit - done))
        scales = tuple(sorted(cfg.scales))
        # On CPU, decode tasks ask for what a model actor holds, so that Ray Data fuses them into
        # the actors: decoding is ~1% of the work there, and fusing saves a worker that imports
        # torch at start-up and the pixels' trip through the object store (~3% on 2 cores).
        # With GPUs the actors decode on the GPU: pixels for both scales are ~45x an ImageNet-like
        # JPEG's bytes, and decoding them at 2,000 images/s would take 7-14 cores per GPU
        # (benchmarks/bench_gpu_mine.py).
        decode_in_actors = cfg.decode == "actors" or (cfg.decode == "auto" and on_gpu)
        if not decode_in_actors:
            ds = ds.map_batches(decode_and_resize, batch_format="pyarrow", batch_size=16,
                                fn_kwargs={"scales": scales}, num_cpus=1 if on_gpu else cfg.cpus_per_actor)
        min_actors, max_actors = actor_pool_sizes(cfg)
        device = "cuda" if computes_on_gpu(on_gpu, cfg.device) else "cpu"
        ds = ds.map_batches(
            EncodedCamBoxStage if decode_in_actors else CamBoxStage,
            batch_format="pyarrow",
            batch_size=cfg.batch_size,
            compute=ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
            num_gpus=cfg.num_gpus_per_actor or None,
            num_cpus=cfg.cpus_per_actor,
            fn_constructor_kwargs=dict(classifier=cfg.classifier, weights=cfg.weights, num_classes=num_classes,
                                       scales=scales, flip=cfg.flip, box_config=cfg.box_config(),
                                       batch_size=cfg.batch_size, forward_images=cfg.forward_images,
                                       device=device, torch_threads=cfg.torch_threads,
                                       shapes=cfg.shapes, gpu_share=cfg.num_gpus_per_actor or 1.0,
                                       compile=cfg.compile_mode if cfg.compile else "off",
                                       cudnn_benchmark=cfg.cudnn_benchmark),
        )  # Ray Data's actor pools restart a dead actor and retry its batches (max_restarts=-1 by default).
        # Rows reach the writer small (ids and boxes): bundling rows_per_file of them per file keeps
        # a 14M-image output to about a thousand files, each written whole.
        ds = ds.map_batches(write_results, batch_format="pyarrow", batch_size=cfg.rows_per_file,
                            fn_kwargs={"output": str(output)})
        # Ray Data then waits for the pool's first actor before it streams, and gives up after the timeout.
        ds.context.wait_for_min_actors_s = math.ceil(cfg.actor_start_timeout_s) or -1
        # The last two minutes' rate: the pool grows as the autoscaler adds GPU nodes, and the time
        # left should follow.
        lines = Progress(_images_to_mine(shards, done, cfg.limit), "images", done=done, every_s=10.0, window_s=120)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for key in counts:
                    counts[key] += sum(batch.column(key).to_pylist())
                if lines.due():
                    print(f"mined {lines.line(done + counts['images'] + counts['errors'])} "
                          f"({counts['errors']} errors)", flush=True)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"no model actor started within {cfg.actor_start_timeout_s:g} s (--actor-start-timeout-s): no node of "
                f"the cluster fits one ({cfg.num_gpus_per_actor:g} GPU(s) and {cfg.cpus_per_actor:g} CPU(s) each) and "
                f"its autoscaler added none; check the node types and quotas (`ray status`), or lower "
                f"--num-gpus-per-actor / --cpus-per-actor. What was mined so far is kept; the same command resumes"
            ) from None
    wall = time.perf_counter() - started
    summary = _summary(output, wall, counts, cfg)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2), flush=True)
    return summary


def _images_to_mine(shards: list[dict], done: int, limit: int | None) -> int | None:
    """Images the run will have mined at its end: ``done`` plus the shards' still to read, when
    their sizes are known before reading (folder shards: ranges of a listed class folder;
    tars and Parquet files are counted only as they are read), at most ``limit``; else None."""
    if not all("stop" in shard for shard in shards):
        return None
    left = sum(shard["stop"] - shard["start"] - len(shard.get("skip", ())) for shard in shards)
    return min(done + left, limit) if limit is not None else done + left


def _summary(output: Path, wall: float, counts: dict, cfg: MineConfig) -> dict:
    """The run's figures, streamed from its files in Arrow: flat memory at 14M images."""
    from dap_ray.data.export import count_boxes, read_boxes_of

    images, total_boxes = count_boxes(output / "boxes")
    errors = sum(pq.read_metadata(p).num_rows for p in sorted((output / "errors").glob("part-*.parquet")))
    mined_now = counts["images"] + counts["errors"]
    rate = round(mined_now / wall, 2) if wall > 0 else 0.0
    summary = {
        "images": images,
        "boxes": total_boxes,
        "boxes_per_image": total_boxes / images if images else 0.0,
        "errors": errors,
        "this_run": {"images": counts["images"], "errors": counts["errors"], "wall_s": round(wall, 2),
                     "images_per_s": rate},
        "wall_s": round(wall, 2),
        "images_per_s": rate,
        "config": config_to_dict(cfg),
    }
    if cfg.gt_boxes and images:
        from dap_ray.evaluation.localisation import load_coco_boxes, localisation_quality

        truth, _ = load_coco_boxes(cfg.gt_boxes)
        try:
            summary["quality"] = localisation_quality(read_boxes_of(output / "boxes", truth), truth)
        except ValueError as exc:
            print(f"warning: no quality figures: {exc}", file=sys.stderr)
    return summary
