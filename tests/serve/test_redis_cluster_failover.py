"""A Redis Cluster master killed mid-stream: decisions and /readyz answer 503 until its
replica takes over, then decisions again; nothing acknowledged is lost and no transaction is
applied twice (real cluster on loopback, ``tests.helpers.redis_cluster``)."""

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from fraudflow.serve.app import create_app
from fraudflow.serve.audit import read_decisions
from tests.helpers.redis_cluster import needs_redis_cluster, redis_cluster
from tests.helpers.service import (
    AUTH,
    SMALL_SIM,
    LiveServer,
    settings_for,
    simulate_and_train,
    transaction,
    wait_ready,
)

pytestmark = needs_redis_cluster


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, run = simulate_and_train(tmp_path_factory.mktemp("failover-run"), SMALL_SIM)
    return run


def _post(url: str, tx: dict[str, Any]) -> tuple[int, bytes]:
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        response = c.post("/v1/decisions", json=tx)
    return response.status_code, response.content


def _readiness(c: httpx.Client, status: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (got := c.get("/readyz")).status_code != status:
        assert time.monotonic() < deadline, f"/readyz stayed {got.status_code}: {got.text}"
        time.sleep(0.05)


class _Watch:
    """/readyz polled in a thread: the statuses it answered, in order, without repeats."""

    def __init__(self, url: str) -> None:
        self.seen: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(url,), daemon=True)
        self._thread.start()

    def _poll(self, url: str) -> None:
        with httpx.Client(base_url=url, timeout=10) as c:
            while not self._stop.is_set():
                status = c.get("/readyz").status_code
                if not self.seen or self.seen[-1] != status:
                    self.seen.append(status)
                time.sleep(0.02)

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.seen


@pytest.mark.slow
def test_a_master_killed_mid_stream_fails_over_and_loses_nothing(
    run_dir: Path, tmp_path: Path
) -> None:
    txs = [transaction(i, customer_id=f"c{i % 7}", terminal_id=f"t{i % 5}") for i in range(80)]
    acked: dict[str, bytes] = {}
    statuses: list[int] = []
    with redis_cluster(tmp_path / "cluster") as cluster:
        settings = settings_for(
            run_dir, tmp_path / "data", state=cluster.url, health_probe_seconds=0.2
        )
        with LiveServer(create_app(settings)) as live, live.client(headers=AUTH) as c:
            wait_ready(c)
            victim = cluster.masters()[0]
            watch = _Watch(live.url)
            with ThreadPoolExecutor(4) as pool:  # requests in flight as it dies
                flowing = pool.map(lambda tx: (tx, _post(live.url, tx)), txs[:40])
                time.sleep(0.2)
                cluster.kill(victim)
                for tx, (status, body) in flowing:
                    statuses.append(status)
                    if status == 200:
                        acked[tx["transaction_id"]] = body
            statuses.append(c.post("/v1/decisions", json=txs[40]).status_code)
            cluster.wait_ok(masters=3, replicas=2)  # the victim's replica took over
            _readiness(c, 200)
            assert watch.stop()[:3] == [200, 503, 200]  # unready until the failover
            for tx in txs[41:]:
                response = c.post("/v1/decisions", json=tx)
                statuses.append(response.status_code)
                assert response.status_code == 200, response.text
                acked[tx["transaction_id"]] = response.content
            assert victim not in cluster.masters()
            # Every transaction answers 200 now (a retry completes a lost decision), the
            # acknowledged ones byte-identical.
            again = {tx["transaction_id"]: c.post("/v1/decisions", json=tx) for tx in txs}
            assert {t: r.status_code for t, r in again.items()} == dict.fromkeys(again, 200)
            assert {t: again[t].content for t in acked} == acked
        assert set(statuses) <= {200, 503} and 503 in statuses
        ids = [tx["transaction_id"] for tx in txs]
        assert sorted(read_decisions(tmp_path / "data" / "audit.db")["transaction_id"]) == sorted(
            ids
        )
        with redis.RedisCluster(host="127.0.0.1", port=cluster.masters()[0]) as client:
            # Each transaction's writes done, and each in its card's events once.
            assert [client.hget(f"fraudflow:{{t:{t}}}", "d") for t in ids] == [b"3"] * len(ids)
            per_card = Counter(tx["customer_id"] for tx in txs)
            assert {k: client.zcard(f"fraudflow:{{c:{k}}}") for k in per_card} == per_card
