"""The spec engine's durable stores give the batch features of any spec: SQLite (two
processes' stores sharing one file) and a real Redis on loopback."""

import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fraudflow.config import FeatureConfig
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
from fraudflow.serve.spec_state import SpecSQLiteStore, open_spec_store
from fraudflow.serve.state import SQLiteStore
from tests.helpers.random_specs import (
    T0,
    assert_same_features,
    batch_as_it_stood,
    random_log,
    random_spec,
    random_stream,
)


class _Replicas:
    """Two stores on one state (two service workers), each call to one of them at random."""

    def __init__(self, a: SpecStore, b: SpecStore, rng: random.Random) -> None:
        self._stores, self._rng = (a, b), rng

    def _any(self) -> SpecStore:
        return self._rng.choice(self._stores)

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


def _stores(tmp_path: Path, rng: random.Random) -> dict[str, SpecStore]:
    path = tmp_path / "state.db"
    return {"sqlite": _Replicas(SpecSQLiteStore(path), SpecSQLiteStore(path), rng)}


@pytest.mark.parametrize("seed", range(10))
def test_each_store_gives_the_batch_features_of_the_log_as_it_stood(
    seed: int, tmp_path: Path
) -> None:
    """Random specs, random streams (ties, late events, labels arriving and retracted), the
    events sent one to three per call: every feature of every event equals the batch feature
    of the log as it stood, in each store."""
    rng = random.Random(seed)
    log, spec = random_log(rng, 30), parse_spec(random_spec(rng))
    stores = _stores(tmp_path, rng)
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


def test_sqlite_state_survives_a_restart_and_a_reload_to_another_spec(tmp_path: Path) -> None:
    """Reopened, the file gives the same features; a store serving another spec indexes the
    same log by the new spec's keys (the history is kept across a spec change)."""
    rng = random.Random(2)
    log = random_log(rng, 30).sort("timestamp", maintain_order=True)
    first, second = parse_spec(random_spec(rng)), parse_spec(random_spec(rng))
    rows = log.to_dicts()
    with SpecSQLiteStore(tmp_path / "state.db") as store:
        engine = SpecOnline(first, store=store, watermark=_pinned())
        engine.record_rows([engine.row(tx) for tx in rows[:-1]])
        engine.record_label(rows[0]["transaction_id"], True)
    reference = SpecOnline(second, store=MemorySpecStore(), forget=False)
    for tx in rows[:-1]:
        reference.features(tx)
    reference.record_label(rows[0]["transaction_id"], True)
    with SpecSQLiteStore(tmp_path / "state.db") as store:
        engine = SpecOnline(second, store=store, watermark=_pinned())
        assert_same_features(engine.features(rows[-1]), reference.features(rows[-1]), "reload")


def test_the_fast_path_and_the_spec_engine_share_the_sqlite_log(tmp_path: Path) -> None:
    """A reload from the default spec (``SQLiteStore``) to another spec (the spec store on the
    same file) keeps the history, and back."""
    cfg = FeatureConfig()
    rng = random.Random(3)
    log = random_log(rng, 20).sort("timestamp", maintain_order=True).to_dicts()
    path = tmp_path / "state.db"
    reference = SpecOnline(default_spec(cfg), store=MemorySpecStore(), forget=False)
    with SQLiteStore(path) as fast_store, SpecSQLiteStore(path) as spec_store:
        fast = OnlineFeatures(cfg=cfg, store=fast_store)
        generic = SpecOnline(default_spec(cfg), store=spec_store)
        for k, tx in enumerate(log):
            engine = fast if (k // 5) % 2 == 0 else generic
            assert_same_features(engine.features(tx), reference.features(tx), f"event {k}")
            if k == 7:
                fast.record_label(log[2]["transaction_id"], True)
                reference.record_label(log[2]["transaction_id"], True)


def test_open_spec_store_follows_the_state_url(tmp_path: Path) -> None:
    store = open_spec_store(None, default_path=tmp_path / "a" / "state.db")
    assert isinstance(store, SpecSQLiteStore)
    store.close()
