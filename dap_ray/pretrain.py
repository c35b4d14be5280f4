"""Step 3 on Ray Train: pre-train a whole detector on the mined pseudo boxes.

:func:`pretrain` runs a ``TorchTrainer`` (Ray Train V2) with W DDP workers. Every worker
reads the mining run's ``boxes/*.parquet`` and the images they name (so both must be
reachable from every node, as for Step 1), and draws its own stream of aspect-grouped,
multi-scale, flipped batches (:class:`dap_ray.detection.AspectBatchSampler`) through a
DataLoader. Training counts iterations, as the paper's does. Every ``checkpoint_every``
iterations a checkpoint (model, optimiser, schedule, iteration, every rank's torch RNG
state, loss history) is reported to Ray Train; running the same command again resumes
from the last one, and ``FailureConfig`` restarts a failed worker group from it. The
result is ``RUN_DIR/detector_final.pt``, a plain torchvision state dict
(:func:`dap_ray.detection.detector_state_dict`), and ``RUN_DIR/meta.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from dap_ray.config import config_to_dict, save_config
from dap_ray.detection import (AspectBatchSampler, PseudoBoxDataset, PseudoBoxes, build_detector, collate_detection,
                               detector_state_dict, load_pseudo_boxes)
from dap_ray.models import unwrap_ddp
from dap_ray.ray_setup import cpus_per_worker, fit_torch_trainer, init_ray, train_worker_rank

__all__ = ["SAMPLE_MIN_SIZES", "PretrainConfig", "detector_for", "embedded_default", "make_optimizer", "prepare_data",
           "pretrain", "train_step", "training_loader"]

_STATE_FILE = "state.pt"
# The sample's images are about a third of ImageNet's, as SAMPLE_SCALES are a third of (288, 576).
SAMPLE_MIN_SIZES = (32, 64, 96, 192)


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
_SAMPLE_RUN = dict(max_iters=100, warmup_iters=25, batch_size=4, num_workers=2, lr=0.01, checkpoint_every=25,
                   roi_batch_size_per_image=128, loader_workers=0, min_sizes=SAMPLE_MIN_SIZES, max_size=320)


def embedded_default(cfg: PretrainConfig, cache: str | Path | None = None) -> PretrainConfig:
    """``cfg`` pointed at the built-in sample's pseudo boxes (mined on first use) and its classifier.

    Options the user left at the paper's defaults become a small run that takes minutes
    on 2 CPU cores (:data:`_SAMPLE_RUN`); options the user set are kept.
    """
    from dap_ray.mining import MineConfig
    from dap_ray.pipeline import mine, sample_cache

    cache = sample_cache(cache)
    mined = cache / "mined"
    if not (mined / "summary.json").is_file():
        print(f"first run: mining the built-in sample into {mined} (a few minutes the first time)", flush=True)
        mine(MineConfig(output=str(mined)))
    meta = json.loads((cache / "classifier" / "meta.json").read_text())
    defaults = PretrainConfig()
    small = {k: v for k, v in _SAMPLE_RUN.items() if getattr(cfg, k) == getattr(defaults, k)}
    if cfg.backbone == defaults.backbone and cfg.backbone_weights is None:
        small.update(backbone=meta["arch"], backbone_weights=str(cache / "classifier" / "classifier.pt"))
    print(f"pre-training on the built-in sample's pseudo boxes ({mined / 'boxes'})", flush=True)
    return dataclasses.replace(cfg, boxes=str(mined / "boxes"), **small)


def prepare_data(cfg: PretrainConfig) -> tuple[PretrainConfig, PseudoBoxes, list[str]]:
    """``cfg`` with input, format, image column and class map filled from the mining run and
    paths made absolute; the pseudo boxes; one name per class (``class_k`` past the class map).

    Raises ValueError for missing files, too few images for the workers, or labels beyond the class map.
    """
    from dap_ray.data import read_class_map
    from dap_ray.export import read_run_config

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


def _lr_factor(cfg: PretrainConfig, iteration: int) -> float:
    """Linear warm-up from ``warmup_factor``, then 10x drops at ``lr_steps``."""
    factor = 0.1 ** sum(iteration >= int(s * cfg.max_iters) for s in cfg.lr_steps)
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def detector_for(cfg: PretrainConfig, num_classes: int) -> torch.nn.Module:
    """:func:`dap_ray.detection.build_detector` with ``cfg``'s detector, trunk and sizes."""
    return build_detector(cfg.detector, cfg.backbone, num_classes, backbone_weights=cfg.backbone_weights,
                          trainable_layers=cfg.trainable_layers, min_size=cfg.min_sizes, max_size=cfg.max_size,
                          roi_batch_size_per_image=cfg.roi_batch_size_per_image)


