"""Experiment tracking with MLflow (optional: ``pip install 'dap_ray[tracking]'``).

Each step run becomes one MLflow run in the experiment named after its step: parameters are
its resolved configuration, metrics its history (losses per logged iteration or epoch, AP per
evaluation, a sweep's objectives), artefacts its configuration, tables and figures. A sweep
is a parent run with one child per trial, a fine-tune of several seeds a parent with one
child per seed.

Runs are logged by the driver from the step's outputs once the step has written them, not by
Ray's workers as they go: one writer per store, and a store that is a file on the driver's
machine (``--mlflow-uri local``: ``sqlite:///OUTPUT/mlflow.db``) works on a cluster, where
workers on other nodes could not reach it. The URI comes from ``--mlflow-uri`` or
``MLFLOW_TRACKING_URI``; without either nothing is logged and MLflow is not imported.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Mapping

__all__ = ["MLFLOW_URI_HELP", "TrackedRun", "check_tracking", "log_step", "tracking_uri"]

MLFLOW_URI_HELP = ("log this run to MLflow at this tracking URI (default: $MLFLOW_TRACKING_URI; 'local': "
                   "sqlite:///OUTPUT/mlflow.db); needs pip install 'dap_ray[tracking]'")


def tracking_uri(flag: str | None, output: str | Path) -> str | None:
    """The tracking URI a run logs to: ``flag``, else ``$MLFLOW_TRACKING_URI``, else None; ``local``
    is a SQLite store in ``output``."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri == "local":
        return f"sqlite:///{Path(output).resolve() / 'mlflow.db'}"
    return uri


def check_tracking(flag: str | None, output: str | Path) -> str | None:
    """The tracking URI (see :func:`tracking_uri`), checked before a long run starts: MLflow must
    be installed when one is asked for. Raises ValueError naming the fix."""
    uri = tracking_uri(flag, output)
    if uri is None:
        return None
    try:
        import mlflow  # noqa: F401
    except ImportError:
        source = "--mlflow-uri" if flag else "MLFLOW_TRACKING_URI"
        raise ValueError(f"{source} asks for MLflow tracking ({uri}) but MLflow is not installed: "
                         "pip install 'dap_ray[tracking]' (or unset it)") from None
    return uri


def _plain_params(config: Mapping) -> dict[str, str]:
    """MLflow parameters: strings of at most 6,000 characters, lists as JSON."""
    return {key: (json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value))[:6000]
            for key, value in config.items()}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class TrackedRun:
    """One MLflow run, open while the ``with`` block lasts (a child of ``parent`` when given)."""

    def __init__(self, uri: str, experiment: str, name: str, output: str | Path, parent: TrackedRun | None = None):
        import mlflow

        self.mlflow = mlflow
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            artifacts = None
            if uri.startswith("sqlite:///"):  # beside the store, not in whatever folder the job ran from
                artifacts = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)
        else:
            experiment_id = found.experiment_id
        tags = {"mlflow.runName": name, "dap_ray.output": str(Path(output).resolve())}
        if parent is not None:
            tags["mlflow.parentRunId"] = parent.run_id
        self.run_id = self.client.create_run(experiment_id, tags=tags, run_name=name).info.run_id

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if kind else "FINISHED")

    def params(self, config: Mapping) -> None:
        items = list(_plain_params(config).items())
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=[self.mlflow.entities.Param(k, v)
                                                       for k, v in items[start:start + 100]])

    def metrics(self, rows: Iterable[Mapping], step_key: str | None = None, prefix: str = "") -> int:
        """Each finite number of each row as a metric, at step ``row[step_key]`` (else the row's
        position); returns how many were logged."""
        from mlflow.entities import Metric

        logged = []
        for position, row in enumerate(rows):
            step = int(row[step_key]) if step_key and _finite(row.get(step_key)) else position
            logged += [Metric(prefix + key.replace("@", "_at_"), float(value), 0, step)
                       for key, value in row.items() if key != step_key and _finite(value)]
        for start in range(0, len(logged), 1000):
            self.client.log_batch(self.run_id, metrics=logged[start:start + 1000])
        return len(logged)

    def artifacts(self, paths: Iterable[Path]) -> None:
        for path in paths:
            if Path(path).is_file():
                self.client.log_artifact(self.run_id, str(path))


def log_step(uri: str | None, step: str, output: str | Path, config: Mapping, history: Iterable[Mapping] = (),
             step_key: str | None = None, final: Mapping | None = None, artifacts: Iterable[str] = (),
             children: Iterable[tuple[str, Mapping, Iterable[Mapping], Mapping | None]] = ()) -> str | None:
    """Log one step run (nothing when ``uri`` is None): ``config`` as parameters, ``history`` rows as
    metrics at ``row[step_key]``, ``final`` metrics, files of ``output`` named in ``artifacts``;
    and each of ``children`` (name, parameters, history rows, final metrics) as a child run.
    Returns the run's id."""
    if uri is None:
        return None
    output = Path(output)
    with TrackedRun(uri, f"dap_ray/{step}", output.name or step, output) as run:
        run.params(config)
        run.metrics(history, step_key)
        if final:
            run.metrics([final], prefix="final/")
        run.artifacts(output / name for name in artifacts)
        for name, params, rows, last in children:
            with TrackedRun(uri, f"dap_ray/{step}", name, output, parent=run) as child:
                child.params(params)
                child.metrics(rows, step_key)
                if last:
                    child.metrics([last], prefix="final/")
    print(f"logged to MLflow ({uri}): experiment dap_ray/{step}, run {run.run_id}", flush=True)
    return run.run_id
