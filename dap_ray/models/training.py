"""Training and running a detector, the parts shared by pre-training (Step 3) and fine-tuning
(Step 4): plain torch.

The authors trained with maskrcnn-benchmark, whose solver gives biases twice the learning
rate and no weight decay (``SOLVER.BIAS_LR_FACTOR = 2``, ``SOLVER.WEIGHT_DECAY_BIAS = 0``);
:func:`detector_optimizer` does the same by default. The schedule is a linear warm-up then
10x drops at given iterations (:func:`lr_factor`), stepped once per iteration.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from dap_ray.models.classifiers import unwrap_ddp

__all__ = ["detect", "detector_optimizer", "lr_factor", "step_iterations", "train_step"]


def step_iterations(fractions: Sequence[float], max_iters: int) -> list[int]:
    """The iterations where the rate drops 10x: ``int(f * max_iters)`` for each fraction, those inside
    the run (1 to max_iters - 1) once each, ascending. A short run keeps the drops that fit, and
    both backends take the same list (detectron2's scheduler refuses repeated or late steps)."""
    return sorted({int(f * max_iters) for f in fractions} & set(range(1, max_iters)))


def lr_factor(iteration: int, *, warmup_iters: int, warmup_factor: float, steps: Sequence[int]) -> float:
    """The learning-rate multiplier at ``iteration`` (from 0): linear warm-up from ``warmup_factor``
    over ``warmup_iters``, times 0.1 for each of ``steps`` (iterations) already reached."""
    factor = 0.1 ** sum(iteration >= step for step in steps)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def detector_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
                       bias_lr_factor: float = 2.0, bias_weight_decay: float = 0.0) -> torch.optim.SGD:
    """SGD over ``model``'s trainable parameters: weights at ``lr`` with ``weight_decay``, biases at
    ``lr * bias_lr_factor`` with ``bias_weight_decay`` (maskrcnn-benchmark's rule). Groups without
    parameters are left out; each group keeps its own ``initial_lr`` for a LambdaLR schedule."""
    weights, biases = [], []
    for name, parameter in unwrap_ddp(model).named_parameters():
        if parameter.requires_grad:
            (biases if name.endswith(".bias") else weights).append(parameter)
    groups = [{"params": weights, "lr": lr, "weight_decay": weight_decay},
              {"params": biases, "lr": lr * bias_lr_factor, "weight_decay": bias_weight_decay}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_step(model: nn.Module, batch: list[dict], optimizer, scheduler,
               device: torch.device) -> dict[str, torch.Tensor]:
    """One iteration on a batch of ``{"image": (3, h, w) uint8, "boxes": (N, 4) float32 xyxy pixels of
    that image, "labels": (N,) int64}`` samples, already resized by the loader; the loss parts as
    detached 0-dim tensors on ``device``.

    Nothing here waits for the device (no ``.item()``, no finiteness check): the caller reads the
    losses where it logs them and stops a run whose loss is not finite there
    (:func:`dap_ray.steps.detector_loop.train_iterations`). The detector must skip its own resize
    in training (built with ``resize_in_training=False``). Copies to the device do not block when
    the loader pins memory. bf16 autocast on CUDA.
    """
    images = [s["image"].to(device, non_blocking=True).float().div_(255) for s in batch]
    targets = [{"boxes": s["boxes"].to(device, non_blocking=True), "labels": s["labels"].to(device, non_blocking=True)}
               for s in batch]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        losses = model(images, targets)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return {k: v.detach() for k, v in losses.items()}


@torch.inference_mode()
def detect(model: nn.Module, images: list[torch.Tensor], device: torch.device) -> list[tuple]:
    """Run a torchvision detector (in eval mode: it resizes to its test size) on (3, H, W) uint8
    images; per image (boxes (N, 4) float32 xyxy original-image pixels, scores (N,) float32,
    labels (N,) int64 contiguous 0-based, i.e. the detector's class - 1), as numpy arrays."""
    detector = unwrap_ddp(model)
    was_training = detector.training
    detector.eval()
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outputs = detector([image.to(device).float().div_(255) for image in images])
    finally:
        detector.train(was_training)
    return [(o["boxes"].float().cpu().numpy().reshape(-1, 4), o["scores"].float().cpu().numpy(),
             o["labels"].cpu().numpy().astype(np.int64) - 1) for o in outputs]