def training_loader(cfg: PretrainConfig, pseudo: PseudoBoxes, rank: int = 0, world: int = 1,
                    start: int = 0) -> torch.utils.data.DataLoader:
    """This rank's endless DataLoader of batches from batch ``start`` on (see AspectBatchSampler)."""
    from dap_ray.sources import ImageReader

    sampler = AspectBatchSampler(pseudo.sizes, cfg.batch_size, cfg.min_sizes, rank=rank, world=world, seed=cfg.seed,
                                 start=start, flip=cfg.flip)
    reader = ImageReader(cfg.input, cfg.format, cfg.image_column or "image")
    return torch.utils.data.DataLoader(PseudoBoxDataset(pseudo, reader, cfg.max_size), batch_sampler=sampler,
                      collate_fn=collate_detection, num_workers=cfg.loader_workers,
                      persistent_workers=cfg.loader_workers > 0)


def make_optimizer(cfg: PretrainConfig, model: torch.nn.Module):
    """SGD over the trainable parameters, and the warm-up and step schedule (stepped per iteration)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.learning_rate(), momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: _lr_factor(cfg, i))


def train_step(model: torch.nn.Module, batch: list[dict], optimizer, scheduler, device: torch.device) -> dict[str, float]:
    """One iteration on a batch from :class:`dap_ray.detection.PseudoBoxDataset`; the loss parts as floats.

    A non-finite loss is returned, not stepped on. bf16 autocast on CUDA.
    """
    detector = unwrap_ddp(model)
    images = [s["image"].to(device, non_blocking=True).float().div_(255) for s in batch]
    targets = [{"boxes": s["boxes"].to(device), "labels": s["labels"].to(device)} for s in batch]
    # The loader resized the batch to one short side; the model's own resize becomes a no-op.
    detector.transform.min_size = (min(batch[0]["image"].shape[1:]),)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        losses = model(images, targets)
    loss = sum(losses.values())
    parts = {k: float(v.detach()) for k, v in losses.items()}
    if not torch.isfinite(loss):
        return parts
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return parts


def _train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg = PretrainConfig(**loop_config["config"])
    rank, world = train_worker_rank(cfg.use_gpu, cfg.cpus_per_worker)
    device = ray.train.torch.get_device()

    pseudo = load_pseudo_boxes(cfg.boxes, cfg.max_boxes_per_image)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = ray.train.torch.prepare_model(detector_for(cfg, loop_config["num_classes"]))
    detector = unwrap_ddp(model)
    optimizer, scheduler = make_optimizer(cfg, model)

    start, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(os.path.join(directory, _STATE_FILE), map_location="cpu", weights_only=True)
        detector.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, history = state["iteration"], state["history"]
        if rank < len(state["rng"]):
            torch.set_rng_state(state["rng"][rank])
        if rank == 0:
            print(f"resuming at iteration {start}/{cfg.max_iters} from the last checkpoint", flush=True)
    else:
        torch.manual_seed(cfg.seed + 1 + rank)  # proposal sampling differs between ranks

    loader = training_loader(cfg, pseudo, rank, world, start)
    model.train()
    window: dict[str, float] = {}
    window_images, window_iters = 0, 0
    window_start = last_print = time.perf_counter()
    batches = iter(loader)
    for iteration in range(start, cfg.max_iters):
        batch = next(batches)
        losses = train_step(model, batch, optimizer, scheduler, device)
        loss = sum(losses.values())
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at iteration {iteration} (rank {rank}): {losses}")
        for key, value in losses.items():
            window[key] = window.get(key, 0.0) + value
        window["loss"] = window.get("loss", 0.0) + loss
        window_images += len(batch)
        window_iters += 1
        done = iteration + 1
        now = time.perf_counter()
        is_checkpoint = done % cfg.checkpoint_every == 0 or done == cfg.max_iters
        if rank == 0 and (now - last_print >= cfg.log_every_s or is_checkpoint):
            parts = " ".join(f"{k} {v / window_iters:.4f}" for k, v in window.items() if k != "loss")
            print(f"iter {done}/{cfg.max_iters} loss {window['loss'] / window_iters:.4f} ({parts}) "
                  f"lr {scheduler.get_last_lr()[0]:.5f} {window_images * world / (now - window_start):.1f} images/s",
                  flush=True)
            last_print = now
        if not is_checkpoint:
            continue
        metrics = {k: v / window_iters for k, v in window.items()}
        metrics.update(iteration=done, lr=scheduler.get_last_lr()[0],
                       images_per_s=window_images * world / (now - window_start))
        history.append(metrics)
        rng_states = [torch.get_rng_state()]
        if world > 1:
            rng_states = [None] * world
            dist.all_gather_object(rng_states, torch.get_rng_state())
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if rank == 0:
                torch.save({"model": detector_state_dict(detector), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "iteration": done, "rng": rng_states,
                            "history": history}, os.path.join(directory, _STATE_FILE))
                saved = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=saved)
        window, window_images, window_iters = {}, 0, 0
        window_start = time.perf_counter()


def pretrain(cfg: PretrainConfig) -> dict:
    """Run Step 3 and return the meta written to ``cfg.output/meta.json``."""
    if cfg.boxes is None:
        cfg = embedded_default(cfg)
    cfg, pseudo, classes = prepare_data(cfg)
    num_classes = len(classes)
    if cfg.backbone_weights is None:
        print("warning: no --backbone-weights: the backbone starts at random (DAP starts from the Step 1 classifier)",
              flush=True)
    output = Path(cfg.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    if cfg.backend == "detectron2":
        from dap_ray.detectron2_backend import train_detectron2

        return train_detectron2(cfg, pseudo, classes, output)

    init_ray()
    resolved = dataclasses.replace(cfg, cpus_per_worker=cpus_per_worker(cfg.cpus_per_worker, cfg.use_gpu, cfg.num_workers),
                                   lr=cfg.learning_rate())
    save_config(resolved, output / "config.yaml")
    print(f"pre-training {cfg.detector} ({cfg.backbone}) on {len(pseudo)} images, {len(pseudo.boxes)} pseudo boxes, "
          f"{num_classes} classes; {pseudo.skipped_without_boxes} images without boxes skipped; "
          f"{cfg.num_workers} worker(s) x batch {cfg.batch_size}, {cfg.max_iters} iterations", flush=True)
    state = fit_torch_trainer(
        _train_loop, {"config": config_to_dict(resolved), "num_classes": num_classes},
        name="pretrain", storage=Path(cfg.storage_path).resolve() if cfg.storage_path else output / "ray",
        num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, cpus=resolved.cpus_per_worker,
        max_failures=cfg.max_failures, state_file=_STATE_FILE)
    torch.save(state["model"], output / "detector_final.pt")
    history = state["history"]
    meta = {
        "backend": "torchvision",
        "detector": cfg.detector,
        "backbone": cfg.backbone,
        "backbone_weights": cfg.backbone_weights,
        "num_classes": num_classes + 1,
        "classes": ["__background__"] + classes,
        "iterations": state["iteration"],
        "images": len(pseudo),
        "pseudo_boxes": int(len(pseudo.boxes)),
        "skipped_without_boxes": pseudo.skipped_without_boxes,
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "history": history,
        "load_with": _load_hint(cfg, num_classes + 1),
        "config": config_to_dict(resolved),
    }
    (output / "meta.json").write_text(json.dumps(meta, indent=2))
    if history and not math.isnan(history[-1]["loss"]):
        print(f"wrote {output / 'detector_final.pt'} after {meta['iterations']} iterations: "
              f"loss {meta['first_loss']:.4f} -> {meta['last_loss']:.4f}", flush=True)
    return meta


def _load_hint(cfg: PretrainConfig, num_classes: int) -> str:
    builder = {"faster_rcnn_fpn": "fasterrcnn_resnet50_fpn", "retinanet_fpn": "retinanet_resnet50_fpn"}[cfg.detector]
    if cfg.backbone == "resnet50":
        return (f"torchvision.models.detection.{builder}(weights=None, weights_backbone=None, "
                f"num_classes={num_classes}).load_state_dict(torch.load('detector_final.pt'))")
    return (f"dap_ray.detection.build_detector({cfg.detector!r}, {cfg.backbone!r}, {num_classes - 1})"
            ".load_state_dict(torch.load('detector_final.pt'))")
