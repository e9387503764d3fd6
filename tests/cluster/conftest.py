"""A real Ray cluster of two nodes on this machine: what only several nodes show.

Each node is its own `ray start --block` in a session of its own (setsid), with its own
temp dir, working directory, ports and a custom resource naming it, as measured in
../shared/ENVIRONMENT.md ("Measured 2026-12-01"). Tasks and actors then run in the
working directory of their node's `ray start`, not the driver's, as on a real cluster.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

RAY = Path(sys.executable).with_name("ray")
NODE_CPUS = 3
OBJECT_STORE_BYTES = 256 * 1024**2
WORKER_PORTS_PER_NODE = 100
START_DEADLINE_S = 120.0
STOP_DEADLINE_S = 20.0
# How fast the GCS declares a silent raylet dead: 1 s x 5 missed health checks, instead
# of the defaults (3 s x 5, ray_config_def.h), so a chaos test waits seconds, not ~15 s+.
HEAD_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5"}

_cluster_ids = itertools.count(1)


@dataclass(frozen=True)
class RayNode:
    """One `ray start` process group: `resource` is the custom resource that places work on it."""

    name: str
    resource: str
    temp_dir: Path
    work_dir: Path
    log_path: Path
    process: subprocess.Popen = field(repr=False, compare=False)


@dataclass(frozen=True)
class _Ports:
    gcs: int
    dashboard: int
    client_server: int
    per_node: dict[str, dict[str, int]]
    worker_ranges: dict[str, tuple[int, int]]


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports free right now (bound to 0 together, then released)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _free_port_ranges(count: int, size: int) -> list[tuple[int, int]]:
    """Disjoint ranges of free ports below Linux's ephemeral range (32768+), like Ray's own
    default worker ports, so outgoing connections never take one."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    ranges: list[tuple[int, int]] = []
    for _ in range(200):
        low = rng.randrange(20000, 32700 - size)
        high = low + size - 1
        if any(low <= h and l <= high for l, h in ranges):
            continue
        if all(_port_is_free(p) for p in range(low, high + 1)):
            ranges.append((low, high))
            if len(ranges) == count:
                return ranges
    raise RuntimeError(f"found no {count} free ranges of {size} ports in 20000-32700: "
                       "another process holds most of them; free some or lower WORKER_PORTS_PER_NODE")


def _pick_ports(names: list[str]) -> _Ports:
    keys = ("node_manager", "object_manager", "agent_listen", "agent_grpc", "runtime_env", "metrics")
    ports = iter(_free_ports(3 + len(keys) * len(names)))
    gcs, dashboard, client_server = next(ports), next(ports), next(ports)
    per_node = {name: {k: next(ports) for k in keys} for name in names}
    ranges = _free_port_ranges(len(names), WORKER_PORTS_PER_NODE)
    return _Ports(gcs, dashboard, client_server, per_node, dict(zip(names, ranges, strict=True)))


def _start_command(name: str, resource: str, temp_dir: Path, ports: _Ports,
                   extra: dict[str, float] | None = None) -> list[str]:
    own = ports.per_node[name]
    low, high = ports.worker_ranges[name]
    cmd = [
        str(RAY), "start", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
        f"--num-cpus={NODE_CPUS}", "--num-gpus=0", f"--resources={json.dumps({resource: 1, **(extra or {})})}",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        f"--node-manager-port={own['node_manager']}", f"--object-manager-port={own['object_manager']}",
        f"--dashboard-agent-listen-port={own['agent_listen']}",
        f"--dashboard-agent-grpc-port={own['agent_grpc']}",
        f"--runtime-env-agent-port={own['runtime_env']}", f"--metrics-export-port={own['metrics']}",
        f"--min-worker-port={low}", f"--max-worker-port={high}",
    ]
    if name == "head":
        return cmd + [
            "--head", f"--port={ports.gcs}", f"--ray-client-server-port={ports.client_server}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports.dashboard}",
        ]
    return cmd + [f"--address=127.0.0.1:{ports.gcs}"]


def _node_env(name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    # As after `source .venv/bin/activate` (the README's way to start nodes): a Ray job's
    # entry point (`r1lab run ...`) is found on the node's PATH.
    env["PATH"] = f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}"
    if name == "head":
        env.update(HEAD_ENV)
    return env


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"(cannot read {path}: {err})"


