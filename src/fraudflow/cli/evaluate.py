"""`fraudflow evaluate`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from fraudflow.cli.errors import handle_errors
from fraudflow.cli.progress import spinner
from fraudflow.cli.tables import metrics_table

__all__ = ["default_report_path", "evaluate"]


def default_report_path(run_dirs: list[Path]) -> Path:
    """One run: its own report.html; several: a comparison next to the first run."""
    if len(run_dirs) == 1:
        return run_dirs[0] / "report.html"
    return run_dirs[0].parent / "comparison.html"


@handle_errors
def evaluate(
    run_dirs: list[Path] = typer.Argument(..., help="One or more run folders."),
    out: Path = typer.Option(None, "--out", help="HTML report to write [see above]."),
) -> None:
    """Compare finished runs in a table and an offline HTML report."""
    from fraudflow.eval.report import load_run, write_report

    runs = [load_run(d) for d in run_dirs]
    Console().print(metrics_table([r.metrics for r in runs], [r.name for r in runs]))
    target = out or default_report_path(run_dirs)
    with spinner(f"writing report {target}"):
        write_report(run_dirs, target)
    Console().print(f"report: {target}")
