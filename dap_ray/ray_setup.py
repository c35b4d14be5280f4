"""Connecting to Ray the same way from a laptop, a checkout, and `ray job submit`."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["init_ray"]


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
