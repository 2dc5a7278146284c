"""The audit log: durable on acknowledgement, group commit, idempotency lookups, export."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import closing
from pathlib import Path

import orjson
import polars as pl
import pytest

from fraudflow.errors import ConfigError
from fraudflow.serve.audit import (
    AuditLog,
    DecisionRecord,
    LabelRecord,
    export_audit,
    pack_features,
    read_decisions,
    read_labels,
)


def decision(i: int, *, version: str = "gbdt-x", **features: float) -> DecisionRecord:
    features = features or {"f": float(i)}
    reasons = [{"kind": "feature", "name": "f", "detail": "d", "value": 1.0, "contribution": 0.1}]
    return DecisionRecord(
        transaction_id=f"tx-{i}", t_us=1_767_225_600_000_000 + i, customer_id="c", terminal_id="t",
        amount=10.0 + i, score=0.25, raw_score=0.5, decision="approve", model_version=version,
        decided_at_us=1_767_225_600_000_000, feature_names=tuple(features),
        packed_features=pack_features(list(features.values())),
        response=orjson.dumps({"transaction_id": f"tx-{i}", "reasons": reasons}),
    )  # fmt: skip


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "audit.db")
    yield log
    log.close()


def _committed(path: Path) -> int:
    with closing(sqlite3.connect(path)) as db:  # another connection: what a restart would see
        return int(db.execute("SELECT COUNT(*) FROM decision_ids").fetchone()[0])


def test_an_acknowledged_record_is_committed(audit: AuditLog) -> None:
    audit.submit([decision(1)]).result(timeout=10)
    assert _committed(audit.path) == 1
    with closing(sqlite3.connect(audit.path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA page_size").fetchone() == (8192,)  # ~1 KB rows: fewer writes


def test_concurrent_appends_share_commits(audit: AuditLog) -> None:
    futures: list[Future[None]] = []
    lock = threading.Lock()

    def submit(start: int) -> None:
        for i in range(start, start + 100):
            future = audit.submit([decision(i)])
            with lock:
                futures.append(future)

    threads = [threading.Thread(target=submit, args=(k * 100,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for future in futures:
        future.result(timeout=10)
    assert _committed(audit.path) == 400
    assert audit.commits < 400  # grouped: fewer fsyncs than records


def test_lookup_returns_the_recorded_response(audit: AuditLog) -> None:
    """An id's first decision is the recorded one: a repeat, in its group or a later one, is
    neither found nor read."""
    repeat = decision(1)._replace(response=b"a repeat", score=0.75)
    audit.submit([decision(1), repeat, decision(2)]).result(timeout=10)
    audit.submit([repeat, decision(3)]).result(timeout=10)
    assert audit.lookup("tx-1") == decision(1).response
    assert audit.lookup("tx-2") == decision(2).response
    assert audit.lookup("tx-3") == decision(3).response
    assert audit.lookup("tx-4") is None
    assert _committed(audit.path) == 3
    frame = read_decisions(audit.path)
    assert frame["transaction_id"].to_list() == ["tx-1", "tx-2", "tx-3"]
    assert frame["score"].to_list() == [0.25] * 3


def test_close_commits_what_is_queued(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.db")
    futures = [log.submit([decision(i)]) for i in range(50)]
    log.close()
    assert all(f.done() and f.exception() is None for f in futures)
    assert _committed(tmp_path / "audit.db") == 50
    refused = log.submit([decision(99)])
    with pytest.raises(Exception, match="is closed"):
        refused.result(timeout=1)


def test_after_commit_sees_the_decisions_and_its_failure_fails_the_append(tmp_path: Path) -> None:
    seen: list[str] = []

    def mirror(records: Sequence[DecisionRecord]) -> None:
        seen.extend(r.transaction_id for r in records)
        if seen[-1] == "tx-2":
            raise ConnectionError("redis is down")

    log = AuditLog(tmp_path / "audit.db", after_commit=mirror)
    try:
        log.submit([decision(1)]).result(timeout=10)
        with pytest.raises(ConnectionError, match="redis is down"):
            log.submit([decision(2)]).result(timeout=10)
        log.submit([decision(3)]).result(timeout=10)  # the writer lives on
    finally:
        log.close()
    assert seen == ["tx-1", "tx-2", "tx-3"]


def test_read_and_export(audit: AuditLog, tmp_path: Path) -> None:
    labels = [LabelRecord("tx-1", True, None, 5, True), LabelRecord("zz", False, 3, 6, False)]
    # Two model versions (a reload) with different feature sets, in one shard.
    first, second = decision(1, a=0.1, b=2.0), decision(2, version="mlp-y", a=1 / 3)
    audit.submit([first, second, *labels]).result(timeout=10)
    frame = read_decisions(audit.path)
    assert frame["transaction_id"].to_list() == ["tx-1", "tx-2"]
    assert frame["model_version"].to_list() == ["gbdt-x", "mlp-y"]
    assert frame["a"].to_list() == [0.1, 1 / 3] and frame["b"].to_list() == [2.0, None]  # exact
    assert [orjson.loads(r) for r in frame["reasons"]] == [
        orjson.loads(first.response)["reasons"]
    ] * 2
    assert frame.schema["timestamp"] == pl.Datetime("us", "UTC")
    assert export_audit(audit.path, tmp_path / "out.parquet") == 2
    assert pl.read_parquet(tmp_path / "out.parquet").equals(frame)
    assert export_audit(audit.path, tmp_path / "labels.parquet", labels=True) == 2
    stored = read_labels(audit.path)
    assert stored["applied"].to_list() == [True, False]
    assert stored["reported_at"].to_list()[0] is None


def test_export_refuses_a_missing_log_or_other_suffix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"audit log .*nope.db does not exist"):
        export_audit(tmp_path / "nope.db", tmp_path / "out.parquet")
    with pytest.raises(ConfigError, match=r"--out must be a \.parquet file"):
        export_audit(tmp_path / "nope.db", tmp_path / "out.csv")
    assert not (tmp_path / "nope.db").exists()


def test_writers_take_their_own_shards_and_readers_see_them_all(tmp_path: Path) -> None:
    """Two writers (two workers) on one log: two files, one log to read, export and look up."""
    path = tmp_path / "audit.db"
    first, second = AuditLog(path), AuditLog(path)
    try:
        assert (first.file, second.file) == (path, tmp_path / "audit.1.db")
        first.submit([decision(1)]).result(timeout=10)
        second.submit([decision(2)]).result(timeout=10)
        second.submit([LabelRecord("tx-1", True, None, 5, True)]).result(timeout=10)
        assert first.lookup("tx-2") == decision(2).response  # in the other shard
        assert second.lookup("tx-1") == decision(1).response
        assert first.lookup("tx-3") is None
    finally:
        second.close()
    assert sorted(read_decisions(path)["transaction_id"]) == ["tx-1", "tx-2"]
    assert read_labels(path)["transaction_id"].to_list() == ["tx-1"]
    assert export_audit(path, tmp_path / "all.parquet") == 2
    third = AuditLog(path)  # the second's shard is free again: a restarted worker reuses it
    try:
        assert third.file == tmp_path / "audit.1.db"
    finally:
        third.close()
        first.close()


def test_a_full_shard_makes_the_writer_move_on_and_stays_readable(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = AuditLog(path, max_shard_decisions=5)
    try:
        log.submit([decision(i) for i in range(4)]).result(timeout=10)
        assert log.file == path  # 4 < 5: still the first
        log.submit([decision(i) for i in range(4, 7)]).result(timeout=10)  # 7: full, move on
        assert log.file == tmp_path / "audit.1.db"
        log.submit([decision(i) for i in range(7, 9)]).result(timeout=10)
        assert log.lookup("tx-2") == decision(2).response  # in the full shard
        assert log.lookup("tx-8") == decision(8).response
    finally:
        log.close()
    assert read_decisions(path)["transaction_id"].to_list() == [f"tx-{i}" for i in range(9)]
    again = AuditLog(path, max_shard_decisions=5)  # a restart skips the full shard
    try:
        assert again.file == tmp_path / "audit.1.db"
    finally:
        again.close()


# The labels table as schemas 1 and 2 created it (schema 3 keeps it).
_OLD_LABELS = """
CREATE TABLE labels (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, transaction_id TEXT NOT NULL,
    is_fraud INTEGER NOT NULL, reported_at_us INTEGER, received_at_us INTEGER NOT NULL,
    applied INTEGER NOT NULL
);
"""
_SCHEMA_1 = (
    """
