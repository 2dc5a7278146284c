"""`fraudflow serve` and `fraudflow decisions export` through Typer's CliRunner."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
from typer.testing import CliRunner, Result

from fraudflow.cli.main import app
from fraudflow.serve.audit import AuditLog
from fraudflow.serve.cases import CaseIn, CaseStore
from tests.helpers.postgres import PostgresServer
from tests.serve.test_audit import decision

NO_KEYS = {"FRAUDFLOW_API_KEYS": None, "FRAUDFLOW_ADMIN_KEYS": None, "COLUMNS": "300"}


def invoke(*args: str | Path, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], env=NO_KEYS | (env or {}))


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def assert_fails(result: Result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in one_line(result.stderr), result.stderr
    assert "Traceback" not in result.output


def test_serve_without_a_run_folder_exits_2(tmp_path: Path) -> None:
    result = invoke("serve", "--run", tmp_path / "nope", env={"FRAUDFLOW_API_KEYS": "k"})
    assert_fails(
        result,
        f"error: invalid serve settings: --run (FRAUDFLOW_RUN): run folder {tmp_path / 'nope'} "
        "does not exist",
    )
    assert_fails(invoke("serve"), "--run (FRAUDFLOW_RUN): Field required")


def test_serve_refuses_a_folder_without_a_model(tmp_path: Path) -> None:
    result = invoke("serve", "--run", tmp_path, env={"FRAUDFLOW_API_KEYS": "k"})
    assert_fails(result, "holds no model bundle (model/meta.json)")


def test_serve_refuses_to_run_open_without_keys(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "meta.json").write_text("{}")
    result = invoke("serve", "--run", tmp_path)
    assert_fails(result, "no API keys are configured")
    assert "--insecure-no-auth" in one_line(result.stderr)
    empty = invoke("serve", "--run", tmp_path, env={"FRAUDFLOW_API_KEYS": " , "})
    assert_fails(empty, "no API keys are configured (the key settings are empty)")


def test_serve_rejects_bad_settings_by_flag_name(tmp_path: Path) -> None:
    env = {"FRAUDFLOW_API_KEYS": "k"}
    bad_state = invoke("serve", "--run", tmp_path, "--state", "postgres://u:secret@db/x", env=env)
    assert_fails(bad_state, "--state (FRAUDFLOW_STATE): must be sqlite:///<path> or redis://")
    assert "secret" not in bad_state.stderr
    bad_port = invoke("serve", "--run", tmp_path, "--port", "0", env=env)
    assert_fails(bad_port, "--port (FRAUDFLOW_PORT): Input should be greater than or equal to 1")
    from_env = invoke("serve", "--run", tmp_path, env=env | {"FRAUDFLOW_WORKERS": "0"})
    assert_fails(from_env, "--workers (FRAUDFLOW_WORKERS)")


def test_serve_refuses_a_cases_database_it_cannot_use(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "meta.json").write_text("{}")
    env = {"FRAUDFLOW_API_KEYS": "k"}
    other = invoke("serve", "--run", tmp_path, "--cases", "mysql://u:secret@db/x", env=env)
    assert_fails(
        other,
        "--cases (FRAUDFLOW_CASES): must be postgresql://[user[:password]@]host[:port]/database, "
        "however got 'mysql://u:***@db/x'",
    )
    down = "postgresql://u:secret@127.0.0.1:1/cases"  # nothing listens on port 1
    unreachable = invoke("serve", "--run", tmp_path, "--cases", down, env=env)
    assert_fails(unreachable, "cannot connect to postgresql://u:***@127.0.0.1:1/cases:")
    assert "Connection refused" in one_line(unreachable.stderr)
    assert "secret" not in unreachable.stderr
    no_database = postgres_server.url("nope")
    from_env = invoke("serve", "--run", tmp_path, env=env | {"FRAUDFLOW_CASES": no_database})
    assert_fails(from_env, 'database "nope" does not exist')


def test_serve_checks_the_amount_and_clock_skew_limits(tmp_path: Path) -> None:
    env = {"FRAUDFLOW_API_KEYS": "k"}
    skew = invoke("serve", "--run", tmp_path, "--max-clock-skew", "0", env=env)
    assert_fails(
        skew,
        "--max-clock-skew (FRAUDFLOW_MAX_CLOCK_SKEW_SECONDS): Input should be greater than 0",
    )
    amount = invoke("serve", "--run", tmp_path, env=env | {"FRAUDFLOW_MAX_AMOUNT": "inf"})
    assert_fails(amount, "--max-amount (FRAUDFLOW_MAX_AMOUNT): Input should be a finite number")


def test_decisions_export_writes_one_row_per_decision(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "run" / "serve" / "audit.db")
    log.submit([decision(i) for i in range(5)]).result(timeout=10)
    log.close()
    result = invoke(
        "decisions", "export", "--run", tmp_path / "run", "--out", tmp_path / "d.parquet"
    )
    assert result.exit_code == 0, result.output
    assert "5 decisions" in one_line(result.stderr)
    frame = pl.read_parquet(tmp_path / "d.parquet")
    assert frame["transaction_id"].to_list() == [f"tx-{i}" for i in range(5)]
    audit = tmp_path / "run" / "serve" / "audit.db"
    labels = invoke(
        "decisions", "export", "--audit", audit, "--labels", "--out", tmp_path / "l.parquet"
    )
    assert labels.exit_code == 0 and pl.read_parquet(tmp_path / "l.parquet").height == 0


def test_decisions_export_carries_each_decisions_case_outcome(
    tmp_path: Path, cases_url: str | None
) -> None:
    audit = tmp_path / "serve" / "audit.db"
    log = AuditLog(audit)
    log.submit([decision(i) for i in range(4)]).result(timeout=10)
    log.close()
    cases = CaseStore(cases_url or audit.parent / "cases.db")
    opened = [
        CaseIn(transaction_id=f"tx-{i}", customer_id="c", terminal_id="t", amount=10.0,
               score=0.8, decision="review", reasons=(), at_us=1_000_000 * i)
        for i in (1, 2)
    ]  # fmt: skip
    cases.open_cases(opened)
    assert cases.take_next("ann", 5_000_000).transaction_id == "tx-1"  # the oldest first
    cases.verdict(1, "ann", "fraud", "stolen card", 7_000_000)
    cases.close()
    served = ["--cases", cases_url] if cases_url else []  # default: cases.db beside the log
    out = tmp_path / "d.parquet"
    result = invoke("decisions", "export", "--audit", audit, *served, "--out", out)
    assert result.exit_code == 0, result.output
    frame = pl.read_parquet(out)
    assert frame["transaction_id"].to_list() == [f"tx-{i}" for i in range(4)]
    assert frame["case_id"].to_list() == [None, 1, 2, None]
    assert frame["case_status"].to_list() == [None, "closed", "open", None]
    assert frame["case_outcome"].to_list() == [None, "fraud", None, None]
    assert frame["case_analyst"].to_list() == [None, "ann", None, None]
    closed_at = frame["case_closed_at"].to_list()[1]
    assert closed_at == datetime(1970, 1, 1, 0, 0, 7, tzinfo=UTC)
    assert frame["case_opened_at"].dtype == pl.Datetime("us", "UTC")


def test_decisions_export_errors_leave_no_file(tmp_path: Path) -> None:
    out = tmp_path / "d.parquet"
    assert_fails(
        invoke("decisions", "export", "--audit", tmp_path / "nope.db", "--out", out),
        f"error: audit log {tmp_path / 'nope.db'} does not exist",
    )
    assert_fails(invoke("decisions", "export", "--out", out), "name the audit log")
    assert not out.exists()
