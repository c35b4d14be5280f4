"""Step 3's configuration and inputs, shared by both backends (torchvision and detectron2)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from dap_ray.data.pseudo_boxes import PseudoBoxes

__all__ = ["PretrainConfig", "prepare_data"]


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
    detector: Literal["faster_rcnn_fpn", "retinanet_fpn"] = field(default="faster_rcnn_fpn", metadata={
        "help": "torchvision Faster R-CNN with FPN, or RetinaNet"})
    backbone: str = field(default="resnet50", metadata={"help": "torchvision ResNet name or package.module:factory"})
    backbone_weights: str | None = field(default=None, metadata={
        "help": "Step 1 classifier state dict for the trunk (default: the trunk starts at random, with a warning)"})
    backend: Literal["torchvision", "detectron2"] = field(default="torchvision", metadata={
        "help": "torchvision (built in), or detectron2 (if installed; writes a detectron2 checkpoint)"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (DDP processes)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker, bf16 autocast"})
    cpus_per_worker: int | None = field(default=None, metadata={
        "help": "CPUs per worker (default: this node's CPUs shared among the workers, CPU runs only)"})
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
    max_failures: int = field(default=2, metadata={"help": "worker-group restarts from the last checkpoint"})
    storage_path: str | None = field(default=None, metadata={
        "help": "where Ray Train keeps checkpoints (default OUTPUT/ray; use shared storage on a cluster)"})
    seed: int = field(default=0, metadata={"help": "initialisation and data-order seed"})

    def __post_init__(self) -> None:
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


def prepare_data(cfg: PretrainConfig) -> tuple[PretrainConfig, PseudoBoxes, list[str]]:
    """``cfg`` with input, format, image column and class map filled from the mining run and
    paths made absolute; the pseudo boxes; one name per class (``class_k`` past the class map).

    Raises ValueError for missing files, too few images for the workers, or labels beyond the class map.
    """
    from dap_ray.data.export import read_run_config
    from dap_ray.data.images import read_class_map
    from dap_ray.data.pseudo_boxes import load_pseudo_boxes

    boxes = Path(cfg.boxes).resolve()
    if not boxes.is_dir():
        raise ValueError(f"--boxes {boxes} is not a folder (expected the boxes/ folder of a mining run)")
    run = read_run_config(boxes) if cfg.input is None or cfg.format is None else {}
    input_path = cfg.input or run.get("input")
    if not input_path:
        raise ValueError(f"no --input given and {boxes.parent / 'config.yaml'} names none")
    class_map = cfg.class_map or run.get("class_map")
    cfg = dataclasses.replace(
        cfg, boxes=str(boxes), input=str(Path(input_path).resolve()), format=cfg.format or run.get("format", "folder"),
        image_column=cfg.image_column or run.get("image_column", "image"),
        class_map=str(Path(class_map).resolve()) if class_map else None,
        backbone_weights=str(Path(cfg.backbone_weights).resolve()) if cfg.backbone_weights else None)
    if cfg.backbone_weights and not Path(cfg.backbone_weights).is_file():
        raise ValueError(f"backbone weights not found: {cfg.backbone_weights}")
    if not Path(cfg.input).exists():
        raise ValueError(f"input not found: {cfg.input}")
    classes = read_class_map(cfg.class_map) if cfg.class_map else []
    pseudo = load_pseudo_boxes(cfg.boxes, cfg.max_boxes_per_image)
    if len(pseudo) < cfg.num_workers:
        raise ValueError(f"{cfg.boxes} holds {len(pseudo)} images with boxes; {cfg.num_workers} workers need more")
    num_classes = max(len(classes), int(pseudo.labels.max()) + 1)
    if classes and num_classes > len(classes):
        raise ValueError(f"labels go up to {num_classes - 1} but the class map {cfg.class_map} has {len(classes)} classes")
    return cfg, pseudo, classes or [f"class_{k}" for k in range(num_classes)]
