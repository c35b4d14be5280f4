"""Output folders: one run at a time, and no rerun that mixes settings."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from dap_ray.runs import LOCK_NAME, OutputInUseError, check_same_settings, open_run, settings_differ


@pytest.mark.parametrize("saved, current, keys, expected", [
    ({}, {}, [], []),
    ({"a": 1}, {"a": 1}, ["a"], []),
    ({"a": [96, 192]}, {"a": (96, 192)}, ["a"], []),  # YAML lists and config tuples
    ({"a": 1}, {"a": 2}, ["a"], ["a"]),
    ({}, {"a": None}, ["a"], []),  # a key an older run did not have, at None
    ({"a": 1, "b": 2}, {"a": 1, "b": 3}, ["a"], []),  # only the named keys count
])
def test_settings_differ(saved, current, keys, expected):
    assert settings_differ(saved, current, keys) == expected


def test_a_rerun_with_other_settings_is_refused_naming_them(tmp_path):
    check_same_settings(tmp_path, {"lr": 0.1}, "a run", except_keys=["output"])  # no earlier run: fine
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"lr": 0.1, "output": "a", "workers": 2}))
    check_same_settings(tmp_path, {"lr": 0.1, "output": "b", "workers": 2}, "a run", except_keys=["output"])
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.1 then, 0.2 now\).*another --output"):
        check_same_settings(tmp_path, {"lr": 0.2, "output": "a", "workers": 2}, "a run", except_keys=["output"])


def test_one_run_at_a_time(tmp_path):
    with open_run(tmp_path / "out") as output:
        lock = json.loads((output / LOCK_NAME).read_text())
        assert lock["pid"] == os.getpid()
        with open_run(output):  # the same process again (a step calling a step): allowed
            pass
        assert (output / LOCK_NAME).exists()
        other = subprocess.run(
            [sys.executable, "-c", f"from dap_ray.runs import open_run\nwith open_run({str(output)!r}): pass"],
            capture_output=True, text=True)
        assert other.returncode != 0 and "is in use by another run" in other.stderr and str(os.getpid()) in other.stderr
    assert not (tmp_path / "out" / LOCK_NAME).exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    tmp_path.joinpath(LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    with open_run(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "taking over" in capsys.readouterr().out


def test_a_lock_held_on_another_host_is_respected(tmp_path):
    tmp_path.joinpath(LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "x"}))
    with pytest.raises(OutputInUseError, match="process 1 on elsewhere"):
        with open_run(tmp_path):
            pass
