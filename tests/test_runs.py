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
        other = subprocess.run(
            [sys.executable, "-c", f"from dap_ray.runs import open_run\nwith open_run({str(output)!r}): pass"],
            capture_output=True, text=True)
        assert other.returncode != 0 and "is in use by another run" in other.stderr and str(os.getpid()) in other.stderr
    again = subprocess.run(  # released at the end of the block
        [sys.executable, "-c", f"from dap_ray.runs import open_run\nwith open_run({str(tmp_path / 'out')!r}): pass"],
        capture_output=True, text=True)
    assert again.returncode == 0, again.stderr


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path, capsys):
    """The kernel drops a killed holder's flock: no stale lock to delete by hand."""
    holder = subprocess.Popen([sys.executable, "-c", f"import time\nfrom dap_ray.runs import open_run\n"
                               f"with open_run({str(tmp_path)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputInUseError, match=f"process {holder.pid} on"):
        with open_run(tmp_path):
            pass
    holder.kill()
    holder.wait()
    with open_run(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "has ended; this run takes it over" in capsys.readouterr().out


def test_outputs_sharing_a_storage_path_keep_their_checkpoints_apart(tmp_path):
    from dap_ray.steps.ray_setup import run_storage

    assert run_storage(None, tmp_path / "a") == (tmp_path / "a" / "ray").resolve()
    shared = [run_storage(str(tmp_path / "shared"), tmp_path / f / "seed_0") for f in ("dap", "cls")]
    assert shared[0] != shared[1] and all(p.parent == (tmp_path / "shared").resolve() for p in shared)
    assert run_storage(str(tmp_path / "shared"), tmp_path / "dap" / "seed_0") == shared[0]  # stable across runs
