"""Step 3: pre-train a detector on the mined pseudo boxes, on Ray Train.

:func:`pretrain` is the step: it reads the mining run (:func:`prepare_data`) and hands the
run to a backend, torchvision's detectors (:mod:`.torchvision_backend`, built in) or
detectron2 (:mod:`.detectron2_backend`, optional). This is the one place the backend is
chosen; the detectron2 adapter builds on the shared configuration, never the reverse.
"""

from __future__ import annotations

from pathlib import Path

from dap_ray.steps.pretrain.config import PretrainConfig, prepare_data

__all__ = ["PretrainConfig", "prepare_data", "pretrain"]


def pretrain(cfg: PretrainConfig) -> dict:
    """Run Step 3 and return the meta written to ``cfg.output/meta.json``."""
    if cfg.boxes is None:
        raise ValueError("no --boxes given (the jobs fill in the built-in sample: dap_ray.steps.embedded)")
    cfg, pseudo, classes = prepare_data(cfg)
    if cfg.backbone_weights is None:
        print("warning: no --backbone-weights: the backbone starts at random (DAP starts from the Step 1 classifier)",
              flush=True)
    output = Path(cfg.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    if cfg.backend == "detectron2":
        from dap_ray.steps.pretrain.detectron2_backend import train_detectron2

        return train_detectron2(cfg, pseudo, classes, output)
    from dap_ray.steps.pretrain.torchvision_backend import train_torchvision

    return train_torchvision(cfg, pseudo, classes, output)
