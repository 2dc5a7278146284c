"""The Redis state on a real Redis Cluster (three masters, one replica each, on loopback):
the batch features, keys spread over every master, idempotent writes completed after a
failure, and one decision per transaction across two service replicas.

A killed master is in ``test_redis_cluster_failover``.
"""

import uuid
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
import redis

from fraudflow.errors import ConfigError
from fraudflow.features.online import Event, OnlineFeatures, Window
from fraudflow.serve.app import create_app
from fraudflow.serve.audit import read_decisions
from fraudflow.serve.idempotency import RedisLedger
from fraudflow.serve.redis_shards import cluster_nodes, cluster_options
from fraudflow.serve.state import RedisStore
from tests.features.test_online import SIM_CFG, assert_matches_batch, replay, simulated
from tests.helpers.redis_cluster import RedisCluster, needs_redis_cluster, redis_cluster
from tests.helpers.service import (
    AUTH,
    SMALL_SIM,
    LiveServer,
    settings_for,
    simulate_and_train,
    wait_ready,
)

pytestmark = needs_redis_cluster

PASSWORD = "s3cret/@:pass"  # characters a URL must percent-encode


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    # Every node requires a password: the URL's credentials reach every node it discovers.
    with redis_cluster(tmp_path_factory.mktemp("cluster"), password=PASSWORD) as started:
        yield started


def _prefix() -> str:
    """A key space of its own, without a hash tag (keys hash by what they belong to)."""
    return f"test-{uuid.uuid4().hex[:8]}:"


def _frame() -> pl.DataFrame:
    return simulated(n_customers=20, n_terminals=40, n_days=40)  # ~1300 events


def test_cluster_replay_matches_batch_and_spreads_keys_over_every_master(
    cluster: RedisCluster,
) -> None:
    prefix = _prefix()
    with RedisStore(cluster.url, prefix=prefix) as store:
        online = OnlineFeatures(cfg=SIM_CFG, store=store)
        frame = _frame()
        assert_matches_batch(replay(frame, SIM_CFG, lambda _: online), frame, SIM_CFG)
    for port in cluster.masters():
        with cluster.node(port) as node:
            kinds = {key[len(prefix) : len(prefix) + 3] for key in node.scan_iter(prefix + "*")}
        # customers' and terminals' events and transactions' records on each master
        assert {b"{c:", b"{m:", b"{t:"} <= kinds, (port, kinds)


def test_two_replicas_on_a_cluster_equal_one_store(cluster: RedisCluster) -> None:
    frame = _frame()
    prefix = _prefix()
    with RedisStore(cluster.url, prefix=prefix) as a, RedisStore(cluster.url, prefix=prefix) as b:
        replicas = [OnlineFeatures(cfg=SIM_CFG, store=s) for s in (a, b)]
        alternating = replay(frame, SIM_CFG, lambda i: replicas[i % 2])
    with RedisStore(cluster.url, prefix=_prefix()) as store:
        one = OnlineFeatures(cfg=SIM_CFG, store=store)
        assert alternating == replay(frame, SIM_CFG, lambda _: one)


_WINDOWS = [Window("customer", 1_000, amounts=True), Window("terminal", 1_000)]


def _events(n: int) -> list[Event]:
    return [Event(f"tx{i}", 100 + i, f"c{i % 3}", f"t{i % 5}", float(i)) for i in range(n)]


def _state(cluster: RedisCluster, prefix: str) -> dict[bytes, object]:
    """Every key of ``prefix`` on the masters, with its value (sets as member/score lists)."""
    out: dict[bytes, object] = {}
    for port in cluster.masters():
        with cluster.node(port) as node:
            for key in node.scan_iter(prefix + "*"):
                kind = node.type(key)
                if kind == b"zset":
                    out[key] = node.zrange(key, 0, -1, withscores=True)
                elif kind == b"hash":
                    out[key] = node.hgetall(key)
                else:
                    out[key] = node.get(key)
    return out


