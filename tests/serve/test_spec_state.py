"""The spec engine's durable stores give the batch features of any spec: SQLite (two
processes' stores sharing one file) and a real Redis on loopback."""

import random
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fraudflow.config import FeatureConfig
from fraudflow.errors import DataError
from fraudflow.features import default_spec, parse_spec
from fraudflow.features.online import OnlineFeatures, Watermark
from fraudflow.features.spec_online import (
    Answer,
    Layout,
    MemorySpecStore,
    Row,
    SpecOnline,
    SpecStore,
)
from fraudflow.serve.spec_redis import SpecRedisStore
from fraudflow.serve.spec_state import SpecSQLiteStore, open_spec_store
from fraudflow.serve.state import RedisStore, SQLiteStore
from tests.helpers.random_specs import (
    T0,
    assert_same_features,
    batch_as_it_stood,
    random_log,
    random_spec,
    random_stream,
)
from tests.helpers.redis_cluster import REDIS_CLI, redis_cluster
from tests.helpers.redis_server import REDIS_SERVER, needs_redis, redis_server


class _Replicas:
    """Two stores on one state (two service workers), each call to one of them at random."""

    def __init__(self, a: SpecStore, b: SpecStore, rng: random.Random) -> None:
        self._stores, self._rng = (a, b), rng

    def _any(self) -> SpecStore:
        return self._rng.choice(self._stores)

    def prepare(self, layout: Layout) -> None:
        for store in self._stores:
            store.prepare(layout)

    def apply_many(
        self, rows: Sequence[Row], layout: Layout, *, forget_until_us: int
    ) -> list[Answer | None]:
        return self._any().apply_many(rows, layout, forget_until_us=forget_until_us)

    def read(self, rows: Sequence[Row], layout: Layout) -> list[Answer]:
        return self._any().read(rows, layout)

    def set_label(self, transaction_id: str, is_fraud: bool) -> bool:
        return self._any().set_label(transaction_id, is_fraud)

    def prune(self, layout: Layout, until_us: int) -> int:
        return self._any().prune(layout, until_us)

    def close(self) -> None:
        for store in self._stores:
            store.close()


