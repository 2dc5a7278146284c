"""`fraudflow decisions export` and `compact`: the decision service's audit log."""

from __future__ import annotations

import glob
from pathlib import Path

import typer

from fraudflow.cli.errors import err_console, handle_errors
from fraudflow.errors import ConfigError

__all__ = ["compact", "decisions_app", "export"]

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


@decisions_app.command("compact")
@handle_errors
def compact(
    audit: Path = typer.Option(None, "--audit", help="The audit log (audit.db)."),
    run: Path = typer.Option(None, "--run", help="Or: the run served (its RUN/serve/audit.db)."),
    data_dir: Path = typer.Option(None, "--data-dir", help="Or: the --data-dir served with."),
) -> None:
    """Rewrite the audit log's closed shards as compressed Parquet files, atomically.

    Closed: no service worker holds the shard (a running service's own shards are skipped, so
    this is safe at any time). Lookups, replays, export and the console read both forms."""
    from fraudflow.serve.audit import compact_audit, log_shards
    from fraudflow.serve.settings import audit_path_for

    path = audit_path_for(audit=audit, run=run, data_dir=data_dir)
    if not log_shards(path):
        raise ConfigError(f"audit log {path} does not exist")
    before = _log_bytes(path)
    written = compact_audit(path)
    err_console.print(
        f"{len(written)} shard(s) of {path} compacted: {before:,} -> {_log_bytes(path):,} bytes"
    )


def _log_bytes(path: Path) -> int:
    """The bytes of the log named ``path`` on disk: its shards, WALs and compacted files."""
    files = path.parent.glob(f"{glob.escape(path.stem)}.*")
    return sum(f.stat().st_size for f in files if f.is_file() and f.suffix != ".lock")
