"""The cluster tier: several Ray nodes on this machine, started with Ray's own utilities.

``ray.cluster_utils.Cluster`` (a head that runs no work and worker nodes the tests add and
remove) for node loss; Ray's real autoscaler with its ``fake_multinode`` provider
(:func:`fake_autoscaling_cluster`) for autoscaling. Each cluster gets its own ``RAY_TMPDIR``,
and is torn down by the process ids it started (worker processes rename themselves
``ray::...``; ``ray stop`` would kill every Ray on the machine).

Run with ``python -m pytest -m cluster`` (``.ci/run`` does, after the main suite, which
leaves these tests out).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Ray Data's cluster autoscaler (in the driver: this process) averages utilisation over 10 s and asks
# for nodes at most every 10 s; 2 s each here, as the health checks below are shortened, so that the
# autoscaling tests wait on the pool's growth rather than on those windows. Read when ray.data is
# first imported, hence here. Users get the defaults (docs/clusters.md).
for _name in ("RAY_DATA_CLUSTER_UTIL_AVG_WINDOW_S", "RAY_DATA_MIN_GAP_BETWEEN_AUTOSCALING_REQUESTS"):
    os.environ.setdefault(_name, "2")
# Ray Train's controller looks for drained (preempted) nodes every 5 s; every second here, so that a
# notice a few seconds before the kill reaches the workers (a cloud's notice comes 30 s to 2 min
# ahead). The nodes, the controller's included, inherit this process's environment.
os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")
# A lost node is noticed in about 3 s instead of Ray's default 15 or so.
HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
FIGURES: list[str] = []  # one line per measured loss, printed at the end of the run


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("node loss: what was measured")
        for line in FIGURES:
            terminalreporter.write_line(line)


def record_figure(line: str) -> None:
    FIGURES.append(line)


@contextlib.contextmanager
def own_ray_environment():
    """``RAY_TMPDIR`` of this cluster's own (short: Ray's socket paths must stay under 108 bytes),
    token authentication off for the head and the driver alike; both restored afterwards."""
    tmp = tempfile.mkdtemp(prefix="dapc", dir="/tmp")
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_AUTH_MODE", "RAY_ADDRESS")}
    os.environ.update(RAY_TMPDIR=tmp, RAY_AUTH_MODE="disabled")
    os.environ.pop("RAY_ADDRESS", None)
    try:
        yield tmp
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        kill_processes_of(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def kill_processes_of(tmp: str) -> None:
    """SIGKILL every process whose environment or command line names ``tmp`` (this cluster's
    ``RAY_TMPDIR``): what a teardown missed, never another Ray on the machine."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            marks = (entry / "environ").read_bytes() + (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RAY_TMPDIR={tmp}".encode() in marks or tmp.encode() + b"/" in marks:
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGKILL)


def connect_driver(address: str) -> None:
    """This process as the driver, its checkout on the workers' path (tests.factories' models)."""
    import ray

    os.environ["RAY_ADDRESS"] = address
    ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}, log_to_driver=True)


@dataclass
class NodeCluster:
    """A ``ray.cluster_utils.Cluster``: a head with no CPUs (the driver's node; Ray Train's
    controller runs there) and worker nodes of ``cpus`` CPUs."""

    cluster: object
    cpus: int
    tmp: str = ""  # RAY_TMPDIR: the session's logs lie under it

    def add_worker(self, wait: bool = True):
        return self.cluster.add_node(wait=wait, num_cpus=self.cpus, object_store_memory=150 * 2**20)

    def worker_count(self) -> int:
        return len(self.cluster.worker_nodes)

    def node_of(self, node_id: str):
        return next(n for n in self.cluster.worker_nodes if n.node_id == node_id)

    def lose(self, node, how: str, deadline_s: float = 1.0) -> float:
        """Take ``node`` away: ``kill`` (every process at once) or ``preempt`` (drained with the
        PREEMPTION reason, as a cloud's spot reclaim notice does, then killed at the deadline).
        Returns the time of the kill (``time.time()``: compared with files' modification times)."""
        if how == "preempt":
            from ray._raylet import GcsClient
            from ray.core.generated import autoscaler_pb2

            reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
            deadline_ms = int((time.time() + deadline_s) * 1000)
            accepted, why = GcsClient(address=self.cluster.address).drain_node(
                node.node_id, reason, "spot instance reclaimed (test)", deadline_ms)
            assert accepted, why
            time.sleep(deadline_s)
        elif how != "kill":
            raise ValueError(f"how must be kill or preempt, got {how!r}")
        self.cluster.remove_node(node, allow_graceful=False)
        return time.time()


@pytest.fixture(scope="session")
def node_cluster():
    """A head with no CPUs and two worker nodes of 2 CPUs each; this process is the driver. One per
    session, as starting one takes about 10 s (each test tops it up with :func:`top_up`); the
    autoscaling tests, whose cluster this driver cannot join at the same time, run before it
    (pytest's file order)."""
    import ray
    from ray.cluster_utils import Cluster

    with own_ray_environment() as tmp:
        cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args={
            "num_cpus": 0, "object_store_memory": 100 * 2**20, "include_dashboard": False,
            "_system_config": HEALTH_CHECKS})
        try:
            nodes = NodeCluster(cluster, cpus=2, tmp=tmp)
            for _ in range(2):
                nodes.add_worker()
            cluster.wait_for_nodes()
            connect_driver(cluster.address)
            yield nodes
        finally:
            ray.shutdown()
            cluster.shutdown()