def _node_pids(pgid: int, temp_dir: Path) -> list[int]:
    """Live processes of one node: its process group, and every process whose command line
    names its temp dir (Ray's workers call setsid and leave the group). Zombies don't count."""
    needle = str(temp_dir).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after its ")".
            state, _ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
            if state != "Z" and (int(pgrp) == pgid or needle in (entry / "cmdline").read_bytes()):
                pids.append(int(entry.name))
        except (OSError, ValueError):
            continue  # the process ended while we read it
    # Actor processes retitle themselves ("ray::RolloutActor"), dropping the temp dir from
    # their command line: they are found as the raylet's descendants.
    import psutil

    for pid in list(pids):
        try:
            pids += [c.pid for c in psutil.Process(pid).children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE]
        except psutil.Error:
            continue
    return sorted(set(pids))


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class TwoNodeCluster:
    """A head and a worker node started as separate `ray start` process groups.

    `gcs_address` is what `ray.init(address=...)` takes; `dashboard_url` serves the Jobs
    and state APIs. `nodes["head"]`, `nodes["worker"]` carry each node's temp dir,
    working dir and resource label. `kill_node(name)` SIGKILLs a node and its workers.
    """

    def __init__(self, base: Path, names: tuple[str, ...] = ("head", "worker"),
                 extra_resources: dict[str, dict[str, float]] | None = None):
        """``names``: the nodes, "head" first; ``extra_resources``: custom resources a node
        offers besides its own ``node_<name>`` (several nodes may offer one)."""
        self._stopped = False
        self.extra_resources = extra_resources or {}
        self.base = base
        self.ports = _pick_ports(list(names))
        self.gcs_address = f"127.0.0.1:{self.ports.gcs}"
        self.dashboard_url = f"http://127.0.0.1:{self.ports.dashboard}"
        self.nodes: dict[str, RayNode] = {}
        # Unix socket paths are capped near 107 characters: keep temp dirs short.
        tag = f"{os.getpid()}-{next(_cluster_ids)}"
        self._temp_dirs = {name: Path(f"/tmp/r1c-{tag}-{name}") for name in names}
        atexit.register(self.stop)

    def start(self, only: tuple[str, ...] | None = None) -> TwoNodeCluster:
        """Start the nodes (or those in ``only``; the others can join later, ``start_node``)."""
        for name, temp_dir in self._temp_dirs.items():
            if only is not None and name not in only:
                continue
            self.nodes[name] = self._launch(name, temp_dir)
            if name == "head":
                self._wait_for_gcs()
        self._wait_started()
        return self

    def start_node(self, name: str) -> float:
        """Start node ``name`` (a replacement joining, as an autoscaler's would); returns the
        seconds until the cluster reports it alive."""
        t0 = time.monotonic()
        node = self.nodes[name] = self._launch(name, self._temp_dirs[name])

        def running() -> None:
            if node.process.poll() is not None:
                self._fail_start(name, f"exited with code {node.process.returncode}")

        self.wait_for_state({name}, "ALIVE", START_DEADLINE_S, check=running)
        return time.monotonic() - t0

    def _launch(self, name: str, temp_dir: Path) -> RayNode:
        node_dir = self.base / name
        work_dir = node_dir / "work"
        work_dir.mkdir(parents=True)
        temp_dir.mkdir(parents=True)
        log_path = node_dir / "ray-start.log"
        resource = f"node_{name}"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                _start_command(name, resource, temp_dir, self.ports, self.extra_resources.get(name)), cwd=work_dir,
                env=_node_env(name),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # setsid: the node is one process group to signal
            )
        return RayNode(name, resource, temp_dir, work_dir, log_path, process)

    def _fail_start(self, name: str, why: str) -> None:
        """Raise naming the node and where its logs are (copied out: teardown removes temp dirs)."""
        node = self.nodes[name]
        logs = node.log_path.parent / "ray-logs"
        session_logs = node.temp_dir / "session_latest" / "logs"
        if session_logs.is_dir():
            shutil.copytree(session_logs, logs, dirs_exist_ok=True, ignore_dangling_symlinks=True)
        raise RuntimeError(
            f"Ray node {name!r} (resource {node.resource}) {why}.\n"
            f"`ray start` output: {node.log_path}\n"
            f"Ray's logs (raylet.err, gcs_server.err, ...): {logs}\n"
            f"last lines of `ray start`:\n{_tail(node.log_path)}"
        )

    def _check_running(self) -> None:
        for name, node in self.nodes.items():
            if node.process.poll() is not None:
                self._fail_start(name, f"exited with code {node.process.returncode}")

    def _wait_for_gcs(self) -> None:
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            self._check_running()
            try:
                socket.create_connection(("127.0.0.1", self.ports.gcs), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        self._fail_start("head", f"opened no GCS port {self.ports.gcs} within {START_DEADLINE_S:.0f} s")

    def _wait_started(self) -> None:
        try:
            self.wait_for_state(set(self.nodes), "ALIVE", START_DEADLINE_S, check=self._check_running)
        except TimeoutError as err:
            late = sorted(n for n in self.nodes if err.args[1].get(n) != "ALIVE")
            self._fail_start(late[0], f"was not reported alive within {START_DEADLINE_S:.0f} s "
                                      f"(the dashboard {self.dashboard_url} saw {err.args[1] or 'nothing'})")

    def node_infos(self) -> dict[str, dict]:
        """Each node as the cluster reports it (`state` "ALIVE" or "DEAD", `node_id`), by
        node name; a node the cluster has not registered yet is missing."""
        from ray.util.state import list_nodes

        found = {}
        for info in list_nodes(address=self.dashboard_url, timeout=10, raise_on_missing_output=False):
            for name, node in self.nodes.items():
                if node.resource in (info.resources_total or {}):
                    found[name] = {"state": info.state, "node_id": info.node_id}
        return found

    def wait_for_state(self, names: set[str], state: str, deadline_s: float, check=lambda: None) -> float:
        """Wait until every node in `names` is reported in `state`; return the seconds it
        took. Raises TimeoutError(message, last states seen) at the deadline."""
        start = time.monotonic()
        seen: dict[str, str] = {}
        while time.monotonic() - start < deadline_s:
            check()
            try:
                seen = {name: info["state"] for name, info in self.node_infos().items()}
            except Exception:  # the dashboard is not serving yet: poll on to the deadline
                seen = {}
            if all(seen.get(n) == state for n in names):
                return time.monotonic() - start
            time.sleep(0.5)
        late = sorted(n for n in names if seen.get(n) != state)
        raise TimeoutError(f"nodes {late} not {state} after {deadline_s:.0f} s (last seen: {seen})", seen)

    def kill_node(self, name: str) -> None:
        """SIGKILL a node's process group and its workers: a machine lost without warning."""
        if name not in self.nodes:
            raise KeyError(f"no node {name!r}: this cluster has {sorted(self.nodes)}")
        node = self.nodes[name]
        _signal_all(_node_pids(node.process.pid, node.temp_dir), signal.SIGKILL)
        node.process.wait(timeout=STOP_DEADLINE_S)

    def stop(self) -> None:
        """Disconnect this process if it is a driver here, SIGTERM every node's processes,
        SIGKILL what is left after STOP_DEADLINE_S, remove the temp dirs. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        self._disconnect_driver()
        # SIGTERM to the `ray start --block` leader alone: it stops its node in about 3 s.
        # SIGTERM to every process of the group at once took Ray over 20 s to wind down.
        _signal_all([node.process.pid for node in self.nodes.values()], signal.SIGTERM)
        self._wait_gone(STOP_DEADLINE_S)
        for node in self.nodes.values():
            _signal_all(_node_pids(node.process.pid, node.temp_dir), signal.SIGKILL)
        self._wait_gone(5.0)
        for temp_dir in self._temp_dirs.values():
            shutil.rmtree(temp_dir, ignore_errors=True)

    def _wait_gone(self, deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline and self._live_pids():
            time.sleep(0.2)

    def _live_pids(self) -> list[int]:
        for node in self.nodes.values():
            node.process.poll()  # reap our own child, or it lingers as a zombie
        return [pid for node in self.nodes.values() for pid in _node_pids(node.process.pid, node.temp_dir)]

    def _disconnect_driver(self) -> None:
        import ray

        # The runtime context may name the GCS by the machine's address rather than 127.0.0.1.
        if ray.is_initialized() and ray.get_runtime_context().gcs_address.endswith(f":{self.ports.gcs}"):
            ray.shutdown()


def _run_cluster(base: Path):
    cluster = TwoNodeCluster(base)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def ray_two_nodes(tmp_path_factory):
    """A two-node cluster shared by the session's cluster tests. Do not break it: a test
    that kills a node takes `ray_two_nodes_fresh`."""
    yield from _run_cluster(tmp_path_factory.mktemp("two-nodes"))


@pytest.fixture
def ray_two_nodes_fresh(tmp_path):
    """A two-node cluster of the test's own, for tests that kill nodes."""
    yield from _run_cluster(tmp_path / "cluster")


@pytest.fixture
def ray_driver():
    """Connects this process to a cluster with `ray_driver(cluster)`; disconnects after the test."""
    import ray

    def connect(cluster: TwoNodeCluster):
        if ray.is_initialized():
            raise RuntimeError("this process is already connected to a Ray cluster: "
                               "cluster tests must not share a process with the `ray_local` fixture")
        ray.init(address=cluster.gcs_address, log_to_driver=False)
        return ray

    yield connect
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_nodes_with_spare(tmp_path):
    """A head and a worker, and a spare node that joins on ``start_node("spare")`` (as an
    autoscaler's replacement would); the worker and the spare offer the resource "spot"."""
    cluster = TwoNodeCluster(tmp_path / "cluster", ("head", "worker", "spare"),
                             {"worker": {"spot": 1.0}, "spare": {"spot": 1.0}})
    try:
        yield cluster.start(only=("head", "worker"))
    finally:
        cluster.stop()
