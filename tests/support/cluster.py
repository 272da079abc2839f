"""A real multi-process Ray cluster on loopback for tests: `ray start --head` plus one worker node.

Shaped like a deployment's pods, as far as one machine allows: every node has its own Ray temporary directory
(`--temp-dir`, which Ray allows per node) and its own home, cache ($NEURON_ATLAS_CACHE) and TMPDIR, so nothing a
node downloads or writes for itself is seen by another. (On one machine a node could still open another's files by
absolute path; the deployment-shaped test passes only URLs between nodes.)

Each node is started with ``ray start --block`` in a new session (its own process group), so the cluster
is stopped by signalling exactly those groups; any process that left them is found by the cluster's own
temporary directory in its command line and stopped by pid. Nothing machine-wide (no ``ray stop``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field


_TAKEN: set[int] = set()

# Idle workers a test Ray keeps (Ray's soft limit, num_workers_soft_limit): by default a node's CPU count, 1 or 2
# here (a deployment's pods have many), so Ray ended each idle worker after a second and every burst of read tasks
# started new worker processes. The session's local Ray (tests/conftest.py) and this cluster's nodes keep six.
IDLE_WORKERS_KEPT = 6


def free_port() -> int:
    """A port free now and not handed out before in this process (the OS may offer a just-closed one again)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _TAKEN:
            _TAKEN.add(port)
            return port


def _node_ports() -> list[str]:
    """Ports every node on one machine must not share (the defaults would collide between nodes)."""
    return [
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--dashboard-agent-grpc-port",
        str(free_port()),
        "--metrics-export-port",
        str(free_port()),
        "--runtime-env-agent-port",
        str(free_port()),
        "--node-manager-port",
        str(free_port()),
        "--object-manager-port",
        str(free_port()),
    ]


