"""Experiment tracking (dap_ray.tracking): where runs go, a clear error without MLflow, and runs
logged to a real local MLflow store (SQLite) read back with mlflow.search_runs."""

import sys

import pytest

from dap_ray.tracking import check_tracking, log_step, tracking_uri


def mlflow_runs(uri: str, step: str):
    """The runs of one step's experiment in the store at ``uri``, as mlflow.search_runs gives them."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[f"dap_ray/{step}"])


@pytest.mark.parametrize("flag, env, expected", [
    (None, None, None),
    (None, "http://tracker:5000", "http://tracker:5000"),
    ("sqlite:///x.db", "http://tracker:5000", "sqlite:///x.db"),  # the flag wins
    ("local", None, "sqlite:///{out}/mlflow.db"),
])
def test_tracking_uri(flag, env, expected, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if env:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    assert tracking_uri(flag, tmp_path) == (expected.format(out=tmp_path.resolve()) if expected else None)


def test_asking_for_tracking_without_mlflow_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert check_tracking(None, tmp_path) is None  # not asked: nothing imported, nothing checked
    with pytest.raises(ValueError, match=r"--mlflow-uri asks for MLflow tracking .* pip install 'dap_ray\[tracking\]'"):
        check_tracking("local", tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI asks for MLflow tracking"):
        check_tracking(None, tmp_path)


def test_a_step_run_with_children_reads_back(tmp_path):
    pytest.importorskip("mlflow")
    uri = tracking_uri("local", tmp_path)
    (tmp_path / "config.yaml").write_text("seeds: [0, 1]\n")
    run_id = log_step(uri, "finetune", tmp_path, {"seeds": [0, 1], "lr": 0.01}, step_key="iteration",
                      final={"AP_mean": 12.0, "AP_std": None}, artifacts=("config.yaml", "missing.png"),
                      children=[(f"seed {s}", {"seed": s}, [{"iteration": 2, "loss": 1.5 - s},
                                                             {"iteration": 4, "loss": 1.0 - s, "AP": 10.0 + s}],
                                 {"AP": 10.0 + s}) for s in (0, 1)])
    runs = mlflow_runs(uri, "finetune")
    assert len(runs) == 3
    parent = runs[runs.run_id == run_id].iloc[0]
    assert parent["params.lr"] == "0.01" and parent["params.seeds"] == "[0, 1]"
    assert parent["metrics.final/AP_mean"] == 12.0 and parent["status"] == "FINISHED"
    children = runs[runs["tags.mlflow.parentRunId"] == run_id].sort_values("params.seed")
    assert list(children["tags.mlflow.runName"]) == ["seed 0", "seed 1"]
    assert list(children["metrics.final/AP"]) == [10.0, 11.0]
    import mlflow

    history = mlflow.MlflowClient(uri).get_metric_history(children.iloc[1]["run_id"], "loss")
    assert sorted((m.step, m.value) for m in history) == [(2, 0.5), (4, 0.0)]
    artifacts = [a.path for a in mlflow.MlflowClient(uri).list_artifacts(run_id)]
    assert artifacts == ["config.yaml"] and (tmp_path / "mlartifacts").is_dir()
