"""`fraudflow shadow report` on a small labelled audit log whose figures are computed by hand
below (champion A, challenger B, whose verdicts are mostly recorded apart from the decisions,
in a later shard, and joined on reading)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from fraudflow.cli.main import app
from fraudflow.serve.audit import (
    AuditLog,
    DecisionRecord,
    LabelRecord,
    ShadowRecord,
    compact_audit,
    log_shards,
    pack_features,
    read_decisions,
)
from fraudflow.serve.compaction import shadow_path

DAY1 = datetime(2026, 3, 1, 12, tzinfo=UTC)
DAY2 = datetime(2026, 3, 2, 12, tzinfo=UTC)
# transaction, day, label (None: not arrived), A's score and decision, B's verdict: (score,
# decision) recorded apart, after the decision (a ShadowRecord), or with it ("inline"); or a
# status: timed out (with the decision), or never recorded (missing: lost in a crash).
LOG: list[tuple[str, datetime, int | None, float, str, Any]] = [
    ("t1", DAY1, 1, 0.95, "block", (0.60, "review")),
    ("t2", DAY1, 1, 0.30, "approve", (0.70, "review")),
    ("t3", DAY1, 0, 0.60, "review", (0.20, "approve")),
    ("t4", DAY1, 0, 0.10, "approve", (0.10, "approve")),
    ("t5", DAY2, 1, 0.55, "review", (0.92, "block")),
    ("t6", DAY2, 0, 0.92, "block", (0.40, "approve", "inline")),
    ("t7", DAY2, 0, 0.20, "approve", (0.55, "review")),
    ("t8", DAY2, 1, 0.40, "approve", (0.30, "approve")),
    ("t9", DAY2, None, 0.99, "block", (0.99, "block")),  # no label yet: left out
    ("t10", DAY2, 0, 0.50, "review", "timed_out"),  # B was late: A's figures only
    ("t11", DAY2, 0, 0.05, "approve", "missing"),  # B's verdict lost: A's figures only
]


def _us(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000)


def _record(tid: str, at: datetime, score: float, action: str, b: Any) -> DecisionRecord:
    challenger: dict[str, Any] = {"model_version": "B", "status": "pending"}
    if b == "timed_out":
        challenger["status"] = "timed_out"
    elif isinstance(b, tuple) and b[-1] == "inline":
        challenger |= {"status": "ok", "score": b[0], "raw_score": b[0], "decision": b[1]}
    shadow = {
        "champion": {"model_version": "A", "score": score, "decision": action},
        "challengers": [challenger], "decided_by": "A",
    }  # fmt: skip
    body = orjson.dumps({"transaction_id": tid, "score": score, "decision": action, "reasons": [],
                         "model_version": "A"})  # fmt: skip
    return DecisionRecord(
        tid, _us(at), f"c-{tid}", "term", 10.0 * int(tid[1:]), score, score, action, "A",
        _us(at), pack_features([1.0]), body, ("f",), None, shadow,
    )  # fmt: skip


@pytest.fixture
def audit(tmp_path: Path) -> Path:
    """The log of ``LOG``: the decisions fill the first shard, so the writer moves on and
    records B's verdicts in the next one, as a server whose shard filled up meanwhile."""
    path = tmp_path / "serve" / "audit.db"
    log = AuditLog(path, max_shard_decisions=len(LOG), compact_closed=False)
    try:
        log.submit([_record(t, at, s, a, b) for t, at, _, s, a, b in LOG]).result()
        apart = [(t, b) for t, *_, b in LOG if isinstance(b, tuple) and b[-1] != "inline"]
        verdicts = [ShadowRecord(t, "B", "ok", b[0], b[0], b[1], _us(DAY2)) for t, b in apart]
        # t4 first reported as fraud, then corrected: the latest report wins.
        records: list[Any] = [*verdicts, LabelRecord("t4", True, None, _us(DAY2), True)]
        for tid, _, label, *_ in LOG:
            if label is not None:
                records.append(LabelRecord(tid, bool(label), None, _us(DAY2) + 1, True))
        log.submit(records).result()
    finally:
        log.close()
    assert len(log_shards(path)) == 2
    return path


def _invoke(*args: Any) -> Any:
    return CliRunner().invoke(app, ["shadow", "report", *(str(a) for a in args)])


