"""Step 1 on Ray Train: train a classifier on image-level labels.

:func:`train_classifier` lists an image folder, holds out a validation split, and runs a
``TorchTrainer`` (Ray Train V2) with W workers under DDP. Each worker reads its share of
the images with a prepared ``DataLoader`` (``ray.train.torch.prepare_data_loader``), so the
folder must be reachable from every node (a shared or mounted file system on a cluster).
Every epoch ends in a checkpoint reported to Ray Train (model, optimiser, schedule, epoch;
random streams are seeded per epoch); re-running the same command resumes from the last one, and ``FailureConfig``
restarts a failed worker group from it. The result is ``RUN_DIR/classifier.pt``, a plain
state dict that :func:`dap_ray.models.load_classifier` loads, and ``RUN_DIR/meta.json``.
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

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T

from dap_ray.config import config_to_dict, save_config
from dap_ray.data.images import BadImageError, decode_image, list_image_folder
from dap_ray.data.loading import ReplacingDataset
from dap_ray.localisation.cam import IMAGENET_MEAN, IMAGENET_STD
from dap_ray.models.classifiers import load_classifier, unwrap_ddp
from dap_ray.progress import Progress
from dap_ray.runs import check_same_settings, open_run
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

__all__ = ["ClassifierTrainConfig", "ImageListDataset", "train_classifier"]

_STATE_FILE = "state.pt"


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Classifier training. Defaults suit the built-in sample set on a laptop."""

    data: str = field(default="", metadata={"help": "image folder: DATA/<class>/<image>"})
    class_map: str | None = field(default=None, metadata={
        "help": "class names, one per line; line i is output i (default: sorted folder names)"})
    output: str = field(default="classifier_run", metadata={"help": "run folder for classifier.pt, meta.json, checkpoints"})
    arch: str = field(default="resnet18", metadata={"help": "torchvision name or package.module:factory"})
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    batch_size: int = field(default=32, metadata={"help": "images per worker per step"})
    optimizer: Literal["adamw", "sgd"] = field(default="adamw", metadata={
        "help": "adamw learns small sets from scratch fastest; sgd (momentum 0.9) is the ImageNet recipe"})
    lr: float = field(default=1e-3, metadata={
        "help": "peak learning rate (for sgd on ImageNet, about 0.1 x global batch / 256)"})
    weight_decay: float = field(default=0.05, metadata={"help": "weight decay (1e-4 is usual with sgd)"})
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear warm-up before the cosine decay"})
    image_size: int = field(default=96, metadata={"help": "training crop size in pixels (224 for ImageNet)"})
    crop_scale_min: float = field(default=0.4, metadata={"help": "smallest random crop, as a share of the image area"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of images held out for validation"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (DDP processes)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker, bf16 autocast"})
    device: Literal["auto", "cuda", "cpu"] = field(default="auto", metadata={"help": DEVICE_HELP})
    cpus_per_worker: int | None = field(default=None, metadata={
        "help": "CPUs reserved per worker (default: CPU runs share this node's CPUs among the workers; GPU runs "
                "take one plus one per loader process, to decode with)"})
    loader_workers: int = field(default=0, metadata={"help": "DataLoader processes per worker (decode in parallel)"})
    max_failures: int = field(default=2, metadata={"help": "worker-group restarts from the last checkpoint"})
    storage_path: str | None = field(default=None, metadata={
        "help": "where Ray Train keeps checkpoints (default OUTPUT/ray; use shared storage on a cluster)"})
    seed: int = field(default=0, metadata={"help": "split and initialisation seed"})
    log_every_s: float = field(default=20.0, metadata={"help": "seconds between progress lines within an epoch"})
    mlflow_uri: str | None = field(default=None, metadata={"help": MLFLOW_URI_HELP})

    def __post_init__(self) -> None:
        check_device(self.device, self.use_gpu, "--use-gpu")
        if not self.data:
            raise ValueError("data (the image folder) is required")
        for name in ("epochs", "batch_size", "image_size", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError(f"crop_scale_min must lie in (0, 1], got {self.crop_scale_min}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


class ImageListDataset(ReplacingDataset):
    """(path relative to ``root``, label) items to (image tensor, label).

    ``replace_unreadable``: an unreadable image is named in a warning and replaced by the
    next readable one (training; see :class:`dap_ray.data.loading.ReplacingDataset`);
    otherwise it gives None, which the collate drops (validation).
    """

    def __init__(self, root: str | Path, items: list[tuple[str, int]], transform, replace_unreadable: bool = False):
        self.root, self.items, self.transform = Path(root), items, transform
        self.replace = replace_unreadable

    def __len__(self) -> int:
        return len(self.items)

    def _describe(self, index: int) -> str:
        return f"{self.items[index][0]!r} under {self.root}"

    def _load(self, index: int):
        path, label = self.items[index]
        try:
            image = decode_image((self.root / path).read_bytes())
        except (OSError, BadImageError) as exc:
            print(f"skipping {path}: {exc}", flush=True)
            return None
        return self.transform(torch.from_numpy(image).permute(2, 0, 1)), label


def _collate(samples):
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    images, labels = zip(*samples)
    return torch.stack(images), torch.tensor(labels)


def _transforms(image_size: int, crop_scale_min: float):
    normalise = [T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = T.Compose([T.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), antialias=True),
                       T.RandomHorizontalFlip(), *normalise])
    val = T.Compose([T.Resize(image_size, antialias=True), T.CenterCrop(image_size), *normalise])
    return train, val


def split_items(items: list[tuple[str, int]], val_fraction: float, seed: int):
    """Deterministic train/validation split, stratified by label."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    labels = np.array([label for _, label in items])
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        n_val = int(round(len(members) * val_fraction)) if len(members) > 1 else 0
        val.extend(items[i] for i in members[:n_val])
        train.extend(items[i] for i in members[n_val:])
    return sorted(train), sorted(val)


def _train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    cfg = ClassifierTrainConfig(**loop_config["config"])
    rank, world = train_worker_rank(cfg.use_gpu, cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed + rank)

    train_tf, val_tf = _transforms(cfg.image_size, cfg.crop_scale_min)
    train_set = ImageListDataset(cfg.data, loop_config["train_items"], train_tf, replace_unreadable=True)
    val_items = loop_config["val_items"][rank::world]  # each rank scores a disjoint slice
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_set) > cfg.batch_size * world,
                        num_workers=cfg.loader_workers, collate_fn=_collate, persistent_workers=cfg.loader_workers > 0)
    loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)
    val_loader = DataLoader(ImageListDataset(cfg.data, val_items, val_tf), batch_size=cfg.batch_size,
                            num_workers=cfg.loader_workers, collate_fn=_collate)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = load_classifier(cfg.arch, num_classes=loop_config["num_classes"])
    device = train_device(cfg.use_gpu, cfg.device)
    model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last), move_to_device=device)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(loader))
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(os.path.join(directory, _STATE_FILE), map_location="cpu", weights_only=True)
        unwrap_ddp(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        if rank == 0:
            print(f"resuming after epoch {start_epoch}/{cfg.epochs} from the last checkpoint", flush=True)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    run_progress = Progress(total_steps, "steps", done=start_epoch * steps_per_epoch, every_s=cfg.log_every_s)
    for epoch in range(start_epoch, cfg.epochs):
        # Seeding per epoch makes a resumed run draw the same crops and order as an
        # uninterrupted one, without carrying RNG state in the checkpoint.
        torch.manual_seed(cfg.seed + 1009 * epoch + rank)
        if world > 1:
            loader.sampler.set_epoch(epoch)
        model.train()
        seen = correct = 0
        loss_sum = 0.0
        started = time.perf_counter()
        for step, batch in enumerate(loader):
            images, labels = batch  # never None: unreadable training images are replaced
            images = images.to(device).contiguous(memory_format=torch.channels_last)
            labels = labels.to(device)
            with autocast:
                logits = model(images)
                loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            loss_sum += float(loss) * len(labels)
            now = time.perf_counter()
            if rank == 0 and run_progress.due():
                print(f"epoch {epoch + 1}/{cfg.epochs} step {step + 1}/{steps_per_epoch} "
                      f"loss {loss_sum / seen:.4f} {seen * world / (now - started):.1f} images/s, "
                      f"{run_progress.left(epoch * steps_per_epoch + step + 1)}", flush=True)
        elapsed = time.perf_counter() - started
        if seen == 0:
            raise RuntimeError(f"no training image under {cfg.data} could be read on rank {rank}")
        val_correct, val_seen = _evaluate(model, val_loader, device, autocast)
        totals = torch.tensor([val_correct, val_seen, seen, correct, loss_sum], dtype=torch.float64)
        if world > 1:
            import torch.distributed as dist

            totals = totals.to(device)
            dist.all_reduce(totals)
            totals = totals.cpu()
        val_correct, val_seen, seen_all, correct_all, loss_all = totals.tolist()
        metrics = {
            "epoch": epoch + 1,
            "loss": loss_all / max(1.0, seen_all),
            "train_top1": correct_all / max(1.0, seen_all),
            "val_top1": val_correct / max(1.0, val_seen),
            "images_per_s": seen_all / elapsed,
            "lr": scheduler.get_last_lr()[0],
        }
        history.append(metrics)
        if rank == 0:
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {metrics['loss']:.4f} train top-1 {metrics['train_top1']:.3f} "
                  f"val top-1 {metrics['val_top1']:.3f} ({int(val_seen)} images) {metrics['images_per_s']:.1f} images/s, "
                  f"{run_progress.left((epoch + 1) * steps_per_epoch)}", flush=True)
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:
                torch.save({"model": unwrap_ddp(model).state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history}, os.path.join(directory, _STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint)


def _evaluate(model, loader, device, autocast) -> tuple[int, int]:
    model.eval()
    correct = seen = 0
    with torch.inference_mode():
        for batch in loader:
            if batch is None:
                continue
            images, labels = batch
            with autocast:
                logits = model(images.to(device))
            correct += int((logits.argmax(1).cpu() == labels).sum())
            seen += len(labels)
    return correct, seen


# Settings that change how the work is spread, not what is learnt: a rerun may change them.
OPERATIONAL = ("output", "use_gpu", "cpus_per_worker", "loader_workers", "max_failures", "storage_path", "log_every_s",
               "mlflow_uri")


def saved_split(output: Path, items: list[tuple[str, int]], cfg: ClassifierTrainConfig,
                resuming: bool) -> tuple[list, list]:
    """The run's train/validation split: computed once and kept in ``output/split.json``, so that a
    resumed run validates on the images it held out before, whatever was added to or removed
    from the folder since (images new to the folder are left out, with a warning)."""
    path = output / "split.json"
    if resuming and path.is_file():
        saved = json.loads(path.read_text())
        train, val = ([tuple(item) for item in saved[key]] for key in ("train", "val"))
        known = {p for p, _ in train} | {p for p, _ in val}
        new = [p for p, _ in items if p not in known]
        present = {p for p, _ in items}
        gone = sorted(known - present)
        if new:
            print(f"warning: {len(new)} images not in this run's saved split are left out (e.g. {new[0]}); "
                  f"train in another --output to use them", flush=True)
        if gone:
            print(f"warning: {len(gone)} images of this run's split are gone (e.g. {gone[0]}); "
                  "they are skipped when read", flush=True)
        return train, val
    train, val = split_items(items, cfg.val_fraction, cfg.seed)
    path.write_text(json.dumps({"train": train, "val": val}))
    return train, val


def train_classifier(cfg: ClassifierTrainConfig) -> dict:
    """Train on Ray Train, write ``classifier.pt`` and ``meta.json`` under ``cfg.output``; return the meta.

    Holds the output folder's lock (:func:`dap_ray.runs.open_run`); a rerun resumes from the
    last checkpoint with the saved split, and stops if a setting outside :data:`OPERATIONAL`
    differs from the run's.
    """
    # Workers run in other directories: every path they see must be absolute.
    cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).resolve()),
                              class_map=str(Path(cfg.class_map).resolve()) if cfg.class_map else None)
    uri = check_tracking(cfg.mlflow_uri, cfg.output)
    listing = list_image_folder(cfg.data, cfg.class_map)
    for line in listing.problems():
        print(f"warning: {line}", flush=True)
    with open_run(Path(cfg.output).resolve()) as output:
        storage = run_storage(cfg.storage_path, output)
        resuming = has_checkpoint(storage, "classifier") or (output / "classifier.pt").is_file()
        if resuming:
            check_same_settings(output, config_to_dict(cfg), "a classifier run", except_keys=OPERATIONAL)
        train_items, val_items = saved_split(output, listing.items, cfg, resuming)
        if not val_items:
            raise ValueError(f"no validation images: {len(listing.items)} images are too few for val_fraction "
                             f"{cfg.val_fraction}")
        meta = _train(cfg, listing, train_items, val_items, output, storage)
    log_step(uri, "classifier", output, config_to_dict(cfg), meta.get("history", []), step_key="epoch",
             final={k: meta.get(k) for k in ("val_top1", "epochs")}, artifacts=("config.yaml", "meta.json"))
    return meta


def _train(cfg: ClassifierTrainConfig, listing, train_items: list, val_items: list, output: Path,
           storage: Path) -> dict:
    init_ray()
    resolved = dataclasses.replace(cfg, cpus_per_worker=cpus_per_worker(cfg.cpus_per_worker, cfg.use_gpu, cfg.num_workers,
                                                                         cfg.loader_workers))
    save_config(resolved, output / "config.yaml")
    print(f"training {cfg.arch} on {len(train_items)} images ({len(val_items)} held out) of "
          f"{len(listing.classes)} classes with {cfg.num_workers} worker(s)", flush=True)
    state = fit_torch_trainer(
        _train_loop,
        {"config": config_to_dict(resolved), "train_items": train_items, "val_items": val_items,
         "num_classes": len(listing.classes)},
        name="classifier", storage=storage,
        num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, device=cfg.device, cpus=resolved.cpus_per_worker,
        max_failures=cfg.max_failures, state_file=_STATE_FILE)
    torch.save(state["model"], output / "classifier.pt")
    history = state["history"]
    meta = {
        "arch": cfg.arch,
        "classes": listing.classes,
        "num_classes": len(listing.classes),
        "epochs": state["epoch"] + 1,
        "val_top1": history[-1]["val_top1"] if history else None,
        "train_images": len(train_items),
        "val_images": len(val_items),
        "history": history,
        "unknown_folders": listing.unknown_folders,
        "skipped_files": listing.skipped_files,
        "config": config_to_dict(resolved),
    }
    (output / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {output / 'classifier.pt'}: val top-1 {meta['val_top1']:.3f} after {meta['epochs']} epochs", flush=True)
    return meta