CREATE TABLE decisions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, transaction_id TEXT NOT NULL UNIQUE,
    t_us INTEGER NOT NULL, customer_id TEXT NOT NULL, terminal_id TEXT NOT NULL,
    amount REAL NOT NULL, score REAL NOT NULL, raw_score REAL NOT NULL, decision TEXT NOT NULL,
    model_version TEXT NOT NULL, decided_at_us INTEGER NOT NULL, features TEXT NOT NULL,
    reasons TEXT NOT NULL, response BLOB NOT NULL
);
PRAGMA user_version = 1;
"""
    + _OLD_LABELS
)


def test_a_schema_1_log_stays_readable_and_writers_move_to_a_new_shard(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with closing(sqlite3.connect(path)) as db:  # a log written by an earlier fraudflow
        db.executescript(_SCHEMA_1)
        db.execute(
            "INSERT INTO decisions VALUES (1, 'old-1', 5, 'c', 't', 1.0, 0.9, 0.8, 'block', "
            "'gbdt-old', 7, '{\"f\": 4.5}', '[{\"kind\": \"threshold\"}]', ?)",
            (b"old body",),
        )
        db.commit()
    log = AuditLog(path)
    try:
        assert log.file == tmp_path / "audit.1.db"  # the old file is left as it is
        log.submit([decision(1)]).result(timeout=10)
        assert log.lookup("old-1") == b"old body"  # a replay still finds the old decision
    finally:
        log.close()
    frame = read_decisions(path)
    assert frame["transaction_id"].to_list() == ["old-1", "tx-1"]
    assert frame["f"].to_list() == [4.5, 1.0]
    assert frame["reasons"][0] == '[{"kind": "threshold"}]'
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (1,)


_SCHEMA_2 = (
    """