def _pinned() -> Watermark:
    """A mark that stays before the logs' times: nothing is forgotten, so late events (the
    random logs arrive out of time order) see all they should."""
    before = int((T0 - timedelta(days=100) - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds())
    return Watermark(max_skew_us=1, clock_us=lambda: before * 1_000_000)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    if REDIS_SERVER is None:
        yield None
        return
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """A Redis Cluster on loopback (three masters, one replica each); None without the
    binaries."""
    if REDIS_SERVER is None or REDIS_CLI is None:
        yield None
        return
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster.url


def _redis(url: str) -> SpecRedisStore:
    """A store in its own key space, so tests sharing the server do not meet."""
    return SpecRedisStore(url, prefix=f"{{test-{uuid.uuid4().hex}}}:")


def _stores(
    tmp_path: Path, rng: random.Random, redis_url: str | None, cluster_url: str | None = None
) -> dict[str, SpecStore]:
    """The durable stores, each as two replicas sharing one state."""
    path = tmp_path / "state.db"
    stores: dict[str, SpecStore] = {
        "sqlite": _Replicas(SpecSQLiteStore(path), SpecSQLiteStore(path), rng)
    }
    if redis_url is not None:  # the binary is installed wherever CI runs (.ci/run)
        prefix = f"{{test-{uuid.uuid4().hex}}}:"
        a, b = (SpecRedisStore(redis_url, prefix=prefix) for _ in range(2))
        stores["redis"] = _Replicas(a, b, rng)
    if cluster_url is not None:  # no hash tag in the prefix: keys spread over the masters
        prefix = f"test-{uuid.uuid4().hex}:"
        a, b = (SpecRedisStore(cluster_url, prefix=prefix) for _ in range(2))
        stores["redis-cluster"] = _Replicas(a, b, rng)
    return stores


@pytest.mark.parametrize("seed", range(10))
def test_each_store_gives_the_batch_features_of_the_log_as_it_stood(
    seed: int, tmp_path: Path, redis_url: str | None, cluster_url: str | None
) -> None:
    """Random specs, random streams (ties, late events, labels arriving and retracted), the
    events sent one to three per call: every feature of every event equals the batch feature
    of the log as it stood, in each store."""
    rng = random.Random(seed)
    log, spec = random_log(rng, 30), parse_spec(random_spec(rng))
    stores = _stores(tmp_path, rng, redis_url, cluster_url)
    engines = {name: SpecOnline(spec, store=s, watermark=_pinned()) for name, s in stores.items()}
    labels: dict[int, int] = {}
    arrived: list[dict] = []
    pending: list[dict] = []
    steps = random_stream(rng, log)
    for k, (kind, item) in enumerate(steps):
        if kind == "label":
            for engine in engines.values():
                engine.record_label(item["id"], item["is_fraud"])
            labels[item["id"]] = int(item["is_fraud"])
            continue
        pending.append(item)
        last = k + 1 == len(steps) or steps[k + 1][0] == "label"
        if not last and len(pending) < 3 and rng.random() < 0.5:
            continue  # sent with the next events, in one call
        wanted = []
        for tx in pending:
            arrived.append(tx)
            wanted.append(batch_as_it_stood(arrived, labels, spec, log.schema))
        for name, engine in engines.items():
            values, fresh = engine.record_rows([engine.row(tx) for tx in pending])
            assert fresh.all()
            for tx, row, want in zip(pending, values.tolist(), wanted, strict=True):
                got = {n: None if v != v else v for n, v in zip(engine.names, row, strict=True)}
                assert_same_features(got, want, f"{name}, seed {seed}, {tx['transaction_id']}")
        pending = []
    for store in stores.values():
        store.close()


def test_a_repeat_in_one_call_or_across_calls_is_not_fresh(tmp_path: Path) -> None:
    rng = random.Random(1)
    log, spec = random_log(rng, 4), parse_spec(random_spec(rng))
    with SpecSQLiteStore(tmp_path / "state.db") as store:
        engine = SpecOnline(spec, store=store)
        rows = [engine.row(tx) for tx in log.to_dicts()]
        assert engine.record_rows([rows[0], rows[1], rows[0]]).fresh.tolist() == [True, True, False]
        assert engine.record_rows([rows[1], rows[2]]).fresh.tolist() == [False, True]


class _Durable:
    """One durable state (a SQLite file, or a Redis key space), opened as often as asked:
    by the spec engine's store or the fast path's."""

    def __init__(self, kind: str, tmp_path: Path, redis_url: str | None) -> None:
        if kind == "redis" and redis_url is None:
            pytest.skip("the redis-server binary is absent")
        self.kind, self.path, self.url = kind, tmp_path / "state.db", redis_url
        self.prefix = f"{{test-{uuid.uuid4().hex}}}:"

    def spec_store(self) -> SpecSQLiteStore | SpecRedisStore:
        if self.kind == "sqlite":
            return SpecSQLiteStore(self.path)
        assert self.url is not None
        return SpecRedisStore(self.url, prefix=self.prefix)

    def fast_store(self) -> SQLiteStore | RedisStore:
        if self.kind == "sqlite":
            return SQLiteStore(self.path)
        assert self.url is not None
        return RedisStore(self.url, prefix=self.prefix)


DURABLE = ["sqlite", pytest.param("redis", marks=needs_redis)]


@pytest.mark.parametrize("kind", DURABLE)
def test_state_survives_a_restart_and_a_reload_to_another_spec(
    kind: str, tmp_path: Path, redis_url: str | None
) -> None:
    """Reopened, the store gives the same features; a store serving another spec indexes the
    same log by the new spec's keys (the history is kept across a spec change)."""
    durable = _Durable(kind, tmp_path, redis_url)
    rng = random.Random(2)
    log = random_log(rng, 30).sort("timestamp", maintain_order=True)
    first, second = parse_spec(random_spec(rng)), parse_spec(random_spec(rng))
    rows = log.to_dicts()
    with durable.spec_store() as store:
        engine = SpecOnline(first, store=store, watermark=_pinned())
        engine.record_rows([engine.row(tx) for tx in rows[:-1]])
        engine.record_label(rows[0]["transaction_id"], True)
    reference = SpecOnline(second, store=MemorySpecStore(), forget=False)
    for tx in rows[:-1]:
        reference.features(tx)
    reference.record_label(rows[0]["transaction_id"], True)
    with durable.spec_store() as store:
        engine = SpecOnline(second, store=store, watermark=_pinned())
        assert_same_features(engine.features(rows[-1]), reference.features(rows[-1]), "reload")


@pytest.mark.parametrize("kind", DURABLE)
def test_the_fast_path_and_the_spec_engine_share_the_log(
    kind: str, tmp_path: Path, redis_url: str | None
) -> None:
    """Reloads from the default spec (the fast path's store) to another spec (the spec store
    on the same state) and back keep the history and the labels; each reload makes a new
    engine, as the service does."""
    durable = _Durable(kind, tmp_path, redis_url)
    cfg = FeatureConfig()
    rng = random.Random(3)
    log = random_log(rng, 20).sort("timestamp", maintain_order=True).to_dicts()
    reference = SpecOnline(default_spec(cfg), store=MemorySpecStore(), forget=False)
    with durable.fast_store() as fast_store, durable.spec_store() as spec_store:
        engine: OnlineFeatures | SpecOnline = OnlineFeatures(cfg=cfg, store=fast_store)
        for k, tx in enumerate(log):
            if k % 5 == 0 and k:
                engine = (
                    SpecOnline(default_spec(cfg), store=spec_store)
                    if isinstance(engine, OnlineFeatures)
                    else OnlineFeatures(cfg=cfg, store=fast_store)
                )
            assert_same_features(engine.features(tx), reference.features(tx), f"event {k}")
            if k in (7, 12):
                engine.record_label(log[k - 5]["transaction_id"], True)
                reference.record_label(log[k - 5]["transaction_id"], True)


@pytest.mark.parametrize("kind", DURABLE)
def test_a_store_forgets_past_the_retention_but_the_last_n_of_a_key(
    kind: str, tmp_path: Path, redis_url: str | None
) -> None:
    spec = parse_spec({
        "label_delay": "1h",
        "aggregate": [
            {"name": "c", "by": ["customer_id"], "fn": "mean", "of": "amount",
             "windows": ["1h", "last 3"]},
            {"name": "f", "by": ["customer_id"], "fn": "fraud_count", "windows": ["last 2"]},
        ],
    })  # fmt: skip

    def tx(i: int, days: int, customer: str = "A") -> dict:
        return {"transaction_id": i, "timestamp": T0 + timedelta(days=days),
                "customer_id": customer, "terminal_id": 1, "amount": float(i)}  # fmt: skip

    with _Durable(kind, tmp_path, redis_url).spec_store() as store:
        online = SpecOnline(spec, store=store)
        for i in range(1, 6):
            online.features(tx(i, i))
        online.record_label(4, True)  # older than the retention, but among the last 2
        with pytest.raises(DataError, match="not recorded"):
            online.record_label(1, True)  # forgotten
        online.features(tx(6, 30, "B"))
        got = online.features(tx(7, 31))
        assert (got["c__last3"], got["c__1h"], got["f__last2"]) == ((4 + 5 + 7) / 3, 7.0, 1.0)
        assert online.prune(T0 + timedelta(days=60)) == 1  # 4: A and B keep their last 2


def test_open_spec_store_follows_the_state_url(tmp_path: Path) -> None:
    store = open_spec_store(None, default_path=tmp_path / "a" / "state.db")
    assert isinstance(store, SpecSQLiteStore)
    store.close()
