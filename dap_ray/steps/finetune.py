"""Step 4 on Ray Train: fine-tune a detector on a downstream set, from DAP, CLS or no pre-training.

:func:`finetune` loads a COCO JSON or Pascal VOC set (:mod:`dap_ray.data.downstream`),
optionally draws K images per class for each seed (:func:`dap_ray.data.fewshot.sample_k_shot`),
and runs one ``TorchTrainer`` (Ray Train V2, DDP) per seed. The detector is built exactly as
in Step 3 (frozen BatchNorm, stem and ``layer1`` frozen) and initialised by
:func:`dap_ray.models.detectors.initialise`: ``dap:RUN`` (the whole pre-trained detector but
its class-dependent layers), ``cls:SOURCE`` (the classifier's trunk only) or ``scratch``, so
that runs differ in their initialisation alone. Every ``eval_every`` iterations and at the
end the workers share out the test images, gather the detections, and rank 0 scores them
(:func:`dap_ray.evaluation.detection.evaluate_detections`: COCO AP and VOC AP50); the
evaluations travel in the checkpoints, so that a resumed run's ``metrics.jsonl`` is whole.

Outputs per run (``OUTPUT``, or ``OUTPUT/seed_S`` for several seeds): ``detector_final.pt``
(a torchvision state dict), ``metrics.json`` (the final evaluation), ``metrics.jsonl`` (one
evaluation per line), ``detections.json`` (COCO results format), ``learning_curve.png``,
``init_report.json``, ``kshot_images.json`` (the images a k-shot run drew), ``meta.json``
and ``config.yaml``; with several seeds, ``OUTPUT/summary.json`` (mean and standard
deviation over seeds) and ``OUTPUT/learning_curves.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from dap_ray.config import config_to_dict, save_config
from dap_ray.data.detection import AspectBatchSampler, collate_detection
from dap_ray.data.downstream import DetectionDataset, DetectionSet, load_coco, load_voc
from dap_ray.data.fewshot import sample_k_shot
from dap_ray.evaluation.detection import (
    HEADLINE_METRICS,
    detections_to_coco_results,
    evaluate_detections,
    json_safe,
)
from dap_ray.models.detectors import (
    DETECTORS,
    build_detector,
    initialise,
    parse_init,
    read_detector_run,
)
from dap_ray.models.training import detect, detector_optimizer, lr_factor, step_iterations
from dap_ray.runs import check_same_settings, open_run
from dap_ray.steps.detector_loop import STATE_FILE, restore, train_iterations
from dap_ray.steps.ray_setup import (
    DEVICE_HELP,
    check_device,
    cpus_per_worker,
    fit_torch_trainer,
    has_checkpoint,
    init_ray,
    run_storage,
    train_device,
    train_worker_rank,
)
from dap_ray.tracking import MLFLOW_URI_HELP, check_tracking, log_step

__all__ = ["HEADLINE_METRICS", "PRESETS", "FinetuneConfig", "build_model", "finetune", "load_split", "make_optimizer",
           "resolve_architecture", "resolve_schedule", "training_loader"]



@dataclass(frozen=True)
class Preset:
    """The authors' fine-tuning settings (maskrcnn-benchmark configs), at a total batch of 16.

    ``epochs`` or ``iterations`` give the full-data length; ``steps`` are fractions of it
    where the rate drops 10x; ``kshot_images``: images seen (iterations x 16) for K images per
    class, our starting points (the paper tuned them and does not give them: search them
    with Ray Tune).
    """

    lr: float
    min_sizes: tuple[int, ...]
    max_size: int
    steps: tuple[float, ...]
    epochs: float | None = None
    iterations: int | None = None
    kshot_images: tuple[tuple[int, int], ...] = ()


PRESETS = {
    # VOC: 14 epochs, lr 0.01 then 0.001 from epoch 10, short side 640, long side at most 1066.
    "voc": Preset(lr=0.01, min_sizes=(640,), max_size=1066, steps=(10 / 14,), epochs=14,
                  kshot_images=((5, 800 * 16), (10, 1200 * 16), (20, 1600 * 16), (50, 2400 * 16), (100, 3200 * 16))),
    # COCO 1x: 90K iterations, lr 0.02, x0.1 at 60K and 80K, short side 800, long side at most 1333.
    "coco": Preset(lr=0.02, min_sizes=(800,), max_size=1333, steps=(60 / 90, 80 / 90), iterations=90000,
                   kshot_images=((5, 2000 * 16), (10, 3000 * 16), (20, 4000 * 16), (50, 6000 * 16),
                                 (100, 8000 * 16))),
}


@dataclass(frozen=True)
class FinetuneConfig:
    """Downstream fine-tuning. Defaults are the paper's (its presets for VOC and COCO); with no
    ``train`` the built-in downstream sample runs from the sample's DAP pre-training."""

    train: str | None = field(default=None, metadata={
        "help": "training set: a COCO annotation file, or a VOCdevkit folder (default: the built-in downstream "
                "sample, fine-tuned from the sample's DAP pre-training)"})
    test: str | None = field(default=None, metadata={
        "help": "test set: a COCO annotation file, or a VOCdevkit folder (VOC default: --train's, --test-splits)"})
    format: Literal["coco", "voc"] = field(default="coco", metadata={"help": "coco: annotation JSON; voc: VOCdevkit"})
    train_images: str | None = field(default=None, metadata={
        "help": "COCO: folder the training file names are relative to (default: the annotation file's folder)"})
    test_images: str | None = field(default=None, metadata={
        "help": "COCO: folder the test file names are relative to (default: the annotation file's folder)"})
    train_splits: tuple[str, ...] = field(default=("2007:trainval",), metadata={
        "help": "VOC: YEAR:SPLIT lists to train on (the paper's 07+12: 2007:trainval 2012:trainval)"})
    test_splits: tuple[str, ...] = field(default=("2007:test",), metadata={"help": "VOC: YEAR:SPLIT lists to test on"})
    output: str = field(default="finetune_run", metadata={"help": "run folder"})
    init: str | None = field(default=None, metadata={
        "help": "dap:RUN_DIR (a Step 3 detector: all but its class-dependent layers), cls:FILE_OR_TORCHVISION_NAME "
                "(a classifier's trunk only), or scratch"})
    detector: Literal["faster_rcnn_fpn", "retinanet_fpn"] | None = field(default=None, metadata={
        "help": "detector (default: the DAP run's; faster_rcnn_fpn otherwise)"})
    backbone: str | None = field(default=None, metadata={
        "help": "ResNet trunk (default: the DAP run's; resnet50 otherwise)"})
    preset: Literal["voc", "coco"] | None = field(default=None, metadata={
        "help": "the paper's settings for VOC (14 epochs, lr 0.01, 640/1066) or COCO (90K iterations at batch 16, "
                "lr 0.02, 800/1333) (default: the --format's)"})
    shots: int | None = field(default=None, metadata={
        "help": "K: train on K images per class drawn at random (the paper's 5, 10, 20, 50, 100); default: all"})
    seeds: tuple[int, ...] = field(default=(0,), metadata={
        "help": "one run per seed (k-shot draw, data order, fresh layers); several give mean and std"})
    max_iters: int | None = field(default=None, metadata={
        "help": "iterations (default: the preset's length, or its k-shot table, scaled to the total batch)"})
    kshot_table: str | None = field(default=None, metadata={
        "help": "YAML of iterations and lr per K that jobs/tune_finetune.py chose (kshot_preset.yaml); "
                "used for --shots in place of the preset's table"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (default: the preset's x batch / 16)"})
    lr_steps: tuple[float, ...] | None = field(default=None, metadata={
        "help": "fractions of max-iters where the rate drops 10x (default: the preset's)"})
    warmup_iters: int | None = field(default=None, metadata={
        "help": "linear warm-up iterations (default: 500 at batch 16, scaled, at most a quarter of the run)"})
    warmup_factor: float = field(default=1 / 3, metadata={"help": "learning-rate factor at the first iteration"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay (the paper: 1e-5 for ImageNet-14M weights)"})
    bias_lr_factor: float = field(default=2.0, metadata={"help": "biases' learning rate over the weights'"})
    bias_weight_decay: float = field(default=0.0, metadata={"help": "biases' weight decay"})
    min_sizes: tuple[int, ...] | None = field(default=None, metadata={
        "help": "training short sides, one drawn per batch; the last is the test size (default: the preset's)"})
    max_size: int | None = field(default=None, metadata={"help": "longest side (default: the preset's)"})
    flip: bool = field(default=True, metadata={"help": "random horizontal flips"})
    train_on_difficult: bool = field(default=False, metadata={
        "help": "train on VOC's difficult boxes too (the authors' loader did not; evaluation ignores them)"})
    trainable_layers: int = field(default=3, metadata={"help": "ResNet stages trained from layer4 down (3: "
                                                               "stem and layer1 frozen, FREEZE_CONV_BODY_AT=2)"})
    roi_batch_size_per_image: int = field(default=512, metadata={"help": "Faster R-CNN proposals sampled per image"})
    test_proposals: int = field(default=1000, metadata={"help": "Faster R-CNN proposals per image at test time"})
    batch_size: int = field(default=2, metadata={"help": "images per worker per iteration (the paper: 16 in all)"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (DDP processes)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker, bf16 autocast"})
    device: Literal["auto", "cuda", "cpu"] = field(default="auto", metadata={"help": DEVICE_HELP})
    cpus_per_worker: int | None = field(default=None, metadata={
        "help": "CPUs reserved per worker (default: CPU runs share this node's CPUs among the workers; GPU runs "
                "take one plus one per loader process, to decode with)"})
    loader_workers: int = field(default=2, metadata={"help": "DataLoader processes per worker"})
    eval_every: int | None = field(default=None, metadata={
        "help": "iterations between evaluations on the test set (default: checkpoint-every); always at the end"})
    eval_batch_size: int = field(default=4, metadata={"help": "test images per worker per forward pass"})
    checkpoint_every: int = field(default=1000, metadata={"help": "iterations between checkpoints"})
    log_every_s: float = field(default=20.0, metadata={"help": "seconds between progress lines"})
    mlflow_uri: str | None = field(default=None, metadata={"help": MLFLOW_URI_HELP})
    max_failures: int = field(default=2, metadata={"help": "worker-group restarts from the last checkpoint"})
    storage_path: str | None = field(default=None, metadata={
        "help": "where Ray Train keeps checkpoints (default RUN_DIR/ray; use shared storage on a cluster)"})

    def __post_init__(self) -> None:
        check_device(self.device, self.use_gpu, "--use-gpu")
        for name in ("batch_size", "num_workers", "checkpoint_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_iters", "eval_every", "max_size", "shots"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_iters is not None and self.warmup_iters < 0:
            raise ValueError(f"warmup_iters must be at least 0, got {self.warmup_iters}")
        if not 0 < self.warmup_factor <= 1:
            raise ValueError(f"warmup_factor must lie in (0, 1], got {self.warmup_factor}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.lr_steps is not None and any(not 0 < s < 1 for s in self.lr_steps):
            raise ValueError(f"lr_steps are fractions of max_iters in (0, 1), got {self.lr_steps}")
        if self.min_sizes is not None and (not self.min_sizes or min(self.min_sizes) < 1):
            raise ValueError(f"min_sizes must be positive, got {self.min_sizes}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        if self.init is not None:
            parse_init(self.init)
        if self.detector is not None and self.detector not in DETECTORS:
            raise ValueError(f"detector must be one of {DETECTORS}, got {self.detector!r}")
        for split in self.train_splits + self.test_splits:
            year, sep, name = split.partition(":")
            if not (sep and year and name):
                raise ValueError(f"VOC splits are YEAR:SPLIT (such as 2007:trainval), got {split!r}")

    def global_batch(self) -> int:
        return self.batch_size * self.num_workers


# Settings that change how the work is spread, not what is learnt: a rerun may change them.
OPERATIONAL = ("output", "use_gpu", "cpus_per_worker", "loader_workers", "checkpoint_every", "log_every_s",
               "max_failures", "storage_path", "eval_batch_size", "eval_every", "seeds", "mlflow_uri")


def load_split(cfg: FinetuneConfig, which: Literal["train", "test"]) -> DetectionSet:
    """The training or test set that ``cfg`` names, with what its loader skipped printed."""
    source = getattr(cfg, which)
    if source is None and which == "test" and cfg.format == "voc":
        source = cfg.train  # the same VOCdevkit, other splits
    if source is None:
        raise ValueError(f"no --{which} given" + (" (the COCO annotation file to evaluate on)" if which == "test" else ""))
    if cfg.format == "coco":
        images = getattr(cfg, f"{which}_images") or str(Path(source).parent)
        data = load_coco(source, images)
    else:
        splits = cfg.train_splits if which == "train" else cfg.test_splits
        data = load_voc(source, [tuple(s.split(":", 1)) for s in splits])
    skipped = data.report.get("skipped") or {}
    if skipped:
        print(f"warning: {which} set {source}: skipped {skipped}; e.g. "
              f"{[e for v in data.report.get('examples', {}).values() for e in v][:3]}", flush=True)
    if len(data) == 0:
        raise ValueError(f"the {which} set {source} holds no usable image ({data.report})")
    return data


def resolve_schedule(cfg: FinetuneConfig, train_images: int) -> FinetuneConfig:
    """``cfg`` with the preset's values in every schedule and size option left at None.

    Lengths and the learning rate follow the total batch B: iterations x B / 16 images seen
    and lr x B / 16 are the preset's (the linear scaling rule the authors used).
    """
    preset = PRESETS[cfg.preset or cfg.format]
    scale = cfg.global_batch() / 16
    max_iters, lr = cfg.max_iters, cfg.lr
    chosen = _kshot_choice(cfg)
    if chosen is not None:
        ratio = chosen["global_batch"] / cfg.global_batch()
        max_iters = max_iters or max(1, round(chosen["max_iters"] * ratio))
        lr = lr or chosen["lr"] / ratio
    if max_iters is None:
        if cfg.shots is not None and preset.kshot_images:
            table = dict(preset.kshot_images)
            nearest = min(table, key=lambda k: (abs(k - cfg.shots), k))
            seen = table[nearest] * cfg.shots / nearest
        elif preset.epochs is not None:
            seen = preset.epochs * train_images
        else:
            seen = preset.iterations * 16
        max_iters = max(1, math.ceil(seen / cfg.global_batch()))
    warmup = cfg.warmup_iters
    if warmup is None:
        warmup = min(round(500 / scale), max_iters // 4)
    return dataclasses.replace(
        cfg, max_iters=max_iters, lr=lr or preset.lr * scale,
        lr_steps=cfg.lr_steps if cfg.lr_steps is not None else preset.steps,
        warmup_iters=warmup, min_sizes=cfg.min_sizes or preset.min_sizes, max_size=cfg.max_size or preset.max_size,
        eval_every=cfg.eval_every or cfg.checkpoint_every, preset=cfg.preset or cfg.format)


def _kshot_choice(cfg: FinetuneConfig) -> dict | None:
    """The ``kshot_table``'s entry for ``cfg.shots`` (``max_iters``, ``lr``, ``global_batch``), or None."""
    if cfg.kshot_table is None or cfg.shots is None:
        return None
    import yaml

    path = Path(cfg.kshot_table)
    if not path.is_file():
        raise ValueError(f"--kshot-table {path} not found")
    table = yaml.safe_load(path.read_text()) or {}
    entry = (table.get("shots") or {}).get(cfg.shots)
    if entry is None:
        raise ValueError(f"--kshot-table {path} has no entry for K = {cfg.shots} (it has {sorted(table.get('shots') or {})})")
    if table.get("init") not in (None, cfg.init):
        print(f"warning: --kshot-table {path} was chosen for --init {table.get('init')}, this run is {cfg.init}",
              flush=True)
    return {"max_iters": int(entry["max_iters"]), "lr": float(entry["lr"]), "global_batch": int(table["global_batch"])}


def resolve_architecture(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` with detector and backbone filled in: the DAP run's, else Faster R-CNN on ResNet-50."""
    kind, source = parse_init(cfg.init or "scratch")
    if kind == "dap":
        meta, _ = read_detector_run(source)
        for name in ("detector", "backbone"):
            if getattr(cfg, name) not in (None, meta[name]):
                raise ValueError(f"--{name} {getattr(cfg, name)} differs from the DAP run's {meta[name]} ({source}); "
                                 f"leave --{name} out to take the run's")
        return dataclasses.replace(cfg, detector=meta["detector"], backbone=meta["backbone"],
                                   init=f"dap:{Path(source).resolve()}")
    if kind == "cls" and Path(source).is_file():
        cfg = dataclasses.replace(cfg, init=f"cls:{Path(source).resolve()}")
    return dataclasses.replace(cfg, detector=cfg.detector or "faster_rcnn_fpn", backbone=cfg.backbone or "resnet50")


def make_optimizer(cfg: FinetuneConfig, model: torch.nn.Module):
    """SGD (biases at ``bias_lr_factor`` x the rate) and the warm-up and step schedule, for a resolved ``cfg``."""
    optimizer = detector_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.bias_lr_factor,
                                   cfg.bias_weight_decay)
    steps = step_iterations(cfg.lr_steps, cfg.max_iters)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i, warmup_iters=cfg.warmup_iters, warmup_factor=cfg.warmup_factor, steps=steps))


def training_loader(cfg: FinetuneConfig, train: DetectionSet, seed: int, rank: int = 0, world: int = 1,
                    start: int = 0) -> torch.utils.data.DataLoader:
    """This rank's endless DataLoader of aspect-grouped batches from batch ``start`` on."""
    sampler = AspectBatchSampler(train.sizes, cfg.batch_size, cfg.min_sizes, rank=rank, world=world, seed=seed,
                                 start=start, flip=cfg.flip)
    return torch.utils.data.DataLoader(
        DetectionDataset(train, cfg.max_size, cfg.train_on_difficult), batch_sampler=sampler,
        collate_fn=collate_detection, num_workers=cfg.loader_workers, persistent_workers=cfg.loader_workers > 0)


def build_model(cfg: FinetuneConfig, num_classes: int) -> torch.nn.Module:
    """The detector ``cfg`` names, built as Step 3 built it, before its initialisation."""
    return build_detector(cfg.detector, cfg.backbone, num_classes, trainable_layers=cfg.trainable_layers,
                          min_size=cfg.min_sizes, max_size=cfg.max_size,
                          roi_batch_size_per_image=cfg.roi_batch_size_per_image, resize_in_training=False,
                          test_proposals=cfg.test_proposals)


class _TestImages(torch.utils.data.Dataset):
    """(position, (3, H, W) uint8 tensor or None) of a test set's images; unreadable ones give None."""

    def __init__(self, data: DetectionSet, positions: list[int]):
        self.data, self.positions = data, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        from dap_ray.data.images import BadImageError, decode_image

        position = self.positions[i]
        try:
            image = decode_image(Path(self.data.paths[position]).read_bytes())
        except (OSError, BadImageError) as exc:
            print(f"test image {self.data.paths[position]} cannot be read, it gets no detections: {exc}", flush=True)
            return position, None
        width, height = (int(v) for v in self.data.sizes[position])
        if image.shape[:2] != (height, width):  # e.g. an EXIF-rotated photo annotated as stored
            print(f"warning: test image {self.data.paths[position]} is {image.shape[1]}x{image.shape[0]} upright but "
                  f"annotated as {width}x{height}: its detections and boxes are in different frames", flush=True)
        return position, torch.from_numpy(image).permute(2, 0, 1)


def _evaluate(model, test: DetectionSet, cfg: FinetuneConfig, rank: int, world: int, device) -> tuple[dict, list]:
    """Detections of every test image (the ranks share them out) and, on rank 0, their metrics."""
    import torch.distributed as dist

    positions = list(range(rank, len(test), world))
    loader = torch.utils.data.DataLoader(_TestImages(test, positions), batch_size=cfg.eval_batch_size,
                                         collate_fn=list, num_workers=cfg.loader_workers)
    mine: list[tuple] = []
    for batch in loader:
        readable = [(p, image) for p, image in batch if image is not None]
        outputs = detect(model, [image for _, image in readable], device) if readable else []
        mine.extend((p, *output) for (p, _), output in zip(readable, outputs))
    gathered = [mine]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    if rank != 0:
        return {}, []
    found = sorted((item for part in gathered for item in part), key=lambda item: item[0])
    results = detections_to_coco_results([int(test.image_ids[p]) for p, *_ in found], [b for _, b, _, _ in found],
                                         [s for _, _, s, _ in found], [lbl for _, _, _, lbl in found],
                                         list(test.category_ids))
    metrics = evaluate_detections(test.to_coco(), results)
    return metrics, results


def _train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker. ``loop_config``: the config, the train and test sets, the seed,
    the output folder, and ``checkpoint_on_notice`` (False in a Tune trial: see
    :func:`~dap_ray.steps.detector_loop.train_iterations`)."""
    import ray.train.torch

    cfg = FinetuneConfig(**loop_config["config"])
    train: DetectionSet = loop_config["train"]
    test: DetectionSet = loop_config["test"]
    seed = loop_config["seed"]
    output = Path(loop_config["output"])
    rank, world = train_worker_rank(cfg.use_gpu, cfg.cpus_per_worker)
    device = train_device(cfg.use_gpu, cfg.device)

    torch.manual_seed(seed)  # identical fresh layers on every rank
    model = build_model(cfg, len(train.classes))
    initialise(model, cfg.init or "scratch", detector=cfg.detector, backbone=cfg.backbone)
    model = ray.train.torch.prepare_model(model, move_to_device=device)
    optimizer, scheduler = make_optimizer(cfg, model)
    start, state = restore(model, optimizer, scheduler, rank=rank, seed=seed, max_iters=cfg.max_iters)
    evaluations: list[dict] = state.get("evaluations", [])

    final: dict = {}

    def evaluate(done: int) -> dict:
        # The test pass must not move the training's random streams: runs evaluated at other
        # points then train alike.
        with torch.random.fork_rng(devices=[]):
            scores, results = _evaluate(model, test, cfg, rank, world, device)
        if rank != 0:
            return {}
        evaluations[:] = [e for e in evaluations if e["iteration"] < done] + [
            {"iteration": done, **{k: scores[k] for k in HEADLINE_METRICS}}]
        print(f"eval at iteration {done}: " + " ".join(f"{k} {scores[k]:.2f}" for k in ("AP", "AP50", "VOC_AP50")),
              flush=True)
        _write_json_lines(output / "metrics.jsonl", evaluations)  # progress to follow (on rank 0's node)
        if done == cfg.max_iters:  # the final figures travel to the driver in the last checkpoint
            final.update(scores=json.dumps(json_safe(scores)), detections=_detections_tensor(results))
        return {"progress": round(100 * done / cfg.max_iters), **{k: scores[k] for k in ("AP", "AP50", "VOC_AP50")}}

    loader = training_loader(cfg, train, seed, rank, world, start)
    train_iterations(model, optimizer, scheduler, iter(loader), device, rank=rank, world=world, start=start,
                     max_iters=cfg.max_iters, checkpoint_every=cfg.checkpoint_every, log_every_s=cfg.log_every_s,
                     history=state.get("history", []), eval_every=cfg.eval_every, evaluate=evaluate,
                     extra_state=lambda: {"evaluations": evaluations, **final}, rng_state=state.get("rng"),
                     checkpoint_on_notice=loop_config.get("checkpoint_on_notice", True))


def _detections_tensor(results: list[dict]) -> torch.Tensor:
    """COCO results as an (N, 7) float64 tensor (image_id, category_id, x, y, w, h, score): what a
    checkpoint holds compactly and loads with ``weights_only``."""
    rows = [[r["image_id"], r["category_id"], *r["bbox"], r["score"]] for r in results]
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 7)


def _detections_from_tensor(table: torch.Tensor) -> list[dict]:
    return [{"image_id": int(row[0]), "category_id": int(row[1]), "bbox": row[2:6], "score": row[6]}
            for row in table.tolist()]


def _write_json_lines(path: Path, rows: list[dict]) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("".join(json.dumps(json_safe(r)) + "\n" for r in rows))
    os.replace(partial, path)


def finetune(cfg: FinetuneConfig) -> dict:
    """Run Step 4 for every seed; return the summary (one seed: that run's meta)."""
    if cfg.train is None:
        raise ValueError("no --train given (the jobs fill in the built-in downstream sample: dap_ray.steps.embedded)")
    if cfg.init is None:
        raise ValueError("--init is required: dap:RUN_DIR, cls:FILE_OR_TORCHVISION_NAME or scratch")
    absolute = {k: str(Path(getattr(cfg, k)).resolve())
                for k in ("train", "test", "train_images", "test_images", "kshot_table") if getattr(cfg, k)}
    cfg = resolve_architecture(dataclasses.replace(cfg, **absolute))
    uri = check_tracking(cfg.mlflow_uri, cfg.output)
    train_all, test = load_split(cfg, "train"), load_split(cfg, "test")
    if train_all.classes != test.classes:
        raise ValueError(f"the training set's classes {list(train_all.classes)} differ from the test set's "
                         f"{list(test.classes)}")
    print(f"fine-tuning a {cfg.detector} ({cfg.backbone}) from {cfg.init} on {len(train_all)} training images "
          f"of {len(train_all.classes)} classes; testing on {len(test)} images", flush=True)
    output = Path(cfg.output).resolve()
    runs = []
    with open_run(output):
        for seed in cfg.seeds:
            folder = output if len(cfg.seeds) == 1 else output / f"seed_{seed}"
            runs.append(_run_one(cfg, seed, train_all, test, folder))
        if len(cfg.seeds) == 1:
            meta = runs[0]
            log_step(uri, "finetune", output, meta.get("config", config_to_dict(cfg)), _tracked_rows(meta),
                     step_key="iteration", final=meta["final"],
                     artifacts=("config.yaml", "meta.json", "metrics.json", "learning_curve.png"))
            return meta
        summary = _summarise(cfg, runs)
        (output / "summary.json").write_text(json.dumps(json_safe(summary), indent=2))
        save_config(cfg, output / "config.yaml")
        from dap_ray.evaluation.plots import plot_learning_curves

        plot_learning_curves({f"seed {m['seed']}": m["evaluations"] for m in runs}, output / "learning_curves.png",
                             title=f"{cfg.init.split(':')[0].upper()} init, {_shots_label(cfg)}")
    log_step(uri, "finetune", output, config_to_dict(cfg), step_key="iteration",
             final={f"{k}_{stat}": v[stat] for k, v in summary["metrics"].items() for stat in ("mean", "std")},
             artifacts=("config.yaml", "summary.json", "learning_curves.png"),
             children=[(f"seed {m['seed']}", m.get("config", {}), _tracked_rows(m), m["final"]) for m in runs])
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2), flush=True)
    return summary


def _tracked_rows(meta: dict) -> list[dict]:
    """A seed run's losses and evaluations, each row at its iteration, for MLflow."""
    return [*meta.get("history", []), *meta.get("evaluations", [])]


def _shots_label(cfg: FinetuneConfig) -> str:
    return f"{cfg.shots}-shot" if cfg.shots else "all training images"


def _run_one(cfg: FinetuneConfig, seed: int, train_all: DetectionSet, test: DetectionSet, folder: Path) -> dict:
    with open_run(folder):
        chosen, kshot = np.arange(len(train_all)), None
        if cfg.shots is not None:
            chosen, kshot = sample_k_shot(train_all, cfg.shots, seed)
            if kshot.get("short"):
                print(f"warning: seed {seed}: classes with fewer than {cfg.shots} images take all they have: "
                      f"{kshot['short']}", flush=True)
            (folder / "kshot_images.json").write_text(json.dumps({
                "k": cfg.shots, "seed": seed, "image_ids": [int(train_all.image_ids[i]) for i in chosen],
                "file_names": [train_all.file_names[i] for i in chosen], "report": kshot}, indent=2))
        picked = train_all.subset(chosen)
        train = picked.subset(picked.training_indices(cfg.train_on_difficult))
        if len(train) < cfg.num_workers:
            raise ValueError(f"{len(train)} training images with boxes cannot feed {cfg.num_workers} workers")
        run_cfg = resolve_schedule(dataclasses.replace(cfg, seeds=(seed,)), len(train))
        storage = run_storage(cfg.storage_path, folder)
        if has_checkpoint(storage, "finetune") or (folder / "detector_final.pt").is_file():
            check_same_settings(folder, config_to_dict(run_cfg), "a fine-tuning run", except_keys=OPERATIONAL)
            finished = _finished(folder, run_cfg)
            if finished is not None:
                print(f"seed {seed}: already done in {folder} ({finished['iterations']} iterations)", flush=True)
                return finished
        # The driver builds and initialises the model once before any worker does: a bad --init
        # stops here with its reason, and the load report is written beside the outputs.
        torch.manual_seed(seed)
        report = initialise(build_model(run_cfg, len(train.classes)), run_cfg.init, detector=run_cfg.detector,
                            backbone=run_cfg.backbone)
        for line in report.lines():
            print(line, flush=True)
        (folder / "init_report.json").write_text(json.dumps(report, indent=2))

        init_ray()
        resolved = dataclasses.replace(
            run_cfg, cpus_per_worker=cpus_per_worker(run_cfg.cpus_per_worker, run_cfg.use_gpu, run_cfg.num_workers,
                                                  run_cfg.loader_workers))
        save_config(resolved, folder / "config.yaml")
        print(f"seed {seed}: {len(train)} training images ({_shots_label(cfg)}), {resolved.max_iters} iterations "
              f"at {resolved.global_batch()} images, lr {resolved.lr:g}, sizes {resolved.min_sizes}/{resolved.max_size}",
              flush=True)
        started = time.perf_counter()
        state = fit_torch_trainer(
            _train_loop, {"config": config_to_dict(resolved), "train": train, "test": test, "seed": seed,
                          "output": str(folder)},
            name="finetune", storage=storage, num_workers=resolved.num_workers, use_gpu=resolved.use_gpu,
            device=resolved.device, cpus=resolved.cpus_per_worker, max_failures=resolved.max_failures, state_file=STATE_FILE)
        torch.save(state["model"], folder / "detector_final.pt")
        # Written here from the last checkpoint, not by rank 0, whose node may be another.
        evaluations = state["evaluations"]
        _write_json_lines(folder / "metrics.jsonl", evaluations)
        final = json.loads(state["scores"]) if "scores" in state else {}
        if final:
            (folder / "metrics.json").write_text(json.dumps(final, indent=2))
            (folder / "detections.json").write_text(json.dumps(_detections_from_tensor(state["detections"])))
        from dap_ray.evaluation.plots import plot_learning_curves

        plot_learning_curves({cfg.init.split(":")[0].upper(): evaluations}, folder / "learning_curve.png",
                             title=f"seed {seed}, {_shots_label(cfg)}")
        meta = {
            "seed": seed, "init": resolved.init, "detector": resolved.detector, "backbone": resolved.backbone,
            "classes": list(train.classes), "category_ids": list(train.category_ids),
            "num_classes": len(train.classes) + 1, "train_images": len(train), "test_images": len(test),
            "shots": cfg.shots, "iterations": state["iteration"], "wall_s": round(time.perf_counter() - started, 1),
            "final": {k: final.get(k) for k in HEADLINE_METRICS}, "evaluations": evaluations,
            "history": state["history"], "init_report": report, "train_report": train_all.report,
            "test_report": test.report, "config": config_to_dict(resolved),
        }
        (folder / "meta.json").write_text(json.dumps(json_safe(meta), indent=2))
        print(f"seed {seed}: {json.dumps(meta['final'])} after {meta['iterations']} iterations; "
              f"outputs in {folder}", flush=True)
        return meta


def _finished(folder: Path, cfg: FinetuneConfig) -> dict | None:
    """The meta of a run in ``folder`` that already trained all of ``cfg.max_iters``, or None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("iterations") == cfg.max_iters and (folder / "detector_final.pt").is_file() else None


def _summarise(cfg: FinetuneConfig, runs: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds of each headline metric."""
    stats = {}
    for key in HEADLINE_METRICS:
        values = [r["final"][key] for r in runs if r["final"].get(key) is not None]
        stats[key] = {"mean": statistics.fmean(values) if values else None,
                      "std": statistics.stdev(values) if len(values) > 1 else 0.0 if values else None,
                      "values": values}
    return {"init": cfg.init, "shots": cfg.shots, "seeds": list(cfg.seeds), "metrics": stats,
            "runs": [{"seed": r["seed"], "final": r["final"], "iterations": r["iterations"]} for r in runs]}
