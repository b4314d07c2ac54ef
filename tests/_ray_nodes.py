"""A Ray cluster of several nodes on this machine, for tests: each node is a `ray start --block` process
in its own session, as if it were its own machine, so that a test can lose a whole node at once.

    cluster = RayNodes(root)          # root: a short directory (Ray's socket paths must stay short)
    cluster.start_head()              # no CPUs: Ray Train's controller only; this process joins it
    node = cluster.add_node()         # waits until the node is registered; node.node_id
    cluster.kill(node)                # SIGKILL to its `ray start`, raylet, agents and every worker
    cluster.shutdown()                # ray.shutdown() and every node, also after a failure

A node's processes share the session of its `ray start` (start_new_session=True): the raylet and its
agents, and also the Ray workers, which get a process group of their own but stay in that session.
`kill` therefore signals every process of the session, not one process group. The cluster uses its
own temp dir, and free ports wherever Ray has a fixed default, so it never meets another Ray on
this machine.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path
    node_id: str = ""

    def processes(self) -> list[psutil.Process]:
        """Every live process of this node (its session: `ray start` made it the session leader)."""
        found = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == self.proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                continue
        return found

    def kill(self) -> None:
        """SIGKILL to every process of the node; again until none is left (a raylet may have
        forked a worker while the first round was sent)."""
        while procs := self.processes():
            for p in procs:
                try:
                    p.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(procs, timeout=30)
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)


class RayNodes:
    def __init__(self, root: Path, start_timeout: float = 180.0) -> None:
        self.root = Path(root)
        self.start_timeout = start_timeout
        self.nodes: list[Node] = []  # those that came up (the head first)
        self._started: list[Node] = []  # every `ray start`, failed attempts included
        self.env = dict(os.environ)
        # `ray start --head` turns token authentication on by itself when ~/.ray/auth_token exists;
        # this test cluster is as open as Ray's own `ray.cluster_utils.Cluster`.
        self.env["RAY_AUTH_MODE"] = "disabled"
        # No drain wait when the fixture stops a node: nothing runs on it that needs draining.
        self.env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        # Every process of the cluster (Ray workers inherit the raylet's environment) knows its
        # cluster: Ray's helpers that take no address (Ray Train's placement-group cleaner) would
        # otherwise stumble on the other Ray instances of this machine.
        self._use_port(free_port())

    def _use_port(self, port: int) -> None:
        """The head's GCS port. A port found free can be taken by someone else before `ray start`
        binds it, so every attempt to start the head picks a fresh one."""
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.env["RAY_ADDRESS"] = self.address

    def _start(self, name: str, args: list[str]) -> Node:
        log = self.root / f"{name}.log"
        ports = [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [RAY, "start", "--block", "--disable-usage-stats", *ports, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        node = Node(name, proc, log)
        self._started.append(node)
        return node

    def start_head(self) -> Node:
        """The head (GCS, no CPUs); this process joins it as the driver (`ray.init`), so the driver
        and Ray Train's controller (placed on the driver's node) live on the head."""

        def head_args(name: str) -> list[str]:
            self._use_port(free_port())
            return [
                "--head",
                f"--port={self.port}",
                "--num-cpus=0",
                f"--temp-dir={self.root / 'ray'}",
                # As on a real head: Ray Train's placement-group cleaner asks the dashboard's State API.
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={free_port()}",
                f"--ray-client-server-port={free_port()}",
            ]

        head = self._start_until_up("head", head_args, lambda name: self._join())
        (head.node_id,) = self._alive_node_ids()
        return head

    def _join(self) -> bool:
        import ray

        try:
            ray.init(address=self.address, logging_level="WARNING")
        except ConnectionError:
            return False
        return True

    def add_node(self, num_cpus: int = 1) -> Node:
        """A worker node, with a custom resource named like the node (`node<k>`); returns once Ray
        lists it alive. One at a time: nodes started together race for the same socket file names."""

        def args(name: str) -> list[str]:
            return [f"--address={self.address}", f"--num-cpus={num_cpus}", f'--resources={{"{name}": 1}}']

        node = self._start_until_up(f"node{len(self.nodes)}", args, self._alive_with)
        node.node_id = self._alive_with(node.name)
        return node

    def _start_until_up(self, base: str, args, ready, attempts: int = 3) -> Node:
        """Start a node (`args(name)`) and wait until `ready(name)`; `name` is `base`, then
        `base-retry<k>`.

        `ray start` gives its raylet 30 s (hard-coded) to appear in the GCS and exits otherwise, which
        happens on a starved machine: then the node is started again. Each attempt has a name (and a
        worker node a custom resource) of its own, so a failed attempt Ray still lists is never taken
        for the node."""
        for attempt in range(1, attempts + 1):
            name = base if attempt == 1 else f"{base}-retry{attempt - 1}"
            node = self._start(name, args(name))
            try:
                self._wait(node, functools.partial(ready, name))
                self.nodes.append(node)
                return node
            except RuntimeError:
                node.kill()
                if attempt == attempts:
                    raise
                logger.warning(f"{name} did not come up (attempt {attempt}): {self._tail(node)[-500:]}")
        raise AssertionError("unreachable")

    def _alive_with(self, resource: str) -> str:
        """The id of the live node that has `resource`, '' if none."""
        import ray

        return next((n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"]), "")

    def kill(self, node: Node) -> None:
        """Lose the node: SIGKILL to every process of it at once, as when its machine goes away."""
        node.kill()

    def wait_dead(self, node: Node, timeout: float = 120.0) -> None:
        """Until Ray's GCS has marked the node dead (it misses its health checks)."""
        deadline = time.time() + timeout
        while node.node_id in self._alive_node_ids():
            if time.time() > deadline:
                raise TimeoutError(f"Ray still lists node {node.node_id} alive {timeout}s after its loss")
            time.sleep(0.2)

    def shutdown(self) -> None:
        """Leave the cluster, then stop every node this object started (SIGTERM, then SIGKILL)."""
        import ray

        ray.shutdown()
        for node in reversed(self._started):
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in reversed(self._started):
            try:
                node.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            node.kill()  # what SIGTERM left behind (agents, workers of a node whose raylet died)

    def _alive_node_ids(self) -> list[str]:
        import ray

        return [n["NodeID"] for n in ray.nodes() if n["Alive"]]

    def _wait(self, node: Node, ready) -> None:
        deadline = time.time() + self.start_timeout
        while not ready():
            if node.proc.poll() is not None:
                raise RuntimeError(
                    f"{node.name} exited ({node.proc.returncode}):\n{node.log.read_text()[-3000:]}"
                )
            if time.time() > deadline:
                raise TimeoutError(
                    f"{node.name} not up after {self.start_timeout}s:\n{node.log.read_text()[-3000:]}"
                )
            time.sleep(0.5)

    @staticmethod
    def _tail(node: Node) -> str:
        return node.log.read_text(errors="replace")[-3000:]