@dataclass
class LocalCluster:
    temp_dir: str
    gcs_port: int
    dashboard_port: int
    env: dict
    nodes: list[subprocess.Popen] = field(default_factory=list)
    killed: list[subprocess.Popen] = field(default_factory=list)  # nodes a test lost on purpose
    logs: list = field(default_factory=list)
    node_dirs: dict[int, str] = field(default_factory=dict)  # node pid -> its own folder (temp dir, home, cache)
    node_ports: dict[int, int] = field(default_factory=dict)  # node pid -> its raylet's node manager port

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def headers(self) -> dict:
        """What a client of this cluster's dashboard must send (the token when authentication is on)."""
        token = self.env.get("RAY_AUTH_TOKEN") if self.env.get("RAY_AUTH_MODE") == "token" else None
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _start(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(os.path.join(self.temp_dir, f"{name}.log"), "w")
        self.logs.append(log)
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        if "--head" in args:
            own = self.temp_dir
        else:  # short: Ray's unix sockets live under the temp dir and their paths are limited to 107 bytes
            own = tempfile.mkdtemp(prefix="rn-", dir="/tmp")
            args = [*args, "--temp-dir", own]
        env = dict(self.env)
        for variable, folder in (("HOME", "home"), ("NEURON_ATLAS_CACHE", "cache"), ("TMPDIR", "tmp")):
            env[variable] = os.path.join(own, "node", folder)
            os.makedirs(env[variable], exist_ok=True)
        ports = _node_ports()
        node = subprocess.Popen(
            [ray, "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1", *args, *ports],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.nodes.append(node)
        self.node_dirs[node.pid] = own
        self.node_ports[node.pid] = int(ports[ports.index("--node-manager-port") + 1])
        return node

    def node_by_id(self, node_id: str) -> subprocess.Popen | None:
        """The node process of a Ray node id (as the state API reports it), through its node manager port."""
        request = urllib.request.Request(f"{self.address}/nodes?view=summary", headers=self.headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            summary = json.load(response)["data"]["summary"]
        for entry in summary:
            raylet = entry.get("raylet", {})
            if raylet.get("nodeId") == node_id:
                port = int(raylet.get("nodeManagerPort", -1))
                return next((n for n in self.nodes if self.node_ports.get(n.pid) == port), None)
        return None

    def actors(self, class_name: str) -> list[dict]:
        """Live actors of `class_name` from Ray's state API (the dashboard's /api/v0/actors): node_id, pid, ..."""
        query = "filter_keys=class_name&filter_predicates=%3D&filter_values=" + class_name
        query += "&filter_keys=state&filter_predicates=%3D&filter_values=ALIVE&detail=true&limit=1000"
        request = urllib.request.Request(f"{self.address}/api/v0/actors?{query}", headers=self.headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.load(response)
        return answer["data"]["result"]["result"]

    def start(self, cpus_per_node: int = 1, workers: int = 1, object_store_bytes: int = 100 * 1024**2) -> None:
        common = ["--num-cpus", str(cpus_per_node), "--object-store-memory", str(object_store_bytes)]
        self._start(
            [
                "--head",
                "--port",
                str(self.gcs_port),
                "--include-dashboard",
                "true",
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(self.dashboard_port),
                "--ray-client-server-port",
                str(free_port()),
                "--temp-dir",
                self.temp_dir,
                *common,
            ],
            "head",
        )
        self.wait_for(lambda: self._alive_nodes() >= 1, 90, "the head node")
        for index in range(workers):
            self._start(["--address", f"127.0.0.1:{self.gcs_port}", *common], f"worker{index}")
        self.wait_for(lambda: self._alive_nodes() >= 1 + workers, 90, "the worker node(s)")

    def add_worker(self, cpus: int, object_store_bytes: int = 100 * 1024**2) -> subprocess.Popen:
        """Start one more worker node and wait until the cluster counts it."""
        before = self._alive_nodes()
        node = self._start(
            [
                "--address",
                f"127.0.0.1:{self.gcs_port}",
                "--num-cpus",
                str(cpus),
                "--object-store-memory",
                str(object_store_bytes),
            ],
            f"worker{len(self.nodes)}",
        )
        self.wait_for(lambda: self._alive_nodes() >= before + 1, 90, "the added worker node")
        return node

    def node_of(self, pid: int) -> subprocess.Popen | None:
        """The node whose session the process `pid` runs in."""
        try:
            with open(f"/proc/{pid}/stat") as handle:
                sid = int(handle.read().rsplit(")", 1)[1].split()[3])
        except (OSError, ValueError):
            return None
        return next((node for node in self.nodes if node.pid == sid), None)

    def kill_node(self, node: subprocess.Popen) -> None:
        """Lose a whole node: SIGKILL every process of its session (raylet, object store, its workers)."""
        for pid, _ in self.processes():
            if self.node_of(pid) is node:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        node.wait(timeout=30)
        self.killed.append(node)

    def _alive_nodes(self) -> int:
        for node in self.nodes:
            if node.poll() is not None and node not in self.killed:
                raise RuntimeError(f"a Ray node exited with {node.returncode}; see {self.temp_dir}/*.log")
        try:
            request = urllib.request.Request(f"{self.address}/nodes?view=summary", headers=self.headers)
            with urllib.request.urlopen(request, timeout=5) as response:
                summary = json.load(response)["data"]["summary"]
        except (OSError, ValueError, KeyError):
            return 0
        return sum(1 for node in summary if node.get("raylet", {}).get("state") == "ALIVE")

    def wait_for(self, condition, seconds: float, what: str) -> None:
        deadline = time.time() + seconds
        while time.time() < deadline:
            if condition():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {seconds} s waiting for {what}; logs in {self.temp_dir}")

    def processes(self) -> list[tuple[int, str]]:
        """(pid, command line) of every live process of this cluster: in the sessions its nodes were started
        in (Ray puts each worker in a process group of its own, but it stays in the node's session), naming
        its temporary directory, or descended from one of those (a job's driver runs in a new session)."""
        sessions = {node.pid for node in self.nodes}
        table = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    state, ppid, pgid, sid = handle.read().rsplit(")", 1)[1].split()[:4]
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError):
                continue
            if state != "Z":  # a zombie has exited and only waits for its parent to reap it
                table[int(entry)] = (int(ppid), int(pgid), int(sid), cmdline)
        folders = [self.temp_dir, *self.node_dirs.values()]
        ours = {
            pid
            for pid, (_, pgid, sid, cmd) in table.items()
            if sid in sessions or pgid in sessions or any(folder in cmd for folder in folders)
        }
        grown = True
        while grown:
            children = {pid for pid, (ppid, *_) in table.items() if ppid in ours} - ours
            ours |= children
            grown = bool(children)
        return sorted((pid, table[pid][3]) for pid in ours)

    def stop(self) -> None:
        for node in reversed(self.nodes):  # workers first, then the head
            try:
                os.killpg(node.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 8
        while time.time() < deadline and self.processes():
            time.sleep(0.5)
        for pid, _ in self.processes():  # whatever ignored SIGTERM
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        while time.time() < deadline and self.processes():
            time.sleep(0.2)
        for node in self.nodes:
            try:
                node.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for log in self.logs:
            log.close()
        if not self.processes():
            for folder in {self.temp_dir, *self.node_dirs.values()}:
                shutil.rmtree(folder, ignore_errors=True)


def start_cluster(workers: int = 1, auth_token: str | None = None) -> LocalCluster:
    """With `auth_token`, every node runs with Ray's token authentication on (RAY_AUTH_MODE=token and the token in
    RAY_AUTH_TOKEN, as KubeRay's authOptions sets them in each Ray pod): the Jobs API then refuses requests without
    that token."""
    # Short: Ray's unix sockets live under the temp dir and their paths are limited to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
    env = dict(
        os.environ,
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        # The GCS declares a node dead after 5 failed health checks, 3 s apart by default: a killed node is
        # noticed in about 15 s. 1 s apart here (each check still waits up to its default 10 s for an answer,
        # so a slow but live node on this busy machine is not declared dead): the node-loss test waits 5 s.
        RAY_health_check_period_ms="1000",
        RAY_num_workers_soft_limit=str(IDLE_WORKERS_KEPT),
    )
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    if auth_token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=auth_token)
    cluster = LocalCluster(temp_dir=temp_dir, gcs_port=free_port(), dashboard_port=free_port(), env=env)
    try:
        cluster.start(workers=workers)
    except BaseException:
        cluster.stop()
        raise
    return cluster
