"""`fraudflow cases export`: the review console's cases (or its audit trail) as Parquet."""

from __future__ import annotations

from pathlib import Path

import typer

from fraudflow.cli.errors import err_console, handle_errors

__all__ = ["cases_app", "export"]

cases_app = typer.Typer(
    help="Cases of the review console of `fraudflow serve` (its cases.db, or --cases database).",
    no_args_is_help=True,
)


@cases_app.command("export")
@handle_errors
def export(
    out: Path = typer.Option(..., "--out", help="Parquet file to write."),
    run: Path = typer.Option(None, "--run", help="The run served (its RUN/serve folder)."),
    data_dir: Path = typer.Option(None, "--data-dir", help="Or: the --data-dir served with."),
    audit: Path = typer.Option(None, "--audit", help="Or: the --audit log served with."),
    cases: str = typer.Option(
        None, "--cases", envvar="FRAUDFLOW_CASES", help="Or: the postgresql:// --cases served with."
    ),
    events: bool = typer.Option(
        False, "--events", help="Export the audit trail of analyst actions instead."
    ),
) -> None:
    """Write every case (outcome, analyst, times) or every analyst action to Parquet."""
    from fraudflow.serve.cases import export_cases
    from fraudflow.serve.database import postgres_url, redact_url
    from fraudflow.serve.settings import audit_path_for

    where: Path | str
    if cases is not None:
        where = postgres_url(cases)
    else:
        where = audit_path_for(audit=audit, run=run, data_dir=data_dir).parent / "cases.db"
    rows = export_cases(where, out, events=events)
    shown = redact_url(where) if isinstance(where, str) else where
    err_console.print(f"{rows:,} {'actions' if events else 'cases'} from {shown} -> {out}")
