"""Connecting to Ray the same way from a laptop, a checkout, and `ray job submit`."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEVICE_HELP", "TrainingFailedError", "check_device", "computes_on_gpu", "cpus_per_worker", "fit_torch_trainer",
           "has_checkpoint", "init_ray", "map_on_ray", "run_in_task", "run_storage", "train_device", "train_worker_rank"]

DEVICE_HELP = ("where the workers compute: auto: cuda when they hold GPUs (a GPU node without a working driver fails "
               "loudly), else cpu; cpu with GPUs held: Ray schedules the run as for GPUs and it computes on CPU "
               "(clusters of fake GPU nodes in tests, debugging a GPU deployment)")


def check_device(device: str, holds_gpus: bool, gpu_flag: str) -> None:
    """A ``device`` setting (auto, cuda or cpu) checked against whether the run asks Ray for GPUs
    (``gpu_flag`` names the option that does, for the message)."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")
    if device == "cuda" and not holds_gpus:
        raise ValueError(f"device cuda needs {gpu_flag}: Ray would give the workers no GPU")


def computes_on_gpu(holds_gpus: bool, device: str) -> bool:
    """Whether a run that holds GPUs (or not) computes on them, by its ``device`` setting."""
    return holds_gpus and device != "cpu"



def init_ray(**kwargs) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` (set under ``ray job submit``), else start a local Ray.

    A local start puts this checkout on the workers' ``PYTHONPATH`` so that jobs run from a
    checkout that was never ``pip install``-ed still find ``dap_ray`` in Ray's workers.
    Does nothing if Ray is already initialised.
    """
    import ray

    if ray.is_initialized():
        return
    if not os.environ.get("RAY_ADDRESS") and "address" not in kwargs and "runtime_env" not in kwargs:
        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
    ray.init(**kwargs)


def map_on_ray(fn, items) -> list:
    """``map`` over Ray tasks, in chunks: listing 21,841 class folders or indexing 21,841 tars of
    ImageNet-21K runs on the cluster, and the caller gets back what ``fn`` returns."""
    import ray

    items = list(items)
    if len(items) <= 16:
        return [fn(item) for item in items]
    chunk = max(1, min(256, len(items) // (4 * max(1, int(ray.cluster_resources().get("CPU", 1))))))
    task = ray.remote(num_cpus=1)(_map_chunk)
    parts = [task.remote(fn, items[i : i + chunk]) for i in range(0, len(items), chunk)]
    return [value for part in ray.get(parts) for value in part]


def _map_chunk(fn, items: list) -> list:
    return [fn(item) for item in items]


def run_in_task(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a Ray task of one CPU (its memory stays out of the driver's), and its result."""
    import ray

    return ray.get(ray.remote(num_cpus=1)(fn).remote(*args, **kwargs))


def run_storage(storage_path: str | None, output: Path) -> Path:
    """Where Ray Train keeps a run's checkpoints: ``output/ray``, or under ``storage_path`` (shared
    storage on a cluster) in a folder of this output's own, so that two outputs sharing one
    ``--storage-path`` never resume each other's checkpoints."""
    import hashlib

    output = Path(output).resolve()
    if not storage_path:
        return output / "ray"
    return Path(storage_path).resolve() / f"{output.name}-{hashlib.sha1(str(output).encode()).hexdigest()[:10]}"


def has_checkpoint(storage: Path, name: str) -> bool:
    """Whether the Ray Train run ``storage/name`` holds a checkpoint (so that a rerun resumes from it)."""
    run = Path(storage) / name
    return run.is_dir() and any(p.name.startswith("checkpoint") for p in run.iterdir())


class TrainingFailedError(RuntimeError):
    """A Ray Train run that failed for good; the message says why in a line and where the logs are."""


def cpus_per_worker(requested: int | None, use_gpu: bool, num_workers: int, loader_workers: int = 0) -> int:
    """CPUs per Ray Train worker: as requested; else a GPU worker's own and one per DataLoader process
    (they decode and resize for it); else (CPU runs) the cluster's free CPUs shared out."""
    import ray

    if requested:
        return requested
    if use_gpu:
        return 1 + loader_workers
    return max(1, int(ray.available_resources().get("CPU", 1)) // num_workers)


def train_worker_rank(use_gpu: bool, cpus_per_worker: int | None) -> tuple[int, int]:
    """Inside a Ray Train worker: its (world rank, world size).

    A CPU worker runs as many torch threads as the CPUs it reserved; torch would otherwise
    take every core of the node, once per worker.
    """
    import ray.train
    import torch

    context = ray.train.get_context()
    if not use_gpu and cpus_per_worker:
        torch.set_num_threads(cpus_per_worker)
    return context.get_world_rank(), context.get_world_size()


def train_device(use_gpu: bool, device: str):
    """Inside a Ray Train worker: the torch device its loop computes on (see :data:`DEVICE_HELP`)."""
    import ray.train.torch
    import torch

    return ray.train.torch.get_device() if computes_on_gpu(use_gpu, device) else torch.device("cpu")


def fit_torch_trainer(loop, loop_config: dict, *, name: str, storage: Path, num_workers: int, use_gpu: bool,
                      cpus: int, max_failures: int, state_file: str | None, callbacks: list | None = None,
                      device: str = "auto") -> dict:
    """Run ``loop`` on a Ray Train (V2) ``TorchTrainer`` and return the last checkpoint's ``state_file``
    (``state_file=None``: a loop that keeps its own checkpoints; returns an empty dict).

    ``device``: see :data:`DEVICE_HELP` (the loop itself picks its device with :func:`train_device`).
    Checkpoints live under ``storage/name``; a later call with the same two resumes from the
    last one (Train V2 restores the run), and ``FailureConfig(max_failures)`` restarts a
    failed worker group from it. The two newest checkpoints are kept. ``callbacks``: Ray
    Train callbacks (Tune's ``TuneReportCallback`` when a Tune trial runs the trainer).
    """
    import ray.train
    import torch
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        # Held GPUs that the loop does not compute on: NCCL would look for them, gloo runs on CPU.
        torch_config=TorchConfig(backend="gloo") if use_gpu and not computes_on_gpu(use_gpu, device) else None,
        # With use_gpu, Ray adds one GPU to these; without the CPUs it would reserve none to decode with.
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            # Ray Train's print patch both logs a worker's print and, as Ray wraps the worker's stdout,
            # prints it (ray-project/ray#61075): each progress line reached the driver twice.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        first_line = next((line for line in reversed(str(exc).splitlines()) if line.strip()), type(exc).__name__)
        raise TrainingFailedError(
            f"training failed ({max_failures} restarts from the last checkpoint did not help): {first_line.strip()}; "
            f"logs and checkpoints under {storage / name}; the same command resumes from the last checkpoint") from None
    if state_file is None:
        return {}
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint; see the logs under {storage}")
    with result.checkpoint.as_directory() as directory:
        return torch.load(os.path.join(directory, state_file), map_location="cpu", weights_only=True)
