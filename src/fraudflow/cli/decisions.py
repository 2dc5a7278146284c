"""`fraudflow decisions export`: the decision service's audit log as Parquet."""

from __future__ import annotations

from pathlib import Path

import typer

from fraudflow.cli.errors import err_console, handle_errors

__all__ = ["decisions_app", "export"]

decisions_app = typer.Typer(
    help="Decisions recorded by `fraudflow serve` (its audit log).", no_args_is_help=True
)


@decisions_app.command("export")
@handle_errors
def export(
    out: Path = typer.Option(..., "--out", help="Parquet file to write."),
    audit: Path = typer.Option(None, "--audit", help="The audit log (audit.db)."),
    run: Path = typer.Option(None, "--run", help="Or: the run served (its RUN/serve/audit.db)."),
    data_dir: Path = typer.Option(None, "--data-dir", help="Or: the --data-dir served with."),
    labels: bool = typer.Option(False, "--labels", help="Export the posted labels instead."),
    cases: str = typer.Option(
        None, "--cases", envvar="FRAUDFLOW_CASES", help="The postgresql:// --cases served with."
    ),
) -> None:
    """Write every recorded decision (or label) to Parquet, one row each, atomically.

    Decisions carry their review case's outcome, analyst and times where the console opened
    one (the ``case_*`` columns; the case store beside the audit log, or --cases)."""
    from fraudflow.serve.audit import export_audit
    from fraudflow.serve.database import postgres_url
    from fraudflow.serve.settings import audit_path_for

    path = audit_path_for(audit=audit, run=run, data_dir=data_dir)
    store = postgres_url(cases) if cases is not None else path.parent / "cases.db"
    rows = export_audit(path, out, labels=labels, cases=store)
    err_console.print(f"{rows:,} {'labels' if labels else 'decisions'} from {path} -> {out}")
