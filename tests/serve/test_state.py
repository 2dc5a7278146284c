"""The durable state stores give the batch features too, across restarts and replicas.

The Redis tests run against a real ``redis-server`` on loopback, started here; they skip only
where the binary is absent.
"""

import random
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from fraudflow.errors import ConfigError, DataError
from fraudflow.features.online import (
    Answers,
    Event,
    Histories,
    MemoryStore,
    OnlineFeatures,
    StateStore,
    Window,
    duplicate_transaction,
)
from fraudflow.features.specs import Entity
from fraudflow.serve.state import RedisStore, SQLiteStore, open_store
from tests.features.test_online import SIM_CFG, assert_matches_batch, replay, simulated
from tests.helpers.redis_cluster import needs_redis_cluster, redis_cluster

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="the redis-server binary is absent")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert REDIS_SERVER is not None
    port = _free_port()
    args = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1"]
    server = subprocess.Popen(
        [*args, "--save", "", "--appendonly", "no"],
        cwd=tmp_path_factory.mktemp("redis"),
        stdout=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, server)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(timeout=10)


def _wait_for_port(port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert server.poll() is None, f"redis-server exited with {server.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"redis-server did not listen on port {port} within 10 s")


def _redis(url: str) -> RedisStore:
    """A store in its own key space, so tests sharing the server do not meet."""
    return RedisStore(url, prefix=f"{{test-{uuid.uuid4().hex}}}:")


class _Replicas:
    """Two stores on one state (two service workers), each call to one of them at random.
    Each catches up with the other's events and labels before it answers; each forgets on
    its own calls (``prune`` included), so only the windows, which never reach forgotten
    events, are the same as one store's."""

    def __init__(self, a: StateStore, b: StateStore, *, seed: int = 3) -> None:
        self._stores, self._rng = (a, b), random.Random(seed)

    def _any(self) -> StateStore:
        return self._rng.choice(self._stores)

    def read(self, events: Sequence[Event], windows: Sequence[Window]) -> Answers:
        return self._any().read(events, windows)

    def apply_many(
        self, events: Sequence[Event], windows: Sequence[Window], *, forget_until_us: int
    ) -> Answers:
        return self._any().apply_many(events, windows, forget_until_us=forget_until_us)

    def set_label(self, transaction_id: str, is_fraud: bool) -> bool:
        return self._any().set_label(transaction_id, is_fraud)

    def prune(self, until_us: int) -> int:
        return self._any().prune(until_us)

    def close(self) -> None:
        for store in self._stores:
            store.close()


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis Cluster on loopback: three masters, one replica each."""
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster.url


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("redis", marks=needs_redis),
        pytest.param("redis-cluster", marks=needs_redis_cluster),
    ]
)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    kind = request.param
    if kind == "memory":
        made: StateStore = MemoryStore()
    elif kind == "sqlite":
        made = SQLiteStore(tmp_path / "state.db")
    elif kind == "redis-cluster":  # no hash tag in the prefix: keys spread over the masters
        made = RedisStore(
            request.getfixturevalue("cluster_url"), prefix=f"test-{uuid.uuid4().hex}:"
        )
    else:
        made = _redis(request.getfixturevalue("redis_url"))
    yield made
    made.close()


# --- The StateStore contract, on every store ---------------------------------------------

_IDS = {"customer": "c:1", "terminal": "t|1"}  # separators the Redis layout must survive
_PROBE = 2**61  # a time after every event of these tests
# Each window as seen from _PROBE: "since" windows reach back to time 0 (exclusive).
_EVERYTHING = [Window("customer", _PROBE, amounts=True, below=1.0), Window("terminal", _PROBE)]


def apply_one(
    store: StateStore, event: Event, windows: list[Window], *, forget_until_us: int
) -> list[tuple[int, ...]]:
    """``apply_many`` of one event: per window (count, frauds, amount, below, latest); the
    store's duplicate error if it is already stored."""
    answers = store.apply_many([event], windows, forget_until_us=forget_until_us)
    if not answers.fresh[0]:
        raise duplicate_transaction(event.transaction_id)
    return _per_window(answers, 0)


def _per_window(answers: Answers, i: int) -> list[tuple[int, ...]]:
    columns = (answers.count, answers.frauds, answers.amount, answers.below, answers.latest)
    return [tuple(c[j, i].item() for c in columns) for j in range(answers.count.shape[0])]


def _event(tx: str, t_us: int, amount: float = 1.0) -> Event:
    return Event(tx, t_us, _IDS["customer"], _IDS["terminal"], amount)


def _read(store: StateStore, windows: list[Window] = _EVERYTHING) -> list[tuple[int, ...]]:
    """The windows from an event at _PROBE of the same customer and terminal."""
    return _per_window(store.read([_event("probe", _PROBE)], windows), 0)


def _since(t_us: int, entity: Entity = "customer") -> list[Window]:
    """From _PROBE: the entity's events after ``t_us``."""
    return [Window(entity, _PROBE - t_us)]


def test_store_contract(store: StateStore) -> None:
    assert apply_one(store, _event("a", 10, 0.1), _EVERYTHING, forget_until_us=0) == [
        (0, 0, 0, 0, 0), (0, 0, 0, 0, 0)
    ]  # fmt: skip
    apply_one(store, _event("b", 20, 2.5), [], forget_until_us=0)
    apply_one(store, _event("c", 20, 1e-5), [], forget_until_us=0)  # tie: after "b"
    (count, frauds, amount, below, latest), terminal = _read(store)
    assert (count, frauds, below, latest) == (3, 0, 2, 20)  # 0.1 and 1e-5 are below 1.0
    assert amount == pytest.approx(2.60001, rel=1e-12)
    assert terminal[:2] == (3, 0)
    assert terminal[2:] == (0, 0, 0)  # no amounts asked
    assert store.set_label("b", True) and not store.set_label("zz", True)
    assert _read(store, _since(15))[0][:2] == (2, 1)
    assert _read(store, _since(15, "terminal"))[0][:2] == (2, 1)
    assert _read(store, _since(20))[0][:2] == (0, 0)  # (20, probe]: the events at 20 are out
    assert store.set_label("b", False)
    assert _read(store, _since(15))[0][:2] == (2, 0)
    with pytest.raises(DataError, match="transaction_id 'b' is already in the state store"):
        apply_one(store, _event("b", 30), _EVERYTHING, forget_until_us=0)
    assert store.prune(15) == 1
    assert _read(store)[0][0] == 2
    assert not store.set_label("a", True)


def test_windows_are_relative_to_each_event(store: StateStore) -> None:
    """(t - after, t - until] per event, in integer microseconds, ends included as stated."""
    for i, t in enumerate([100, 200, 300, 400]):
        apply_one(store, _event(f"e{t}", t, float(i + 1)), [], forget_until_us=0)
    store.set_label("e200", True)
    windows = [
        Window("customer", 200, amounts=True),  # (t - 200, t]
        Window("terminal", 300, 100),  # (t - 300, t - 100]: a label-delayed window
    ]
    answers = store.read([_event("p1", 400), _event("p2", 300)], windows)
    assert _per_window(answers, 0) == [(2, 0, 7.0, 0, 400), (2, 1, 0.0, 0, 0)]
    assert _per_window(answers, 1) == [(2, 1, 5.0, 0, 300), (2, 1, 0.0, 0, 0)]
    assert answers.fresh.tolist() == [True, True]


def test_apply_many_is_one_by_one_in_one_call(store: StateStore) -> None:
    """Each event sees the ones before it in the call; a repeated id is skipped, not stored."""
    everything = [Window("customer", 1_000, amounts=True), Window("terminal", 1_000)]
    apply_one(store, _event("a", 10, 1.0), [], forget_until_us=0)
    events = [_event("b", 20, 2.0), _event("a", 25, 9.0), _event("c", 30, 3.0), _event("b", 40)]
    out = store.apply_many(events, everything, forget_until_us=0)
    assert out.fresh.tolist() == [True, False, True, False]  # "a" stored before; "b" earlier
    assert _per_window(out, 0) == [(1, 0, 1.0, 0, 10), (1, 0, 0.0, 0, 0)]
    assert _per_window(out, 1) == [(0, 0, 0.0, 0, 0)] * 2  # not stored: zeros
    assert _per_window(out, 2) == [(2, 0, 3.0, 0, 20), (2, 0, 0.0, 0, 0)]
    assert [r[0] for r in _read(store)] == [3, 3]
    empty = store.apply_many([], everything, forget_until_us=0)
    assert empty.fresh.shape == (0,) and empty.count.shape == (2, 0)
    # Forgetting: transactions at or before forget_until_us go (their events may stay a
    # while, out of every window by the retention rule); prune forgets both.
    store.apply_many([_event("d", 50)], [], forget_until_us=20)
    assert not store.set_label("a", True)  # forgotten transactions cannot be labelled
    store.prune(20)
    assert _read(store)[0][::4] == (2, 50)  # "c" and "d" are left


def test_windows_equal_a_brute_force_count(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random groups of events (late ones, repeated ids, labels between groups, forgetting
    as the evaluator does) against counting the stored events directly."""
    _brute_force(store, monkeypatch)


def test_two_sqlite_replicas_equal_a_brute_force_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with each call to one of two SQLite stores on one file: their mirrors catch
    up with the other's events, fraud labels among them, and label changes."""
    path = tmp_path / "state.db"
    with closing(_Replicas(SQLiteStore(path), SQLiteStore(path))) as replicas:
        _brute_force(replicas, monkeypatch)


def _brute_force(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fraudflow.features.online._SWEEP_EVERY", 16)  # sweep often
    rng = random.Random(7)
    windows = [
        Window("customer", 60, amounts=True),
        Window("customer", 300, amounts=True, below=2.0),
        Window("customer", 450, 100),
        Window("terminal", 200),
        Window("terminal", 500, 150),
    ]
    retention = 1_000  # >= the widest window; a late event is at most 400 late
    stored: dict[str, list[Any]] = {}  # id -> [t, customer, terminal, amount, fraud]
    newest, n, burst, forgotten = 0, 0, 0, -(2**62)  # forgotten: the highest bound so far
    for _ in range(120):
        group = []
        kept = sorted(tid for tid, v in stored.items() if v[0] > forgotten)
        for _ in range(rng.randint(1, 12)):
            if kept and rng.random() < 0.05:  # a repeat: not stored again
                group.append(Event(rng.choice(kept), newest, "c0", "t0", 1.0))
                continue
            newest += rng.randint(0, 40)
            t = newest - rng.randint(0, 400) if rng.random() < 0.15 else newest
            amount = rng.choice([0.5, 1.0, 1.5, 3.0, 10.25])
            tid, n = f"e{n}", n + 1
            # c9 comes in rare bursts: idle past the retention, it is forgotten whole, then
            # comes back.
            burst = 3 if rng.random() < 0.01 else max(0, burst - 1)
            customer = "c9" if burst else f"c{rng.randint(0, 2)}"
            group.append(Event(tid, t, customer, f"t{rng.randint(0, 2)}", amount))
        forget = min(e.t_us for e in group) - retention
        # Some groups ask nothing, as a mirror catching up with another writer's events.
        asked = windows if rng.random() < 0.8 else []
        answers = store.apply_many(group, asked, forget_until_us=forget)
        forgotten = max(forgotten, forget)
        seen: set[str] = set()
        for i, e in enumerate(group):
            new = e.transaction_id not in stored and e.transaction_id not in seen
            assert answers.fresh[i] == new
            seen.add(e.transaction_id)
            if not new:
                continue
            for j, w in enumerate(asked):
                entity = e.customer_id if w.entity == "customer" else e.terminal_id
                inside = [
                    v for v in stored.values()
                    if v[1 if w.entity == "customer" else 2] == entity
                    and e.t_us - w.after_us < v[0] <= e.t_us - w.until_us
                ]  # fmt: skip
                assert answers.count[j, i] == len(inside), (j, e)
                assert answers.frauds[j, i] == sum(v[4] for v in inside), (j, e)
                if w.amounts:
                    assert answers.amount[j, i] == pytest.approx(sum(v[3] for v in inside))
                    if inside:
                        assert answers.latest[j, i] == max(v[0] for v in inside)
                if w.below is not None:
                    below = sum(v[3] < w.below for v in inside)
                    assert answers.below[j, i] == below
            stored[e.transaction_id] = [e.t_us, e.customer_id, e.terminal_id, e.amount, False]
        for tid in rng.sample(sorted(stored), k=min(3, len(stored))):  # labels, some undone
            if stored[tid][0] > forgotten:  # a forgotten one may be refused
                flag = rng.random() < 0.7
                assert store.set_label(tid, flag)
                stored[tid][4] = flag


# --- Parity with batch -------------------------------------------------------------------
# Half the memory replay's customers and terminals (~7.6k events over 45 days, still past the
# 37-day retention): each event here is a file transaction or a network round trip.


def _store_log() -> pl.DataFrame:
    return simulated(n_customers=100, n_terminals=200, n_days=45)


@pytest.mark.slow
def test_sqlite_replay_matches_batch_across_a_reopen(tmp_path: Path) -> None:
    path, frame = tmp_path / "state.db", _store_log()
    halfway = frame.height // 2
    stores = [SQLiteStore(path)]
    online = [OnlineFeatures(cfg=SIM_CFG, store=stores[0])]

    def online_for(i: int) -> OnlineFeatures:
        if i == halfway:  # a restart: close the file, open it again
            stores[0].close()
            stores[0] = SQLiteStore(path)
            online[0] = OnlineFeatures(cfg=SIM_CFG, store=stores[0])
        return online[0]

    try:
        assert_matches_batch(replay(frame, SIM_CFG, online_for), frame, SIM_CFG)
    finally:
        stores[0].close()


def test_sqlite_file_is_in_wal_mode(tmp_path: Path) -> None:
    SQLiteStore(tmp_path / "state.db").close()
    with closing(sqlite3.connect(tmp_path / "state.db")) as db:  # WAL mode sticks to the file
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_sqlite_replicas_on_one_file_alternating_equal_one(tmp_path: Path) -> None:
    """Two stores on one file (two service workers): each catches up with the other's events
    and labels before answering, so alternating between them equals one store."""
    frame = simulated(n_customers=20, n_terminals=40, n_days=40)  # ~1300 events, with labels
    path = tmp_path / "shared.db"
    with SQLiteStore(path) as a, SQLiteStore(path) as b:
        replicas = [OnlineFeatures(cfg=SIM_CFG, store=s) for s in (a, b)]
        alternating = replay(frame, SIM_CFG, lambda i: replicas[i % 2])
    one = OnlineFeatures(cfg=SIM_CFG, store=MemoryStore())
    assert alternating == replay(frame, SIM_CFG, lambda _: one)


def test_sqlite_failed_call_changes_nothing_and_the_mirror_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SQLiteStore(tmp_path / "state.db") as store:
        apply_one(store, _event("a", 10), [], forget_until_us=0)

        def broken(until_us: int) -> int:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(store, "_forget_in_file", broken)
        monkeypatch.setattr("fraudflow.serve.state._FORGET_STEP_US", 0)  # forget every call
        with pytest.raises(sqlite3.OperationalError):
            store.apply_many([_event("b", 20)], _EVERYTHING, forget_until_us=0)
        monkeypatch.undo()
        assert _read(store)[0][::4] == (1, 10)  # "b" rolled back, mirror too
        assert apply_one(store, _event("b", 20), _EVERYTHING, forget_until_us=0)[0][::4] == (1, 10)
    with SQLiteStore(tmp_path / "state.db") as reopened:
        assert _read(reopened)[0][::4] == (2, 20)


def test_sqlite_mirror_works_after_the_file_lock_is_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's write lock covers the reads and inserts only: while the mirror computes an
    answer, another process can write (here: takes the lock without waiting)."""
    path = tmp_path / "state.db"
    with (
        SQLiteStore(path) as store,
        closing(sqlite3.connect(path, isolation_level=None, timeout=0)) as other,
    ):
        mirror_apply = Histories.apply_many
        took_lock = []

        def apply_many(mirror: Histories, *args: Any, **kwargs: Any) -> Any:
            other.execute("BEGIN IMMEDIATE")  # raises "database is locked" if still held
            other.execute("ROLLBACK")
            took_lock.append(True)
            return mirror_apply(mirror, *args, **kwargs)

        monkeypatch.setattr(Histories, "apply_many", apply_many)
        assert apply_one(store, _event("a", 10), _EVERYTHING, forget_until_us=0)[0][::4] == (0, 0)
        assert took_lock == [True]


def test_sqlite_mirror_failure_after_commit_keeps_the_events_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file committed first: a mirror that fails afterwards loses nothing; the call
    raises, the next one rebuilds the mirror from the file, which holds the events."""
    with SQLiteStore(tmp_path / "state.db") as store:
        apply_one(store, _event("a", 10), [], forget_until_us=0)

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise MemoryError

        monkeypatch.setattr(Histories, "apply_many", broken)
        with pytest.raises(MemoryError):
            store.apply_many([_event("b", 20)], _EVERYTHING, forget_until_us=0)
        monkeypatch.undo()
        assert _read(store)[0][::4] == (2, 20)  # "b" is stored, and the mirror knows it
        with pytest.raises(DataError, match="already in the state store"):
            apply_one(store, _event("b", 20), _EVERYTHING, forget_until_us=0)
        assert apply_one(store, _event("c", 30), _EVERYTHING, forget_until_us=0)[0][::4] == (2, 20)


def test_sqlite_refuses_a_file_of_another_schema_version(tmp_path: Path) -> None:
    with closing(sqlite3.connect(tmp_path / "old.db")) as db:
        db.execute("PRAGMA user_version = 1")
    with pytest.raises(ConfigError, match="schema version 1, however this fraudflow expects 3"):
        SQLiteStore(tmp_path / "old.db")


@needs_redis
@pytest.mark.slow
def test_redis_replay_matches_batch(redis_url: str) -> None:
    with _redis(redis_url) as store:
        online = OnlineFeatures(cfg=SIM_CFG, store=store)
        frame = _store_log()
        assert_matches_batch(replay(frame, SIM_CFG, lambda _: online), frame, SIM_CFG)


@needs_redis
def test_redis_replicas_alternating_equal_one(redis_url: str) -> None:
    frame = simulated(n_customers=20, n_terminals=40, n_days=40)  # ~1300 events
    prefix = f"{{test-{uuid.uuid4().hex}}}:"
    with RedisStore(redis_url, prefix=prefix) as a, RedisStore(redis_url, prefix=prefix) as b:
        replicas = [OnlineFeatures(cfg=SIM_CFG, store=s) for s in (a, b)]
        alternating = replay(frame, SIM_CFG, lambda i: replicas[i % 2])
    with _redis(redis_url) as store:
        one = OnlineFeatures(cfg=SIM_CFG, store=store)
        assert alternating == replay(frame, SIM_CFG, lambda _: one)


@needs_redis
def test_redis_prune_sweeps_a_chunk_at_a_time_and_spares_other_keys(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    from fraudflow.serve import state

    monkeypatch.setattr(state, "_SCAN_CHUNK", 3)  # many chunks: memory stays bounded
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    events = [Event(f"tx{i}", 10 * i, f"c{i % 3}", f"t{i % 4}", 1.0) for i in range(1, 11)]
    with RedisStore(redis_url, prefix=prefix) as store, redis.Redis.from_url(redis_url) as client:
        store.apply_many(events, [], forget_until_us=0)
        assert store.set_label("tx2", True)
        client.set(prefix + "{t:tx1}r", b"a replay record")  # the ledger's: not the store's
        assert store.prune(55) == 5  # tx1..tx5
        assert client.exists(prefix + "{t:tx1}r") and not client.exists(store.record_key("tx1"))
        windows = [Window("customer", 1_000), Window("terminal", 1_000)]
        probe = [Event("p", 200, f"c{k}", f"t{k}", 0.0) for k in range(3)]
        assert store.read(probe, windows).count.tolist() == [[2, 2, 1], [1, 1, 2]]
        assert client.zcard(store.entity_key("customer", "c2") + "f") == 0  # tx2's label


# --- open_store --------------------------------------------------------------------------


def test_open_store_picks_by_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cases = {
        None: tmp_path / "default.db",
        "sqlite:///relative.db": Path("relative.db"),
        f"sqlite:///{tmp_path}/absolute.db": tmp_path / "absolute.db",
    }
    for url, path in cases.items():
        store = open_store(url, default_path=tmp_path / "default.db")
        assert isinstance(store, SQLiteStore) and store.path == path
        store.close()
        assert path.exists()
    redis_store = open_store("redis://127.0.0.1:1/0", default_path=tmp_path / "x.db")
    assert isinstance(redis_store, RedisStore)  # connects lazily: nothing listens on port 1
    redis_store.close()


def test_open_store_rejects_other_urls_without_echoing_secrets(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"sqlite:///<path> or redis://.*'postgres://\.\.\.@host/db'"
    ):
        open_store("postgres://user:secret@host/db", default_path=tmp_path / "x.db")
    with pytest.raises(ConfigError, match="however got 'sqlite:///'"):
        open_store("sqlite:///", default_path=tmp_path / "x.db")


def test_sqlite_wal_is_checkpointed_in_the_background(tmp_path: Path) -> None:
    """Writers never checkpoint (no copy and fsync inside a request); the thread does."""
    path = tmp_path / "state.db"
    with SQLiteStore(path) as store:
        store._checkpointer.interval_seconds = 0.01  # hurry the thread
        events = [_event(f"tx{i}", (i + 1) * 10, 1.0) for i in range(2_000)]
        store.apply_many(events, [], forget_until_us=0)
        deadline = time.monotonic() + 10
        while store._checkpointer.checkpoints == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store._checkpointer.checkpoints > 0
        assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT COUNT(*) FROM transactions").fetchone() == (2_000,)


def test_sqlite_writers_wait_for_another_writers_lock(tmp_path: Path) -> None:
    """A writer that finds the file locked retries until the holder commits, then proceeds."""
    path = tmp_path / "state.db"
    with (
        SQLiteStore(path) as store,
        closing(sqlite3.connect(path, isolation_level=None, check_same_thread=False)) as other,
    ):
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        threading.Timer(0.05, lambda: other.execute("COMMIT")).start()
        started = time.monotonic()
        apply_one(store, _event("a", 10), [], forget_until_us=0)
        waited = time.monotonic() - started
        assert 0.04 <= waited < 2.0
        assert _read(store)[0][::4] == (1, 10)
