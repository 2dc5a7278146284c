"""Compacting the audit log's closed shards into Parquet: the same lookups, reads and export
before and after, a crash at any step loses nothing and shows nothing twice, damaged files
fail with a clear error, and a realistic log meets the byte target."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from fraudflow.cli.main import app
from fraudflow.errors import ConfigError
from fraudflow.serve import audit as audit_module
from fraudflow.serve import compaction
from fraudflow.serve.app import create_app
from fraudflow.serve.audit import (
    AuditLog,
    DecisionRecord,
    LabelRecord,
    compact_audit,
    export_audit,
    lookup_decision,
    pack_features,
    read_decisions,
    read_labels,
)
from fraudflow.serve.cases import CaseStore
from fraudflow.serve.history import follow_audit
from tests.helpers.service import (
    AUTH,
    SMALL_SIM,
    LiveServer,
    settings_for,
    simulate_and_train,
    wait_ready,
)

T0 = 1_767_225_600_000_000  # 2026-01-01, microseconds


def decision(i: int, *, version: str = "m1", extra: dict[str, Any] | None = None) -> DecisionRecord:
    names = ("a", "b") if version == "m1" else ("b", "c", "d")
    values = [float(i) + k / 4 for k in range(len(names))]
    body = {"transaction_id": f"tx-{i:03d}", "score": i / 100, "reasons": [{"name": "a"}]}
    return DecisionRecord(
        transaction_id=f"tx-{i:03d}", t_us=T0 + i, customer_id=f"c{i % 3}",
        terminal_id=f"t{i % 2}", amount=10.0 + i, score=i / 100, raw_score=i / 90,
        decision="review" if i % 5 == 0 else "approve", model_version=version,
        decided_at_us=T0 + 10 * i, packed_features=pack_features(values),
        response=orjson.dumps(body), feature_names=names, extra=extra,
    )  # fmt: skip


def write_known_log(path: Path) -> list[str]:
    """Two shards of two writers: two model versions with other features, an extra column on
    some decisions and a challenger's verdict on one, labels, a duplicate id the first shard
    does not key. Returns the ids."""
    first, second = AuditLog(path, compact_closed=False), AuditLog(path, compact_closed=False)
    try:
        first.submit([decision(i) for i in range(0, 6)]).result(timeout=10)
        first.submit([decision(3, version="m2")]).result(timeout=10)  # a duplicate: not keyed
        first.submit([LabelRecord("tx-001", True, T0, T0 + 50, True)]).result(timeout=10)
        second.submit([decision(i, version="m2") for i in range(6, 9)]).result(timeout=10)
        with_extra = [decision(i, extra={"channel": "web", "mcc": i}) for i in range(9, 12)]
        verdict = {"gbdt-y": {"score": 0.5, "decision": "review"}}  # a challenger's
        with_extra[1] = with_extra[1]._replace(shadow=verdict)
        second.submit(with_extra).result(timeout=10)
        labels = [LabelRecord("tx-007", False, None, T0 + 60, True)]
        second.submit([*labels, LabelRecord("tx-007", True, T0, T0 + 70, False)]).result(10)
    finally:
        first.close()
        second.close()
    return [f"tx-{i:03d}" for i in range(12)]


class Snapshot:
    """Everything a reader of the log sees."""

    def __init__(self, path: Path, ids: list[str]) -> None:
        self.decisions = read_decisions(path)
        self.labels = read_labels(path)
        self.responses = {tid: lookup_decision(path, tid) for tid in [*ids, "tx-404"]}
        out = path.parent / "export.parquet"
        export_audit(path, out)
        self.exported = pl.read_parquet(out)

    def assert_equal(self, other: Snapshot) -> None:
        assert self.decisions.equals(other.decisions)
        assert self.labels.equals(other.labels)
        assert self.responses == other.responses
        assert self.exported.equals(other.exported)


@pytest.fixture
def known(tmp_path: Path) -> Iterator[tuple[Path, list[str], Snapshot]]:
    path = tmp_path / "audit.db"
    ids = write_known_log(path)
    yield path, ids, Snapshot(path, ids)


def files_of(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(("audit", ".audit")))


def test_compaction_keeps_every_read_the_same(known: tuple[Path, list[str], Snapshot]) -> None:
    path, ids, before = known
    assert before.decisions.height == 12  # the unkeyed duplicate is not read, before or after
    assert before.responses["tx-003"] == decision(3).response
    assert before.responses["tx-404"] is None
    written = compact_audit(path)
    assert written == [path.with_name("audit.0.parquet"), path.with_name("audit.1.parquet")]
    assert files_of(path.parent) == [
        "audit.0.labels.parquet", "audit.0.parquet", "audit.1.labels.parquet", "audit.1.parquet",
    ]  # fmt: skip
    Snapshot(path, ids).assert_equal(before)
    extra = read_decisions(path).filter(pl.col("transaction_id") == "tx-010")
    assert extra.select("channel", "mcc").row(0) == ("web", 10)
    assert orjson.loads(extra["shadow"][0]) == {"gbdt-y": {"score": 0.5, "decision": "review"}}
    assert compact_audit(path) == []  # nothing left to do


def test_compaction_in_several_passes_and_row_groups_reads_the_same(
    known: tuple[Path, list[str], Snapshot], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large shard is rewritten a range of ids at a time, into many row groups."""
    path, ids, before = known
    monkeypatch.setattr(audit_module, "_ROWS_PER_PASS", 2)
    monkeypatch.setattr(compaction, "ROW_GROUP_ROWS", 2)
    compact_audit(path)
    Snapshot(path, ids).assert_equal(before)
    for shard in ("audit.0.parquet", "audit.1.parquet"):
        file = pq.ParquetFile(path.with_name(shard))
        stored = file.read(columns=["transaction_id"])["transaction_id"].to_pylist()
        assert stored == sorted(stored)
        assert file.metadata.num_row_groups == -(-len(stored) // 2)


def test_a_shard_of_labels_only_compacts(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    first, second = AuditLog(path, compact_closed=False), AuditLog(path, compact_closed=False)
    first.submit([decision(1)]).result(timeout=10)
    second.submit([LabelRecord("tx-001", True, None, T0, True)]).result(timeout=10)
    first.close()
    second.close()
    before = Snapshot(path, ["tx-001"])
    assert len(compact_audit(path)) == 2
    Snapshot(path, ["tx-001"]).assert_equal(before)
    assert read_labels(path)["is_fraud"].to_list() == [1]


def test_a_writer_after_compaction_takes_a_new_shard(
    known: tuple[Path, list[str], Snapshot],
) -> None:
    path, _, before = known
    compact_audit(path)
    log = AuditLog(path, compact_closed=False)
    try:
        assert log.file == path.with_name("audit.2.db")  # never a compacted shard's number
        assert log.lookup("tx-004") == before.responses["tx-004"]  # in a compacted shard
        log.submit([decision(50)]).result(timeout=10)
        assert compact_audit(path) == []  # the writer holds its shard
    finally:
        log.close()
    assert read_decisions(path).height == 13


@pytest.mark.parametrize(
    "crash_at", ["writing", "labels-renamed", "decisions-renamed", "sqlite-dropped"]
)
def test_a_crash_at_any_step_loses_nothing_and_shows_nothing_twice(
    known: tuple[Path, list[str], Snapshot], monkeypatch: pytest.MonkeyPatch, crash_at: str
) -> None:
    path, ids, before = known

    class Crash(Exception):
        pass

    def step(name: str) -> None:
        if name == crash_at:
            raise Crash(name)

    def batches(*args: Any) -> Iterator[Any]:
        yield from real_batches(*args)
        raise Crash("writing")  # the decisions file half written

    real_batches = audit_module._sorted_batches
    monkeypatch.setattr(audit_module, "_compaction_step", step)
    monkeypatch.setattr(
        audit_module, "_sorted_batches", batches if crash_at == "writing" else real_batches
    )
    with pytest.raises(Crash):
        compact_audit(path)
    # A killed process also leaves its temporary file behind.
    path.with_name(".audit.0.parquet.x1y2.tmp").write_bytes(b"PAR1 half")
    Snapshot(path, ids).assert_equal(before)
    # A worker restarting meanwhile never writes a shard whose compacted file is in place.
    restarted = AuditLog(path, compact_closed=False)
    restarted.close()
    compacted = crash_at in ("decisions-renamed", "sqlite-dropped")
    assert restarted.file.name == ("audit.1.db" if compacted else "audit.db")
    monkeypatch.undo()
    compact_audit(path)
    Snapshot(path, ids).assert_equal(before)
    assert not [
        f for f in files_of(path.parent) if f.endswith((".tmp", "-wal", "-shm", "audit.0.db"))
    ]


def test_a_starting_writer_finishes_an_interrupted_compaction(
    known: tuple[Path, list[str], Snapshot], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, ids, before = known

    def crash(name: str) -> None:
        if name == "decisions-renamed":
            raise RuntimeError("killed")

    monkeypatch.setattr(audit_module, "_compaction_step", crash)
    with pytest.raises(RuntimeError):
        compact_audit(path)
    monkeypatch.undo()
    log = AuditLog(path)  # compacts in the background from the start
    try:
        wait_until_gone(path)
    finally:
        log.close()
    assert log.file == path.with_name("audit.1.db")  # not full: the writer took it back
    Snapshot(path, ids).assert_equal(before)


def wait_until_gone(path: Path) -> None:
    deadline = time.monotonic() + 30
    while path.exists():  # the compaction runs beside the writer
        assert time.monotonic() < deadline, f"{path} was not compacted"
        time.sleep(0.02)


def test_closing_a_full_shard_compacts_it_in_the_background(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = AuditLog(path, max_shard_decisions=5)
    try:
        log.submit([decision(i) for i in range(6)]).result(timeout=10)  # full: the writer moves on
        log.submit([decision(i) for i in range(6, 8)]).result(timeout=10)
        wait_until_gone(path)
    finally:
        log.close()
    assert files_of(tmp_path) == [
        "audit.0.labels.parquet", "audit.0.parquet", "audit.1.db", "audit.1.db.lock",
    ]  # fmt: skip
    assert read_decisions(path)["transaction_id"].to_list() == [f"tx-{i:03d}" for i in range(8)]


def test_closing_the_log_stops_a_compaction_leaving_the_shard_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = AuditLog(path, compact_closed=False)
    log.submit([decision(i) for i in range(6)]).result(timeout=10)
    log.close()
    stop = threading.Event()
    stop.set()
    assert compact_audit(path, stop=stop) == []
    assert files_of(tmp_path) == ["audit.db", "audit.db.lock"]


def test_a_damaged_compacted_file_fails_with_a_clear_error(
    known: tuple[Path, list[str], Snapshot],
) -> None:
    path, _, _ = known
    compact_audit(path)
    shard = path.with_name("audit.1.parquet")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    with pytest.raises(
        ConfigError, match=r"compacted audit shard .*audit\.1\.parquet cannot be read"
    ):
        read_decisions(path)
    result = CliRunner().invoke(
        app,
        ["decisions", "export", "--audit", str(path), "--out", str(path.with_name("x.parquet"))],
    )
    assert result.exit_code == 2
    assert "cannot be read" in result.output
    assert not path.with_name("x.parquet").exists()
    path.with_name("audit.1.parquet").unlink()
    path.with_name("audit.0.labels.parquet").unlink()
    with pytest.raises(
        ConfigError,
        match=r"audit\.0\.parquet is incomplete: .*audit\.0\.labels\.parquet is missing",
    ):
        read_labels(path)


def test_the_console_history_follows_compacted_shards_once(
    known: tuple[Path, list[str], Snapshot],
) -> None:
    path, _, _ = known
    followed, fresh = CaseStore(path.with_name("cases.db")), CaseStore(path.with_name("fresh.db"))
    try:
        now = T0 + 1_000_000
        assert follow_audit(path, followed, now_us=now) == 13  # every group row, the duplicate too
        compact_audit(path)
        assert follow_audit(path, followed, now_us=now) == 0  # copied before the compaction
        assert follow_audit(path, fresh, now_us=now) == 12  # a console that never followed
        assert follow_audit(path, fresh, now_us=now) == 0
        for store in (followed, fresh):
            assert store.decided("tx-007").is_fraud == 1  # type: ignore[union-attr]
            assert store.decided("tx-001").is_fraud == 1  # type: ignore[union-attr]
    finally:
        followed.close()
        fresh.close()


def test_the_compact_command(known: tuple[Path, list[str], Snapshot]) -> None:
    path, _, _ = known
    result = CliRunner().invoke(app, ["decisions", "compact", "--data-dir", str(path.parent)])
    assert result.exit_code == 0, result.output
    assert "2 shard(s)" in result.output
    assert path.with_name("audit.1.parquet").is_file()
    missing = CliRunner().invoke(
        app, ["decisions", "compact", "--audit", str(path.with_name("no.db"))]
    )
    assert missing.exit_code == 2
    assert "does not exist" in missing.output


# --- the byte target, on what the service writes -------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[pl.DataFrame, Path]:
    return simulate_and_train(tmp_path_factory.mktemp("compaction"), SMALL_SIM)


def test_a_realistic_log_compacts_to_250_bytes_per_decision_or_less(
    served: tuple[pl.DataFrame, Path], tmp_path: Path
) -> None:
    raw, run = served
    data = tmp_path / "data"
    transactions = [
        {
            "transaction_id": str(r["transaction_id"]),
            "timestamp": r["timestamp"].isoformat(),
            "customer_id": str(r["customer_id"]),
            "terminal_id": str(r["terminal_id"]),
            "amount": float(r["amount"]),
        }
        for r in raw.sort("timestamp").head(4_000).to_dicts()
    ]
    with LiveServer(create_app(settings_for(run, data))) as live, live.client() as client:
        wait_ready(client)
        for start in range(0, len(transactions), 1_000):
            body = {"transactions": transactions[start : start + 1_000]}
            answer = client.post("/v1/decisions/batch", json=body, headers=AUTH, timeout=60)
            assert answer.status_code == 200, answer.text
    path = data / "audit.db"
    before = Snapshot(path, [t["transaction_id"] for t in transactions])
    sqlite_bytes = _bytes(data)
    compact_audit(path)
    compacted = _bytes(data)
    Snapshot(path, list(before.responses)[:-1]).assert_equal(before)
    decisions = len(transactions)
    assert sqlite_bytes / decisions > 800  # what the service writes: the reason to compact
    assert compacted / decisions <= 250, f"{compacted / decisions:.0f} bytes per decision"


def _bytes(folder: Path) -> int:
    return sum(
        p.stat().st_size
        for p in folder.iterdir()
        if p.name.startswith("audit") and not p.name.endswith(".lock")
    )
