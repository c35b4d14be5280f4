"""The jobs as a user runs them: killed and rerun, and through `ray job submit`."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def mine_args(dataset, output, *extra):
    sample, weights = dataset
    return ["jobs/mine.py", "--input", str(sample / "images"), "--class-map", str(sample / "classes.txt"),
            "--num-classes", "3", "--scales", "32", "64", "--batch-size", "2", "--shard-size", "8",
            "--rows-per-file", "4", "--output", str(output), *extra]


def kill_session(sid):
    """SIGKILL every process in session ``sid`` (a driver started with ``start_new_session``): Ray
    gives each worker a process group of its own, so killing the driver's group would leave
    workers that can still finish a write after the kill."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid:
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def written_ids(output):
    files = sorted((output / "boxes").glob("*.parquet")) + sorted((output / "errors").glob("*.parquet"))
    return [i for f in files for i in pq.read_table(f, columns=["image_id"]).column(0).to_pylist()]


@pytest.mark.resume
def test_mine_job_killed_then_rerun_resumes_and_writes_each_image_once(dataset, tmp_path):
    output = tmp_path / "out"
    command = [sys.executable, *mine_args(dataset, output, "--classifier", "tests.factories:slow_tiny_resnet")]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((output / "boxes").glob("*.parquet")) and first.poll() is None:
        time.sleep(0.2)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    kill_session(first.pid)
    first.wait()
    partial = len(written_ids(output))
    assert 0 < partial < 40
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming: {partial} images already" in second.stdout
    ids = written_ids(output)
    assert len(ids) == len(set(ids)) == 40


def test_mine_job_rejects_bad_input_clearly(tmp_path):
    result = subprocess.run([sys.executable, "jobs/mine.py", "--input", str(tmp_path / "nope"), "--output",
                             str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "image folder not found" in result.stderr and "Traceback" not in result.stderr
    assert "Ray instance" not in result.stdout + result.stderr  # refused before Ray started (it took 13 s)


@pytest.mark.parametrize("job", ["mine.py", "export_coco.py", "visualize.py"])
def test_jobs_answer_help(job):
    result = subprocess.run([sys.executable, f"jobs/{job}", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--output" in result.stdout


def test_ray_job_submit_to_a_local_head(dataset, tmp_path):
    """`ray job submit --working-dir .` against a real head on loopback, with token authentication."""
    # As from an activated virtual environment: the head runs the entrypoint's `python`.
    env = {**os.environ, "RAY_AUTH_MODE": "token",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    env.pop("RAY_ADDRESS", None)
    # Its own agent port: the session's Ray already holds the default one.
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--port=6391", "--dashboard-host=127.0.0.1",
         "--dashboard-port=8291", "--dashboard-agent-listen-port=52391", "--num-cpus=2", "--disable-usage-stats"],
        stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen("http://127.0.0.1:8291", timeout=2)
                break
            except OSError:
                assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
                time.sleep(1)
        output = tmp_path / "submitted"
        sample, weights = dataset
        for _attempt in range(10):  # the job agent comes up some seconds after the dashboard
            result = subprocess.run(
                [RAY, "job", "submit", "--address", "http://127.0.0.1:8291", "--working-dir", str(ROOT), "--",
                 "python", *mine_args(dataset, output, "--classifier", "tests.factories:tiny_resnet",
                                      "--weights", str(weights))],
                cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
            if "No available agent" not in result.stderr:
                break
            time.sleep(5)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "succeeded" in result.stdout + result.stderr
        assert len(set(written_ids(output))) == 40
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        marker = Path("/tmp/ray/ray_current_cluster")
        if marker.is_file() and marker.read_text().strip().endswith(":6391"):
            marker.unlink()
