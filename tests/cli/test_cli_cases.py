"""`fraudflow cases export` through Typer's CliRunner."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from typer.testing import CliRunner, Result

from fraudflow.cli.main import app
from fraudflow.serve.cases import CaseIn, CaseStore

T0 = 1_780_000_000 * 1_000_000


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


def test_cases_and_their_audit_trail_export_to_parquet(
    tmp_path: Path, cases_url: str | None
) -> None:
    data = tmp_path / "data"
    # Where `fraudflow serve --data-dir data [--cases URL]` keeps them, and the flags naming it.
    store = CaseStore(cases_url or data / "cases.db")
    served = ["--cases", cases_url] if cases_url else ["--data-dir", data]
    store.open_cases([
        CaseIn("tx-1", "c1", "t1", 100.0, 0.9, "review", ("score 0.90",), T0),
        CaseIn("tx-2", "c1", "t1", 50.0, 0.95, "block", ("score 0.95",), T0 + 1),
    ])  # fmt: skip
    case = store.take_next("ann", T0 + 10)
    assert case is not None
    store.verdict(case.case_id, "ann", "fraud", "stolen card", T0 + 20)
    store.close()
    done = invoke("cases", "export", "--out", tmp_path / "cases.parquet", *served)
    assert done.exit_code == 0, done.output
    assert "2 cases from" in done.output
    cases = pl.read_parquet(tmp_path / "cases.parquet")
    assert cases["transaction_id"].to_list() == ["tx-1", "tx-2"]
    assert cases["outcome"].to_list() == ["fraud", None]
    assert cases["closed_by"].to_list() == ["ann", None]
    assert cases["confirm_only"].to_list() == [False, True]
    assert cases.schema["closed_at"] == pl.Datetime("us", "UTC")
    out = tmp_path / "events.parquet"
    assert invoke("cases", "export", "--out", out, *served, "--events").exit_code == 0
    events = pl.read_parquet(out)
    assert events["action"].to_list() == ["take", "verdict"]
    assert events["user"].to_list() == ["ann", "ann"]


def test_export_errors_say_what_was_expected(tmp_path: Path) -> None:
    wrong = invoke("cases", "export", "--out", tmp_path / "cases.csv", "--data-dir", tmp_path)
    assert wrong.exit_code == 2 and "--out must be a .parquet file" in wrong.output
    missing = invoke("cases", "export", "--out", tmp_path / "c.parquet", "--data-dir", tmp_path)
    assert missing.exit_code == 2 and "no case store at" in missing.output
    assert not (tmp_path / "c.parquet").exists()
