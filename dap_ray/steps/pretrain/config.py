"""Step 3's configuration and inputs, shared by both backends (torchvision and detectron2)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

from dap_ray.steps.ray_setup import DEVICE_HELP, check_device
from dap_ray.tracking import MLFLOW_URI_HELP

if TYPE_CHECKING:
    from dap_ray.data.pseudo_boxes import PseudoBoxes

__all__ = ["PretrainConfig", "build_training_cache", "prepare_data"]


@dataclass(frozen=True)
class PretrainConfig:
    """Detector pre-training. Defaults are the paper's (Faster R-CNN R50-FPN, sizes 96..640,
    SGD with the authors' lr 0.008 per 64 images, 2,000 warm-up iterations); with no
    ``boxes`` the built-in sample runs with a small detector instead."""

    boxes: str | None = field(default=None, metadata={
        "help": "boxes/ folder of a mining run (default: the built-in sample, mined on first use)"})
    input: str | None = field(default=None, metadata={
        "help": "the images that were mined (default: the input named in the mining run's config.yaml)"})
    format: Literal["folder", "tar", "parquet"] | None = field(default=None, metadata={
        "help": "format of --input (default: the mining run's)"})
    image_column: str | None = field(default=None, metadata={"help": "parquet: image column (default: the mining run's)"})
    class_map: str | None = field(default=None, metadata={
        "help": "class names, one per line (default: the mining run's; else classes from the labels)"})
    output: str = field(default="pretrain_run", metadata={"help": "run folder for detector_final.pt, meta.json, checkpoints"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "where the pseudo boxes' training cache and the input's index go, built once and shared by every run "
                "on these boxes (default: beside --boxes, in the mining run's folder; under --output if that is "
                "read-only)"})
    detector: Literal["faster_rcnn_fpn", "retinanet_fpn"] = field(default="faster_rcnn_fpn", metadata={
        "help": "torchvision Faster R-CNN with FPN, or RetinaNet"})
    backbone: str = field(default="resnet50", metadata={"help": "torchvision ResNet name or package.module:factory"})
    backbone_weights: str | None = field(default=None, metadata={
        "help": "Step 1 classifier state dict for the trunk (default: the trunk starts at random, with a warning)"})
    backend: Literal["torchvision", "detectron2"] = field(default="torchvision", metadata={
        "help": "torchvision (built in), or detectron2 (if installed; writes a detectron2 checkpoint)"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (DDP processes)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker, bf16 autocast"})
    device: Literal["auto", "cuda", "cpu"] = field(default="auto", metadata={"help": DEVICE_HELP})
    cpus_per_worker: int | None = field(default=None, metadata={
        "help": "CPUs reserved per worker (default: CPU runs share this node's CPUs among the workers; GPU runs "
                "take one plus one per loader process, to decode with)"})
    loader_workers: int = field(default=2, metadata={"help": "DataLoader processes per worker (decode and resize)"})
    batch_size: int = field(default=2, metadata={"help": "images per worker per iteration (the paper: 32 in all)"})
    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate (default: 0.008 x global batch / 64, the authors' rate)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay (the paper: 1e-5 on ImageNet-14M)"})
    bias_lr_factor: float = field(default=2.0, metadata={
        "help": "biases' learning rate over the weights' (2: maskrcnn-benchmark's rule, which the authors trained with)"})
    bias_weight_decay: float = field(default=0.0, metadata={"help": "biases' weight decay (maskrcnn-benchmark: 0)"})
    max_iters: int = field(default=40038, metadata={"help": "iterations (the paper: 40,038 on ImageNet-1M at batch 32)"})
    warmup_iters: int = field(default=2000, metadata={"help": "linear warm-up iterations"})
    warmup_factor: float = field(default=0.01, metadata={"help": "learning-rate factor at the first iteration"})
    lr_steps: tuple[float, ...] = field(default=(0.667, 0.889), metadata={
        "help": "fractions of max-iters where the rate drops 10x (detectron2's 1x schedule shape)"})
    min_sizes: tuple[int, ...] = field(default=(96, 160, 320, 640), metadata={
        "help": "short sides, one drawn per batch; the last is the test size"})
    max_size: int = field(default=1333, metadata={"help": "longest side after resizing"})
    flip: bool = field(default=True, metadata={"help": "random horizontal flips"})
    max_boxes_per_image: int | None = field(default=None, metadata={"help": "keep the best-scored M pseudo boxes per image"})
    trainable_layers: int = field(default=3, metadata={"help": "ResNet stages trained from layer4 down (3: stem and layer1 frozen)"})
    roi_batch_size_per_image: int = field(default=512, metadata={"help": "Faster R-CNN proposals sampled per image"})
    checkpoint_every: int = field(default=2000, metadata={"help": "iterations between checkpoints"})
    log_every_s: float = field(default=20.0, metadata={"help": "seconds between progress lines"})
    mlflow_uri: str | None = field(default=None, metadata={"help": MLFLOW_URI_HELP})
    max_failures: int = field(default=2, metadata={"help": "worker-group restarts from the last checkpoint"})
    storage_path: str | None = field(default=None, metadata={
        "help": "where Ray Train keeps checkpoints (default OUTPUT/ray; use shared storage on a cluster)"})
    seed: int = field(default=0, metadata={"help": "initialisation and data-order seed"})

    def __post_init__(self) -> None:
        check_device(self.device, self.use_gpu, "--use-gpu")
        for name in ("num_workers", "batch_size", "max_iters", "checkpoint_every", "max_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_iters < 0 or not 0 < self.warmup_factor <= 1:
            raise ValueError(f"warmup_iters must be >= 0 and warmup_factor in (0, 1], got {self.warmup_iters}, "
                             f"{self.warmup_factor}")
        if not self.min_sizes or min(self.min_sizes) < 1:
            raise ValueError(f"min_sizes must be positive, got {self.min_sizes}")
        if any(not 0 < s < 1 for s in self.lr_steps):
            raise ValueError(f"lr_steps are fractions of max_iters in (0, 1), got {self.lr_steps}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.max_boxes_per_image is not None and self.max_boxes_per_image < 1:
            raise ValueError(f"max_boxes_per_image must be at least 1, got {self.max_boxes_per_image}")
        if self.backend not in ("torchvision", "detectron2"):
            raise ValueError(f"backend must be 'torchvision' or 'detectron2', got {self.backend!r}")
        if self.detector not in ("faster_rcnn_fpn", "retinanet_fpn"):
            raise ValueError(f"detector must be 'faster_rcnn_fpn' or 'retinanet_fpn', got {self.detector!r}")

    def global_batch(self) -> int:
        return self.batch_size * self.num_workers

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 0.008 * self.global_batch() / 64


# The embedded default's small run: applied to options still at the paper's default.


def prepare_data(cfg: PretrainConfig, build: Callable | None = None) -> tuple[PretrainConfig, PseudoBoxes, list[str]]:
    """``cfg`` with input, format, image column, class map and cache folder filled from the mining
    run and paths made absolute; the pseudo boxes (memory-mapped); one name per class
    (``class_k`` past the class map).

    The pseudo boxes' cache and the input's index (:func:`build_training_cache`) are built
    when missing, by ``build(build_training_cache, *args)`` when given (the step runs it in
    a Ray task, so that the driver never holds the boxes) and in this process otherwise.
    Raises ValueError for missing files, too few images for the workers, or labels beyond the class map.
    """
    from dap_ray.data.export import read_run_config
    from dap_ray.data.images import read_class_map
    from dap_ray.data.pseudo_boxes import box_cache_folder, open_box_cache

    boxes = Path(cfg.boxes).resolve()
    if not boxes.is_dir():
        raise ValueError(f"--boxes {boxes} is not a folder (expected the boxes/ folder of a mining run)")
    run = read_run_config(boxes) if cfg.input is None or cfg.format is None else {}
    input_path = cfg.input or run.get("input")
    if not input_path:
        raise ValueError(f"no --input given and {boxes.parent / 'config.yaml'} names none")
    class_map = cfg.class_map or run.get("class_map")
    cache_dir = cfg.cache_dir or (str(boxes.parent) if os.access(boxes.parent, os.W_OK) else cfg.output)
    cfg = dataclasses.replace(
        cfg, boxes=str(boxes), input=str(Path(input_path).resolve()), format=cfg.format or run.get("format", "folder"),
        image_column=cfg.image_column or run.get("image_column", "image"),
        class_map=str(Path(class_map).resolve()) if class_map else None, cache_dir=str(Path(cache_dir).resolve()),
        backbone_weights=str(Path(cfg.backbone_weights).resolve()) if cfg.backbone_weights else None)
    if cfg.backbone_weights and not Path(cfg.backbone_weights).is_file():
        raise ValueError(f"backbone weights not found: {cfg.backbone_weights}")
    if not Path(cfg.input).exists():
        raise ValueError(f"input not found: {cfg.input}")
    classes = read_class_map(cfg.class_map) if cfg.class_map else []
    folder = box_cache_folder(cfg.boxes, cfg.cache_dir)
    if not (folder / "meta.json").is_file() or not _index_is_current(folder, cfg):
        args = (cfg.boxes, str(folder), cfg.input, cfg.format, cfg.image_column)
        summary = build(build_training_cache, *args) if build is not None else build_training_cache(*args)
        print(summary, flush=True)
    pseudo = open_box_cache(str(folder), cfg.max_boxes_per_image)
    _report_index(pseudo, cfg)
    if len(pseudo) < cfg.num_workers:
        raise ValueError(f"{cfg.boxes} holds {len(pseudo)} images with boxes; {cfg.num_workers} workers need more")
    num_classes = max(len(classes), pseudo.max_label + 1)
    if classes and num_classes > len(classes):
        raise ValueError(f"labels go up to {num_classes - 1} but the class map {cfg.class_map} has {len(classes)} classes")
    return cfg, pseudo, classes or [f"class_{k}" for k in range(num_classes)]


def _index_is_current(folder: Path, cfg: PretrainConfig) -> bool:
    """Whether the input's index exists and no indexed file changed since (one ``stat`` a file)."""
    from dap_ray.data.locations import changed_files, load_locations, locations_folder
    from dap_ray.data.pseudo_boxes import open_box_cache

    located = locations_folder(folder, cfg.input, cfg.format, cfg.image_column)
    if located is None:
        return True
    if not (located / "meta.json").is_file():
        return False
    changed = changed_files(load_locations(open_box_cache(str(folder)), cfg.input, cfg.format, cfg.image_column))
    if changed:
        print(f"{len(changed)} input file(s) changed since they were indexed, or could not be read then (such as "
              f"{changed[0]}): indexing again", flush=True)
    return not changed