CREATE TABLE decisions (
    seq INTEGER PRIMARY KEY, transaction_id TEXT NOT NULL UNIQUE, t_us INTEGER NOT NULL,
    customer_id TEXT NOT NULL, terminal_id TEXT NOT NULL, amount REAL NOT NULL,
    score REAL NOT NULL, raw_score REAL NOT NULL, decision TEXT NOT NULL,
    model_version TEXT NOT NULL, decided_at_us INTEGER NOT NULL, features BLOB NOT NULL,
    response BLOB NOT NULL
);
CREATE TABLE feature_sets (model_version TEXT PRIMARY KEY, features TEXT NOT NULL);
PRAGMA user_version = 2;
"""
    + _OLD_LABELS
)


def test_a_schema_2_log_stays_readable_and_writers_move_to_a_new_shard(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    old_response = orjson.dumps({"transaction_id": "old-1", "reasons": [{"kind": "rule"}]})
    with closing(sqlite3.connect(path)) as db:  # a log written by fraudflow of stop 9
        db.executescript(_SCHEMA_2)
        db.execute("INSERT INTO feature_sets VALUES ('gbdt-old', '[\"f\", \"g\"]')")
        db.execute(
            "INSERT INTO decisions VALUES (1, 'old-1', 5, 'c', 't', 1.0, 0.9, 0.8, 'block', "
            "'gbdt-old', 7, ?, ?)",
            (pack_features([4.5, -1.0]), old_response),
        )
        db.commit()
    log = AuditLog(path)
    try:
        assert log.file == tmp_path / "audit.1.db"  # the old file is left as it is
        log.submit([decision(1)]).result(timeout=10)
        assert log.lookup("old-1") == old_response  # a replay still finds the old decision
        assert log.lookup("tx-1") == decision(1).response
    finally:
        log.close()
    frame = read_decisions(path)
    assert frame["transaction_id"].to_list() == ["old-1", "tx-1"]
    assert frame["f"].to_list() == [4.5, 1.0] and frame["g"].to_list() == [-1.0, None]
    assert frame["reasons"].to_list() == ['[{"kind":"rule"}]', '[{"kind":"feature","name":"f",'
        '"detail":"d","value":1.0,"contribution":0.1}]']  # fmt: skip
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (2,)