def top_up(nodes: NodeCluster, count: int = 2) -> None:
    """Add worker nodes until there are ``count`` (a test that lost some leaves the next one whole)."""
    while nodes.worker_count() < count:
        nodes.add_worker()
    nodes.cluster.wait_for_nodes()


def actor_nodes(class_fragment: str) -> list[str]:
    """Node ids of the alive actors whose class name contains ``class_fragment`` (from the GCS: the
    state API would need a dashboard, which these clusters do without)."""
    import ray

    return sorted({a["Address"]["NodeID"] for a in ray._private.state.actors().values()
                   if a["State"] == "ALIVE" and class_fragment in a["ActorClassName"]})


def wait_for(predicate, timeout: float, step: float = 0.1):
    """``predicate()``'s first truthy value within ``timeout`` seconds, else None."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return None


class LossSequence(threading.Thread):
    """In the background, while a test runs a step in the foreground: each time ``progressed(since)``
    says the run got further after the last loss (``since``: its ``time.time()``, 0 at first), take
    away the node running a ``fragment`` actor (``hows`` in turn: ``kill`` or ``preempt``), then add
    a node in its place, as a cloud autoscaler replaces a reclaimed instance.

    ``back_after``: seconds from each loss to a ``fragment`` actor alive on another node.
    """

    def __init__(self, nodes: NodeCluster, fragment: str, progressed, hows=("preempt", "kill"), timeout: float = 150,
                 notice_s: float = 1.0):
        super().__init__(daemon=True)
        self.nodes, self.fragment, self.progressed, self.hows, self.timeout = nodes, fragment, progressed, hows, timeout
        self.notice_s = notice_s  # a preempted node's drain deadline: the notice comes this long before the kill
        self.lost_at: list[float] = []
        self.back_after: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for how in self.hows:
                since = self.lost_at[-1] if self.lost_at else 0.0

                def target(since=since):
                    if not self.progressed(since):
                        return None
                    return [i for i in actor_nodes(self.fragment)
                            if any(n.node_id == i for n in self.nodes.cluster.worker_nodes)]
                node_ids = wait_for(target, self.timeout)
                if not node_ids:
                    return
                lost = self.nodes.node_of(node_ids[0])
                self.lost_at.append(self.nodes.lose(lost, how, deadline_s=self.notice_s))
                self.nodes.add_worker(wait=False)  # joins in a few seconds, as a cloud's replacement would
                if wait_for(lambda lost=lost: [i for i in actor_nodes(self.fragment) if i != lost.node_id], 120):
                    self.back_after.append(time.time() - self.lost_at[-1])
        except BaseException as exc:  # noqa: BLE001 - reported by check()
            self.error = exc

    def check(self) -> list[float]:
        self.join(timeout=30)
        if self.error is not None:
            raise self.error
        assert len(self.lost_at) == len(self.hows), f"the run ended after {len(self.lost_at)} of {len(self.hows)} losses"
        return self.back_after


# ---- Ray's autoscaler with fake nodes ------------------------------------------------------------

def fake_cluster_config(port: int, worker_types: dict, idle_timeout_minutes: float) -> dict:
    """A full cluster-launcher config for the ``fake_multinode`` provider (the wheel ships no example)."""
    return {
        "cluster_name": "dap-ray-fake", "max_workers": sum(t["max_workers"] for t in worker_types.values()),
        "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{port}"},
        "head_node_type": "head",
        "available_node_types": {"head": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                                 **{name: {"node_config": {}, "min_workers": 0, **spec}
                                    for name, spec in worker_types.items()}},
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "rsync_exclude": [], "rsync_filter": [],
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FakeAutoscalingCluster:
    address: str
    tmp: str

    def nodes_alive(self) -> list[dict]:
        import ray

        return [n for n in ray.nodes() if n["Alive"]]

    def gpu_nodes_alive(self) -> int:
        return sum(1 for n in self.nodes_alive() if n["Resources"].get("GPU", 0) > 0)


@contextlib.contextmanager
def fake_autoscaling_cluster(worker_types: dict, idle_timeout_minutes: float = 0.1):
    """A head with no CPUs or GPUs started by ``ray start`` with Ray's autoscaler over the
    ``fake_multinode`` provider, which launches local nodes of ``worker_types`` on demand
    (fake GPUs: Ray schedules them, torch sees none). This process is the driver."""
    import ray

    if ray.is_initialized():
        raise RuntimeError("this process is already the driver of another cluster (node_cluster, one per session): "
                           "run the autoscaling tests first (pytest's file order) or in a pytest run of their own")
    with own_ray_environment() as tmp:
        port = free_port()
        config = Path(tmp) / "autoscaling.json"
        config.write_text(json.dumps(fake_cluster_config(port, worker_types, idle_timeout_minutes)))
        # Fake GPU nodes refuse to start under an empty CUDA_VISIBLE_DEVICES (CI sets one): their GPUs are Ray's only.
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        ray_cli = str(Path(sys.executable).with_name("ray"))
        subprocess.run([ray_cli, "start", "--head", f"--port={port}", f"--autoscaling-config={config}",
                        "--num-cpus=0", "--num-gpus=0", "--include-dashboard=false",
                        "--object-store-memory=100000000", f"--temp-dir={tmp}",
                        f"--system-config={json.dumps(HEALTH_CHECKS)}"],
                       env=env, check=True, capture_output=True, timeout=120)
        try:
            connect_driver(f"127.0.0.1:{port}")
            yield FakeAutoscalingCluster(f"127.0.0.1:{port}", tmp)
        finally:
            ray.shutdown()
            # own_ray_environment kills what this cluster started, by its RAY_TMPDIR
