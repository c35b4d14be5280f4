"""Step 3 on Ray Train with torchvision detectors: pre-train a whole detector on the mined pseudo boxes.

:func:`train_torchvision` runs a ``TorchTrainer`` (Ray Train V2) with W DDP workers. Every
worker memory-maps the pseudo boxes' cache that the driver had built (once, beside the
boxes: :mod:`dap_ray.data.pseudo_boxes`) and reads the images they name with one positioned
read each (:mod:`dap_ray.data.locations`), so the cache and the input must be reachable
from every node, as for Step 1; it draws its own stream of aspect-grouped,
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
from pathlib import Path

import torch

from dap_ray.config import config_to_dict, save_config
from dap_ray.data.detection import AspectBatchSampler, collate_detection
from dap_ray.data.locations import LocatedImages, load_locations
from dap_ray.data.pseudo_boxes import PseudoBoxDataset, PseudoBoxes, open_box_cache
from dap_ray.models.detectors import build_detector
from dap_ray.models.training import detector_optimizer, lr_factor, step_iterations
from dap_ray.steps.detector_loop import STATE_FILE, restore, train_iterations
from dap_ray.steps.pretrain.config import PretrainConfig
from dap_ray.steps.ray_setup import (
    computes_on_gpu,
    cpus_per_worker,
    fit_torch_trainer,
    init_ray,
    run_storage,
    train_device,
    train_worker_rank,
)

__all__ = ["detector_for", "make_optimizer", "schedule_factor", "train_torchvision", "training_dataset",
           "training_loader"]

def schedule_factor(cfg: PretrainConfig, iteration: int) -> float:
    """Linear warm-up from ``warmup_factor``, then 10x drops at the ``lr_steps`` fractions of ``max_iters``."""
    return lr_factor(iteration, warmup_iters=cfg.warmup_iters, warmup_factor=cfg.warmup_factor,
                     steps=step_iterations(cfg.lr_steps, cfg.max_iters))


def detector_for(cfg: PretrainConfig, num_classes: int) -> torch.nn.Module:
    """:func:`dap_ray.models.detectors.build_detector` with ``cfg``'s detector, trunk and sizes."""
    return build_detector(cfg.detector, cfg.backbone, num_classes, backbone_weights=cfg.backbone_weights,
                          trainable_layers=cfg.trainable_layers, min_size=cfg.min_sizes, max_size=cfg.max_size,
                          roi_batch_size_per_image=cfg.roi_batch_size_per_image, resize_in_training=False)


def training_loader(cfg: PretrainConfig, pseudo: PseudoBoxes, rank: int = 0, world: int = 1,
                    start: int = 0) -> torch.utils.data.DataLoader:
    """This rank's endless DataLoader of batches from batch ``start`` on (see AspectBatchSampler)."""
    sampler = AspectBatchSampler(pseudo.sizes, cfg.batch_size, cfg.min_sizes, rank=rank, world=world, seed=cfg.seed,
                                 start=start, flip=cfg.flip)
    return torch.utils.data.DataLoader(training_dataset(cfg, pseudo), batch_sampler=sampler,
                                       collate_fn=collate_detection, num_workers=cfg.loader_workers,
                                       persistent_workers=cfg.loader_workers > 0, pin_memory=computes_on_gpu(cfg.use_gpu, cfg.device))


def training_dataset(cfg: PretrainConfig, pseudo: PseudoBoxes) -> PseudoBoxDataset:
    """The pseudo boxes' dataset, reading each image with one positioned read (the input's index is
    built first if missing: :func:`dap_ray.data.locations.load_locations`)."""
    locations = load_locations(pseudo, cfg.input, cfg.format, cfg.image_column or "image")
    return PseudoBoxDataset(pseudo, LocatedImages(pseudo, locations), cfg.max_size)


def make_optimizer(cfg: PretrainConfig, model: torch.nn.Module):
    """SGD over the trainable parameters (biases at ``bias_lr_factor`` x the rate, ``bias_weight_decay``),
    and the warm-up and step schedule (stepped per iteration)."""
    optimizer = detector_optimizer(model, cfg.learning_rate(), cfg.momentum, cfg.weight_decay, cfg.bias_lr_factor,
                                   cfg.bias_weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: schedule_factor(cfg, i))


def _train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train.torch

    cfg = PretrainConfig(**loop_config["config"])
    rank, world = train_worker_rank(cfg.use_gpu, cfg.cpus_per_worker)
    device = train_device(cfg.use_gpu, cfg.device)

    pseudo = open_box_cache(loop_config["box_cache"], cfg.max_boxes_per_image)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = ray.train.torch.prepare_model(detector_for(cfg, loop_config["num_classes"]), move_to_device=device)
    optimizer, scheduler = make_optimizer(cfg, model)
    start, state = restore(model, optimizer, scheduler, rank=rank, seed=cfg.seed, max_iters=cfg.max_iters)
    batches = iter(training_loader(cfg, pseudo, rank, world, start))
    train_iterations(model, optimizer, scheduler, batches, device, rank=rank, world=world, start=start,
                     max_iters=cfg.max_iters, checkpoint_every=cfg.checkpoint_every, log_every_s=cfg.log_every_s,
                     history=state.get("history", []), rng_state=state.get("rng"))


def train_torchvision(cfg: PretrainConfig, pseudo: PseudoBoxes, classes: list[str], output: Path) -> dict:
    """Pre-train on Ray Train workers; write ``detector_final.pt``, ``meta.json`` and ``config.yaml``
    under ``output``; return the meta. ``cfg`` comes from :func:`prepare_data`."""
    num_classes = len(classes)
    init_ray()
    cpus = cpus_per_worker(cfg.cpus_per_worker, cfg.use_gpu, cfg.num_workers, cfg.loader_workers)
    resolved = dataclasses.replace(cfg, cpus_per_worker=cpus, lr=cfg.learning_rate())
    save_config(resolved, output / "config.yaml")
    print(f"pre-training {cfg.detector} ({cfg.backbone}) on {len(pseudo)} images, {pseudo.num_boxes} pseudo boxes, "
          f"{num_classes} classes; {pseudo.skipped_without_boxes} images without boxes skipped; "
          f"{cfg.num_workers} worker(s) x batch {cfg.batch_size}, {cfg.max_iters} iterations", flush=True)
    state = fit_torch_trainer(
        _train_loop, {"config": config_to_dict(resolved), "num_classes": num_classes, "box_cache": pseudo.folder},
        name="pretrain", storage=run_storage(cfg.storage_path, output),
        num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, device=cfg.device, cpus=resolved.cpus_per_worker,
        max_failures=cfg.max_failures, state_file=STATE_FILE)
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
        "pseudo_boxes": pseudo.num_boxes,
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
    return ("dap_ray.models.detectors.load_pretrained_detector(RUN_DIR) (the architecture as trained: frozen "
            f"BatchNorm, stem and layer1 frozen; {cfg.detector} on {cfg.backbone}, {num_classes} classes "
            "with background)")
