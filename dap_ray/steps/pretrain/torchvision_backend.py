"""Step 3 on Ray Train with torchvision detectors: pre-train a whole detector on the mined pseudo boxes.

:func:`train_torchvision` runs a ``TorchTrainer`` (Ray Train V2) with W DDP workers. Every
worker reads the mining run's ``boxes/*.parquet`` and the images they name (so both must be
reachable from every node, as for Step 1), and draws its own stream of aspect-grouped,
multi-scale, flipped batches (:class:`dap_ray.data.detection.AspectBatchSampler`) through a
DataLoader. Training counts iterations, as the paper's does. Every ``checkpoint_every``
iterations a checkpoint (model, optimiser, schedule, iteration, every rank's torch RNG
state, loss history) is reported to Ray Train; running the same command again resumes
from the last one, and ``FailureConfig`` restarts a failed worker group from it. The
result is ``RUN_DIR/detector_final.pt``, a plain torchvision state dict
(:func:`dap_ray.models.detectors.detector_state_dict`), and ``RUN_DIR/meta.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from dap_ray.config import config_to_dict, save_config
from dap_ray.data.detection import AspectBatchSampler, collate_detection
from dap_ray.data.pseudo_boxes import PseudoBoxDataset, PseudoBoxes, load_pseudo_boxes
from dap_ray.models.classifiers import unwrap_ddp
from dap_ray.models.detectors import build_detector, detector_state_dict
from dap_ray.steps.pretrain.config import PretrainConfig
from dap_ray.steps.ray_setup import (
    cpus_per_worker,
    fit_torch_trainer,
    init_ray,
    train_worker_rank,
)

__all__ = ["detector_for", "make_optimizer", "train_step", "train_torchvision", "training_loader"]

_STATE_FILE = "state.pt"


def _lr_factor(cfg: PretrainConfig, iteration: int) -> float:
    """Linear warm-up from ``warmup_factor``, then 10x drops at ``lr_steps``."""
    factor = 0.1 ** sum(iteration >= int(s * cfg.max_iters) for s in cfg.lr_steps)
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def detector_for(cfg: PretrainConfig, num_classes: int) -> torch.nn.Module:
    """:func:`dap_ray.models.detectors.build_detector` with ``cfg``'s detector, trunk and sizes."""
    return build_detector(cfg.detector, cfg.backbone, num_classes, backbone_weights=cfg.backbone_weights,
                          trainable_layers=cfg.trainable_layers, min_size=cfg.min_sizes, max_size=cfg.max_size,
                          roi_batch_size_per_image=cfg.roi_batch_size_per_image)


def training_loader(cfg: PretrainConfig, pseudo: PseudoBoxes, rank: int = 0, world: int = 1,
                    start: int = 0) -> torch.utils.data.DataLoader:
    """This rank's endless DataLoader of batches from batch ``start`` on (see AspectBatchSampler)."""
    from dap_ray.data.sources import ImageReader

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
    """One iteration on a batch from :class:`dap_ray.data.pseudo_boxes.PseudoBoxDataset`; the loss parts as floats.

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


def train_torchvision(cfg: PretrainConfig, pseudo: PseudoBoxes, classes: list[str], output: Path) -> dict:
    """Pre-train on Ray Train workers; write ``detector_final.pt``, ``meta.json`` and ``config.yaml``
    under ``output``; return the meta. ``cfg`` comes from :func:`prepare_data`."""
    num_classes = len(classes)
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
    return (f"dap_ray.models.detectors.build_detector({cfg.detector!r}, {cfg.backbone!r}, {num_classes - 1})"
            ".load_state_dict(torch.load('detector_final.pt'))")