def _report_index(pseudo, cfg: PretrainConfig) -> None:
    """Say, on every run, what the input's index could not find; refuse a run that can read nothing."""
    from dap_ray.data.locations import load_locations

    locations = load_locations(pseudo, cfg.input, cfg.format, cfg.image_column)
    if locations.missing == len(pseudo) and len(pseudo):
        raise ValueError(f"none of the {len(pseudo)} images with pseudo boxes was found in {cfg.input} "
                         f"(--format {cfg.format}): " + "; ".join(locations.problems[:3] or ["their ids name "
                                                                                             "other files"]))
    if locations.missing or locations.problems:
        print(f"warning: {locations.missing} of {len(pseudo)} images were not found in {cfg.input} and are "
              "skipped" + "".join(f"; {p}" for p in locations.problems[:3]), flush=True)


def build_training_cache(boxes: str, folder: str, input_path: str, fmt: str, image_column: str,
                         map_fn: Callable | None = None) -> str:
    """Build what pre-training reads: the pseudo boxes' cache in ``folder`` and the index of their
    images in ``input_path``; return a line saying what was built and how long it took.
    ``map_fn`` spreads the input files' indexing (default: Ray tasks when Ray is up, else ``map``)."""
    import time

    from dap_ray.data.locations import load_locations
    from dap_ray.data.pseudo_boxes import build_box_cache, open_box_cache

    started = time.perf_counter()
    if not (Path(folder) / "meta.json").is_file():
        build_box_cache(boxes, folder)
    boxes_s = time.perf_counter() - started
    if map_fn is None:
        map_fn = _default_map()
    pseudo = open_box_cache(folder)
    locations = load_locations(pseudo, input_path, fmt, image_column, map_fn=map_fn, check_files=True)
    if fmt == "folder":
        return f"pseudo boxes of {len(pseudo)} images cached in {folder} ({boxes_s:.1f} s); images read by path"
    return (f"pseudo boxes of {len(pseudo)} images cached in {folder} ({boxes_s:.1f} s); input indexed "
            f"({len(locations.files)} files, {time.perf_counter() - started - boxes_s:.1f} s)")


def _default_map() -> Callable:
    try:
        import ray
    except ImportError:
        return map
    if not ray.is_initialized():
        return map
    from dap_ray.steps.ray_setup import map_on_ray

    return map_on_ray