def test_report_figures_equal_a_hand_computation(audit: Path, tmp_path: Path) -> None:
    out = tmp_path / "shadow.html"
    result = _invoke("--data-dir", audit.parent, "--out", out)
    assert result.exit_code == 0, result.output
    report = orjson.loads(out.with_suffix(".json").read_bytes())
    assert (report["decisions"], report["frauds"]) == (10, 4)  # t1..t8, t10 and t11
    (pair,) = report["pairs"]
    assert (pair["champion"], pair["challenger"], pair["decisions"], pair["frauds"]) == (
        "A", "B", 8, 4
    )  # fmt: skip
    a, b = pair["models"]["A"], pair["models"]["B"]
    # Labels by descending A score: 1 0 0 1 1 1 0 0 -> AP = (1/1 + 2/4 + 3/5 + 4/6) / 4.
    assert a["average_precision"] == pytest.approx((1 + 2 / 4 + 3 / 5 + 4 / 6) / 4)
    # B: 1 1 1 0 0 1 0 0 -> (1 + 1 + 1 + 4/6) / 4.
    assert b["average_precision"] == pytest.approx((3 + 4 / 6) / 4)
    # A flags t1 t3 t5 t6 (frauds t1 t5), blocks t1 t6; B flags t1 t2 t5 t7, blocks t5.
    assert [a[k] for k in ("precision_at_review", "recall_at_review")] == [0.5, 0.5]
    assert [a[k] for k in ("precision_at_block", "recall_at_block")] == [0.5, 0.25]
    assert [b[k] for k in ("precision_at_review", "recall_at_review")] == [0.75, 0.75]
    assert [b[k] for k in ("precision_at_block", "recall_at_block")] == [1.0, 0.25]
    assert a["reviews_per_day"] == {"2026-03-01": 1, "2026-03-02": 1}
    assert b["reviews_per_day"] == {"2026-03-01": 2, "2026-03-02": 1}
    assert pair["agreement"] == {
        "approve": {"approve": 2, "review": 2, "block": 0},
        "review": {"approve": 1, "review": 0, "block": 1},
        "block": {"approve": 1, "review": 1, "block": 0},
    }
    assert pair["agreement_rate"] == 0.25
    assert pair["caught_by_champion_only"] == {"count": 0, "frauds": []}
    only_b = pair["caught_by_challenger_only"]
    assert only_b["count"] == 1
    assert [(f["transaction_id"], f["score"], f["challenger_score"]) for f in only_b["frauds"]] == [
        ("t2", 0.30, 0.70)
    ]
    assert report["unscored"] == {"B": {"missing": 1, "timed_out": 1}}
    html = out.read_text()
    assert "A (champion) vs B" in html and "Frauds only B caught: 1" in html
    assert "Not scored by B: missing 1, timed_out 1." in html


def test_exports_join_the_verdicts_recorded_apart(audit: Path) -> None:
    entries = {
        tid: orjson.loads(text)
        for tid, text in read_decisions(audit).select("transaction_id", "shadow").rows()
    }
    assert entries["t1"]["challengers"] == [
        {"model_version": "B", "status": "ok", "score": 0.6, "raw_score": 0.6,
         "decision": "review"}
    ]  # fmt: skip
    assert entries["t11"]["challengers"] == [{"model_version": "B", "status": "missing"}]
    assert entries["t10"]["challengers"] == [{"model_version": "B", "status": "timed_out"}]
    assert {c["status"] for e in entries.values() for c in e["challengers"]} == {
        "ok", "missing", "timed_out"
    }  # fmt: skip


def test_compacted_shards_keep_the_challengers_verdicts(audit: Path, tmp_path: Path) -> None:
    before, after = tmp_path / "before.html", tmp_path / "after.html"
    assert _invoke("--audit", audit, "--out", before).exit_code == 0
    assert len(compact_audit(audit)) == 2  # the shards are closed: compacted to Parquet
    assert shadow_path(log_shards(audit)[1].compacted).is_file()
    result = _invoke("--audit", audit, "--out", after)
    assert result.exit_code == 0, result.output
    assert after.with_suffix(".json").read_bytes() == before.with_suffix(".json").read_bytes()


def test_report_since_keeps_later_decisions(audit: Path, tmp_path: Path) -> None:
    out, figures = tmp_path / "r.html", tmp_path / "figures.json"
    result = _invoke("--audit", audit, "--since", "2026-03-02", "--out", out, "--json", figures)
    assert result.exit_code == 0, result.output
    report = orjson.loads(figures.read_bytes())
    assert report["since"] == "2026-03-02" and report["decisions"] == 6  # t5 .. t8, t10, t11
    assert report["pairs"][0]["models"]["B"]["reviews_per_day"] == {"2026-03-02": 1}


def test_report_refuses_bad_input_without_writing(audit: Path, tmp_path: Path) -> None:
    result = _invoke("--audit", audit, "--out", tmp_path / "shadow.txt")
    assert result.exit_code == 2
    assert "--out must be an .html file" in result.output
    empty = tmp_path / "empty" / "audit.db"
    AuditLog(empty).close()
    result = _invoke("--audit", empty, "--out", tmp_path / "shadow.html")
    assert result.exit_code == 2
    assert "records no challenger verdicts" in result.output
    assert list(tmp_path.glob("shadow.*")) == []


def test_serve_refuses_a_challenger_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "meta.json").write_text("{}")
    nope = tmp_path / "nope"
    args = ["serve", "--run", str(tmp_path), "--insecure-no-auth", "--shadow", str(nope)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert f"--shadow (FRAUDFLOW_SHADOW): run folder {nope} does not exist" in " ".join(
        result.output.split()
    )
    result = CliRunner().invoke(app, [*args[:4], "--split", f"{tmp_path}=5"])
    assert result.exit_code == 2
    assert "--split (FRAUDFLOW_SPLIT): must be RUN=<percent>%" in " ".join(result.output.split())