def test_reapplying_changes_nothing_and_a_half_done_group_is_completed(
    cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = _prefix()
    events = _events(20)
    with RedisStore(cluster.url, prefix=prefix) as store:
        first = store.apply_many(events[:10], _WINDOWS, forget_until_us=0)
        assert first.fresh.all()
        before = _state(cluster, prefix)
        again = store.apply_many(events[:10], _WINDOWS, forget_until_us=0)
        assert not again.fresh.any() and _state(cluster, prefix) == before

        # A node error after the records were claimed, before the events were written.
        def fail(*args: object, **kwargs: object) -> None:
            raise redis.exceptions.ConnectionError("node lost")

        with monkeypatch.context() as m:
            m.setattr(RedisStore, "_entities", fail)
            with pytest.raises(redis.exceptions.ConnectionError):
                store.apply_many(events[10:15], _WINDOWS, forget_until_us=0)
        records = [store.record_key(e.transaction_id) for e in events[10:15]]
        with cluster.client() as client:
            assert [client.hget(k, "d") for k in records] == [b"0"] * 5  # claimed, not done
            retry = store.apply_many(events[10:20], _WINDOWS, forget_until_us=0)
            assert retry.fresh.tolist() == [False] * 5 + [True] * 5
            assert [client.hget(k, "d") for k in records] == [b"3"] * 5  # completed
    # The events counted once each: the same state as one store applying them in one go.
    with RedisStore(cluster.url, prefix=_prefix()) as one:
        one.apply_many(events[:20], _WINDOWS, forget_until_us=0)
        probe = [Event("probe", 10_000, f"c{k}", f"t{k}", 0.0) for k in range(3)]
        probe_windows = [Window("customer", 20_000, amounts=True), Window("terminal", 20_000)]
        expected = one.read(probe, probe_windows)
    with RedisStore(cluster.url, prefix=prefix) as store:
        got = store.read(probe, probe_windows)
    assert got.count.tolist() == expected.count.tolist() == [[7, 7, 6], [4, 4, 4]]
    assert got.amount.tolist() == expected.amount.tolist()


def test_a_label_reaches_both_entities_on_other_masters(cluster: RedisCluster) -> None:
    prefix = _prefix()
    with RedisStore(cluster.url, prefix=prefix) as store:
        store.apply_many(_events(10), [], forget_until_us=0)
        assert store.set_label("tx4", True) and not store.set_label("nope", True)
        probe = [Event("probe", 10_000, "c1", "t4", 0.0)]
        windows = [Window("customer", 20_000), Window("terminal", 20_000)]
        assert store.read(probe, windows).frauds.tolist() == [[1], [1]]
        assert store.set_label("tx4", False)
        assert store.read(probe, windows).frauds.tolist() == [[0], [0]]


def test_the_ledger_keeps_a_small_response_and_its_vocabulary_on_the_cluster(
    cluster: RedisCluster,
) -> None:
    from fraudflow.serve.audit import DecisionRecord

    prefix = _prefix()
    ledger = RedisLedger(cluster.url, ttl_seconds=3_600, prefix=prefix)
    bodies = []
    for i, version in enumerate(["gbdt-20260301", "gbdt-1"]):  # compact; kept whole
        body = (b'{"transaction_id":"tx-%d","score":0.0123,"decision":"approve","reasons":[],'
                b'"model_version":"gbdt-20260301"}' % i)  # fmt: skip
        record = DecisionRecord(f"tx-{i}", 0, "c", "t", 1.0, 0.0123, 0.0123, "approve",
                                version, 0, b"", body, ())  # fmt: skip
        ledger.put([record])
        bodies.append(body)
    ledger.close()
    again = RedisLedger(cluster.url, ttl_seconds=3_600, prefix=prefix)
    assert [again.get("tx-0"), again.get("tx-1"), again.get("tx-2")] == [*bodies, None]
    again.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, run = simulate_and_train(tmp_path_factory.mktemp("cluster-run"), SMALL_SIM)
    return run


def test_two_service_replicas_on_a_cluster_decide_a_transaction_once(
    cluster: RedisCluster, run_dir: Path, tmp_path: Path
) -> None:
    """A retry that lands on another replica (own audit log, shared cluster) gets the same
    answer, and the state holds the transaction once."""
    tx = {"transaction_id": "replica-1", "timestamp": "2026-03-01T10:00:00Z",
          "customer_id": "c", "terminal_id": "t", "amount": 42.0}  # fmt: skip
    answers = []
    for replica in ("a", "b"):
        app = create_app(settings_for(run_dir, tmp_path / replica, state=cluster.url))
        with LiveServer(app) as live, live.client(headers=AUTH) as client:
            wait_ready(client)
            assert client.get("/readyz").status_code == 200
            answers.append(client.post("/v1/decisions", json=tx | {"amount": 1.0 + len(answers)}))
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].content == answers[1].content
    assert read_decisions(tmp_path / "a" / "audit.db").height == 1
    assert read_decisions(tmp_path / "b" / "audit.db").height == 0  # b only replayed a's answer
    with cluster.client() as client:
        assert client.zcard("fraudflow:{c:c}") == 1  # stored once, by a


def test_a_cluster_url_without_the_password_is_refused(cluster: RedisCluster) -> None:
    _, _, nodes = cluster.url.rpartition("@")
    for wrong in ("", ":wrong@"):
        refused = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException)
        with pytest.raises(refused, match=r"(?i)auth|password"):
            RedisStore(f"redis-cluster://{wrong}{nodes}", prefix=_prefix()).read([], [])


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("redis-cluster://h:1,h:2", {}),
        ("redis-cluster://:p%40ss@h:1,h:2", {"password": "p@ss"}),
        ("redis-cluster://ann:pw@h:1", {"username": "ann", "password": "pw"}),
        ("rediss-cluster://:pw@h:1,h:2", {"password": "pw", "ssl": True}),
        ("rediss-cluster://h:1/?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required",
         {"ssl": True, "ssl_ca_certs": "/etc/ca.pem", "ssl_cert_reqs": "required"}),
    ],
)  # fmt: skip
def test_cluster_url_credentials_and_tls_read_as_redis_py_reads_one_node(
    url: str, options: dict[str, object]
) -> None:
    assert cluster_options(url) == options
    assert cluster_nodes(url)[0] == ("h", 1)


def test_a_bad_cluster_url_is_refused_without_showing_its_password() -> None:
    with pytest.raises(ConfigError) as refused:
        cluster_nodes("rediss-cluster://ann:secret@h")
    assert "secret" not in str(refused.value) and "ann:***@h" in str(refused.value)
