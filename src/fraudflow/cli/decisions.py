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
) -> None:
    """Write every recorded decision (or label) to Parquet, one row each, atomically.

    Decisions carry their review case's outcome, analyst and times where the console opened
    one (the ``case_*`` columns; the case store beside the audit log)."""
    from fraudflow.serve.audit import export_audit
    from fraudflow.serve.settings import audit_path_for

    path = audit_path_for(audit=audit, run=run, data_dir=data_dir)
    rows = export_audit(path, out, labels=labels, cases=path.parent / "cases.db")
    err_console.print(f"{rows:,} {'labels' if labels else 'decisions'} from {path} -> {out}")
