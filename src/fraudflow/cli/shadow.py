"""`fraudflow shadow report`: the champion against each challenger on labelled decisions."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import typer

from fraudflow.cli.errors import err_console, handle_errors

__all__ = ["report", "shadow_app"]

shadow_app = typer.Typer(
    help="Challengers scored in shadow by `fraudflow serve --shadow`.", no_args_is_help=True
)


@shadow_app.command("report")
@handle_errors
def report(
    out: Path = typer.Option(..., "--out", help="HTML file to write (the JSON goes beside it)."),
    data_dir: Path = typer.Option(None, "--data-dir", help="The --data-dir served with."),
    audit: Path = typer.Option(None, "--audit", help="Or: the audit log (audit.db)."),
    run: Path = typer.Option(None, "--run", help="Or: the run served (its RUN/serve/audit.db)."),
    since: datetime = typer.Option(
        None, "--since", formats=["%Y-%m-%d"], help="Only decisions made on or after this UTC day."
    ),
    json_out: Path = typer.Option(
        None, "--json", help="Where to write the figures as JSON (default: --out as .json)."
    ),
) -> None:
    """Compare the champion with each challenger on the decisions whose labels have arrived:
    average precision, precision and recall at the policy thresholds, reviews per day, the
    agreement of their decisions, the frauds one caught and the other missed."""
    from fraudflow.serve.settings import audit_path_for
    from fraudflow.serve.shadow_report import write_shadow_report

    path = audit_path_for(audit=audit, run=run, data_dir=data_dir)
    day = None if since is None else since.date()
    figures = write_shadow_report(path, out, since=day, json_out=json_out)
    written = json_out if json_out is not None else out.with_suffix(".json")
    err_console.print(
        f"{figures['decisions']:,} labelled decisions, {len(figures['pairs'])} pairs -> "
        f"{out}, {written}"
    )
