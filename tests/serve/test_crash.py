"""The real command, ``fraudflow serve``, killed with SIGKILL mid-stream, then restarted.

Clients stream decisions at the server and keep every response they get; its process group is
then killed with SIGKILL, so no shutdown code runs. Every acknowledged decision must be in the
audit log and in the feature state, and a server restarted on the same files (with two workers)
must answer each of them again with the very same response. The restarted server then shows
the multi-worker machinery: metrics summed over the workers, and one admin reload followed by
both workers. (Each start costs seconds of imports, so one test does all of it.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from fraudflow.serve.audit import AuditLog, read_decisions
from fraudflow.serve.state import SQLiteStore
from tests.helpers.service import (
    ADMIN,
    ADMIN_KEY,
    AUTH,
    CLIENT_KEY,
    SMALL_SIM,
    copy_of_run,
    metric_value,
    simulate_and_train,
    transaction,
)

CLIENTS = 4
ACKED = 300  # acknowledged decisions before the kill


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, run = simulate_and_train(tmp_path_factory.mktemp("crash"), SMALL_SIM)
    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``python -m fraudflow serve`` in its own process group, on a free port."""

    def __init__(self, run: Path, folder: Path, *, workers: int) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        args = ["serve", "--run", str(run), "--data-dir", str(folder / "data")]
        args += ["--workers", str(workers)]
        args += ["--port", self.url.rpartition(":")[2]]
        metrics_dir = folder / f"metrics-{self.url.rpartition(':')[2]}"
        env = os.environ | {
            "FRAUDFLOW_API_KEYS": CLIENT_KEY,
            "FRAUDFLOW_ADMIN_KEYS": ADMIN_KEY,
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        }
        self._log = (folder / "server.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fraudflow", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,  # the workers join its process group: one kill for all
        )

    def ready_versions(self, probes: int = 8) -> set[str | None]:
        """Model versions /readyz reports over new connections (each may reach either worker)."""
        seen: set[str | None] = set()
        for _ in range(probes):
            try:
                with httpx.Client(base_url=self.url, timeout=5) as one:
                    seen.add(one.get("/readyz").json().get("model_version"))
            except httpx.TransportError:
                seen.add(None)
        return seen

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while None in self.ready_versions():
            assert self.process.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.1)

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
        self._log.close()


def _transaction(client: int, i: int) -> dict[str, Any]:
    """Client k's i-th transaction: all within hours, so none leaves the state's retention."""
    at = datetime(2026, 3, 1, tzinfo=UTC) + timedelta(seconds=4 * i + client)
    return transaction(client * 1_000_000 + i, customer_id=f"c{client}", timestamp=at.isoformat())


def _stream(url: str, client: int, acked: dict[str, bytes], stop: threading.Event) -> None:
    with httpx.Client(base_url=url, headers=AUTH, timeout=10) as http:
        i = 0
        while not stop.is_set():
            tx = _transaction(client, i)
            try:
                response = http.post("/v1/decisions", json=tx)
            except httpx.TransportError:
                return  # the server is gone
            if response.status_code == 200:
                acked[tx["transaction_id"]] = response.content
            i += 1


def _stream_then_kill(server: ServerProcess) -> dict[str, bytes]:
    acked: dict[str, bytes] = {}
    stop = threading.Event()
    clients = [
        threading.Thread(target=_stream, args=(server.url, k, acked, stop)) for k in range(CLIENTS)
    ]
    for t in clients:
        t.start()
    deadline = time.monotonic() + 30
    while len(acked) < ACKED and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()  # mid-stream: the clients are still sending
    stop.set()
    for t in clients:
        t.join()
    assert len(acked) >= ACKED
    return acked


def _assert_recorded(data_dir: Path, acked: dict[str, bytes]) -> None:
    assert set(acked) <= set(read_decisions(data_dir / "audit.db")["transaction_id"])
    audit = AuditLog(data_dir / "audit.db")
    try:
        assert all(audit.lookup(tid) == body for tid, body in acked.items())
    finally:
        audit.close()
    with SQLiteStore(data_dir / "state.db") as store:
        # set_label answers whether the state holds the transaction (clearing a label is a no-op)
        assert all(store.set_label(tid, False) for tid in acked)


@pytest.mark.slow
def test_sigkill_loses_nothing_acknowledged_and_two_workers_restart(
    run_dir: Path, tmp_path: Path
) -> None:
    server = ServerProcess(run_dir, tmp_path, workers=1)
    try:
        server.wait_ready()
        acked = _stream_then_kill(server)
    finally:
        server.stop()
    _assert_recorded(tmp_path / "data", acked)

    again = ServerProcess(run_dir, tmp_path, workers=2)
    try:
        again.wait_ready()
        _replays_are_identical(again, acked)
        _metrics_sum_the_workers(again)
        _one_reload_reaches_both_workers(again, run_dir, tmp_path)
    finally:
        again.stop()


def _replays_are_identical(server: ServerProcess, acked: dict[str, bytes]) -> None:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as http:
        for tid, body in list(acked.items())[:: max(1, len(acked) // 50)]:
            tx = _transaction(*divmod(int(tid.removeprefix("tx-")), 1_000_000))
            assert http.post("/v1/decisions", json=tx).content == body


def _metrics_sum_the_workers(server: ServerProcess) -> None:
    for i in range(20):  # new connections: the kernel spreads them over the workers
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as one:
            assert one.post("/v1/decisions", json=_transaction(9, i)).status_code == 200
    with httpx.Client(base_url=server.url, timeout=10) as http:
        text = http.get("/metrics").text
    decisions = ("approve", "review", "block")
    total = sum(metric_value(text, "fraudflow_decisions_total", decision=d) for d in decisions)
    assert total == 20  # replays are not new decisions; whichever worker answers counts both


def _one_reload_reaches_both_workers(server: ServerProcess, run_dir: Path, tmp: Path) -> None:
    newer = copy_of_run(run_dir, tmp / "newer")
    with httpx.Client(base_url=server.url, headers=ADMIN, timeout=30) as http:
        reload = http.post("/v1/admin/reload", json={"run": str(newer)})
    assert reload.status_code == 200, reload.text
    version = reload.json()["model_version"]
    deadline = time.monotonic() + 30
    while (seen := server.ready_versions()) != {version}:
        assert time.monotonic() < deadline, seen
        time.sleep(0.2)
