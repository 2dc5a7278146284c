"""A real Redis Cluster on loopback for tests: three masters with one replica each.

Started with ``redis-server --cluster-enabled yes`` x6 and ``redis-cli --cluster create``
(skipped where the binaries are absent). A small ``cluster-node-timeout`` makes a killed
master's replica take over within a few seconds. With ``password``, every node requires it
(``--requirepass``, and ``--masterauth`` for its replica) and ``url`` carries it.
"""

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
needs_redis_cluster = pytest.mark.skipif(
    REDIS_SERVER is None or REDIS_CLI is None, reason="redis-server or redis-cli is absent"
)
NODE_TIMEOUT_MS = 1_000


def _free_ports(n: int) -> list[int]:
    """``n`` ports free with their cluster bus port (port + 10000)."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10_000 > 65_535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        ports.append(port)
    return ports


class RedisCluster:
    """Six redis-server processes forming a cluster; ``url`` names it for the service."""

    def __init__(self, folder: Path, *, password: str | None = None) -> None:
        self.folder = folder
        self.ports = _free_ports(6)
        self.password = password
        credentials = "" if password is None else f":{quote(password, safe='')}@"
        nodes = ",".join(f"127.0.0.1:{p}" for p in self.ports[:3])
        self.url = f"redis-cluster://{credentials}{nodes}"
        self._processes: dict[int, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        assert REDIS_SERVER is not None and REDIS_CLI is not None
        for port in self.ports:
            self._start_node(port)
        for port in self.ports:
            self._wait_listening(port)
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        auth = [] if self.password is None else ["-a", self.password, "--no-auth-warning"]
        subprocess.run(
            [REDIS_CLI, *auth, "--cluster", "create", *nodes, "--cluster-replicas", "1",
             "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        self.wait_ok(masters=3, replicas=3)

    def _start_node(self, port: int) -> None:
        assert REDIS_SERVER is not None
        folder = self.folder / str(port)
        folder.mkdir(parents=True, exist_ok=True)
        auth = [] if self.password is None else [
            "--requirepass", self.password, "--masterauth", self.password]  # fmt: skip
        self._processes[port] = subprocess.Popen(
            [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled",
             "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout",
             str(NODE_TIMEOUT_MS), "--save", "", "--appendonly", "no", *auth],
            cwd=folder, stdout=subprocess.DEVNULL,
        )  # fmt: skip

    def _wait_listening(self, port: int) -> None:
        deadline = time.monotonic() + 10
        while True:
            process = self._processes[port]
            assert process.poll() is None, f"redis-server exited with {process.returncode}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, f"redis-server did not listen on {port}"
                time.sleep(0.05)

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, password=self.password)

    def client(self, port: int | None = None) -> redis.RedisCluster:
        """A cluster client starting from ``port`` (the first node by default)."""
        start = self.ports[0] if port is None else port
        return redis.RedisCluster(host="127.0.0.1", port=start, password=self.password)

    def roles(self) -> dict[int, str]:
        """The role of each live node: "master", "slave", or "syncing" (a replica whose link
        to its master is not up yet)."""
        out = {}
        for port, process in self._processes.items():
            if process.poll() is not None:
                continue
            with suppress(redis.RedisError), self.node(port) as client:
                info = client.info("replication")
                role = str(info["role"])
                up = role == "master" or info.get("master_link_status") == "up"
                out[port] = role if up else "syncing"
        return out

    def masters(self) -> list[int]:
        return sorted(p for p, role in self.roles().items() if role == "master")

    def wait_ok(self, *, masters: int, replicas: int, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok and the roles count as given."""
        deadline = time.monotonic() + timeout
        while True:
            roles = self.roles()
            states = []
            for port in roles:
                with suppress(redis.RedisError), self.node(port) as client:
                    info = client.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    states.append("cluster_state:ok" in text)
            counts = (list(roles.values()).count("master"), list(roles.values()).count("slave"))
            if states and all(states) and counts == (masters, replicas):
                return
            assert time.monotonic() < deadline, f"cluster not ready: {roles}, {states}"
            time.sleep(0.1)

    def kill(self, port: int) -> None:
        process = self._processes[port]
        process.kill()
        process.wait(timeout=10)

    def stop(self) -> None:
        for process in self._processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


@contextmanager
def redis_cluster(folder: Path, *, password: str | None = None) -> Iterator[RedisCluster]:
    """A started cluster in ``folder``; stopped on exit."""
    cluster = RedisCluster(folder, password=password)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
