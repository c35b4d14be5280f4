"""Step 3: pre-train a detector on the mined pseudo boxes, on Ray Train.

:func:`pretrain` is the step: it reads the mining run (:func:`prepare_data`) and hands the
run to a backend, torchvision's detectors (:mod:`.torchvision_backend`, built in) or
detectron2 (:mod:`.detectron2_backend`, optional). This is the one place the backend is
chosen; the detectron2 adapter builds on the shared configuration, never the reverse.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dap_ray.config import config_to_dict
from dap_ray.runs import check_same_settings, open_run
from dap_ray.steps.pretrain.config import PretrainConfig, prepare_data
from dap_ray.steps.ray_setup import has_checkpoint, run_storage
from dap_ray.tracking import check_tracking, log_step

__all__ = ["PretrainConfig", "prepare_data", "pretrain"]


# Settings that change how the work is spread, not what is learnt: a rerun may change them.
OPERATIONAL = ("output", "use_gpu", "cpus_per_worker", "loader_workers", "checkpoint_every", "log_every_s",
               "max_failures", "storage_path", "cache_dir", "mlflow_uri")
# Boxes folders larger than this build their training cache in a Ray task, away from the driver.
IN_TASK_BYTES = 64 << 20


def pretrain(cfg: PretrainConfig) -> dict:
    """Run Step 3 and return the meta written to ``cfg.output/meta.json``.

    Holds the output folder's lock (:func:`dap_ray.runs.open_run`); a rerun resumes from the
    last checkpoint, and stops if a setting outside :data:`OPERATIONAL` differs from the run's.
    """
    if cfg.boxes is None:
        raise ValueError("no --boxes given (the jobs fill in the built-in sample: dap_ray.steps.embedded)")
    uri = check_tracking(cfg.mlflow_uri, cfg.output)
    cfg, pseudo, classes = prepare_data(cfg, build=_build_in_task if _boxes_bytes(cfg.boxes) > IN_TASK_BYTES else None)
    cfg = dataclasses.replace(cfg, lr=cfg.learning_rate())
    if cfg.backbone_weights is None:
        print("warning: no --backbone-weights: the backbone starts at random (DAP starts from the Step 1 classifier)",
              flush=True)
    with open_run(Path(cfg.output).resolve()) as output:
        storage = run_storage(cfg.storage_path, output)
        started = (has_checkpoint(storage, "pretrain") or (output / "detectron2").is_dir()
                   or (output / "detector_final.pt").is_file())
        if started:
            check_same_settings(output, config_to_dict(cfg), "a pre-training run", except_keys=OPERATIONAL)
        if cfg.backend == "detectron2":
            from dap_ray.steps.pretrain.detectron2_backend import train_detectron2

            meta = train_detectron2(cfg, pseudo, classes, output)
        else:
            from dap_ray.steps.pretrain.torchvision_backend import train_torchvision

            meta = train_torchvision(cfg, pseudo, classes, output)
    log_step(uri, "pretrain", output, config_to_dict(cfg), meta.get("history", []), step_key="iteration",
             final={"iterations": meta.get("iterations")}, artifacts=("config.yaml", "meta.json"))
    return meta


def _boxes_bytes(boxes: str) -> int:
    return sum(p.stat().st_size for p in Path(boxes).glob("*.parquet"))


def _build_in_task(fn, *args):
    """``fn(*args)`` in a Ray task, with the input's files indexed by Ray tasks across the cluster."""
    from dap_ray.steps.ray_setup import init_ray, map_on_ray, run_in_task

    init_ray()
    return run_in_task(fn, *args, map_fn=map_on_ray)
