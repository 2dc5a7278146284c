"""`fraudflow runs list` and `fraudflow runs compare`: training runs recorded in MLflow;
`fraudflow runs seal`: record the SHA-256 of a run folder's bundle files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from fraudflow.cli.errors import err_console, handle_errors
from fraudflow.cli.tables import METRIC_COLUMNS, format_cell
from fraudflow.errors import ArtifactError, ConfigError
from fraudflow.tracking import (
    SEARCH_LIMIT,
    TrackingConfig,
    compare_runs,
    list_runs,
    resolve_tracking_config,
)

__all__ = ["compare", "list_", "runs_app", "seal", "tracking_from_environment"]

runs_app = typer.Typer(
    help="Training runs: those recorded in MLflow (MLFLOW_TRACKING_URI, else mlruns/ here), "
    "and run folders.",
    no_args_is_help=True,
)

SHORT_ID = 8  # like a short git hash: `runs compare` takes any unique prefix


def tracking_from_environment(*, enabled: bool = True) -> TrackingConfig:
    """The store in MLFLOW_TRACKING_URI (experiment MLFLOW_EXPERIMENT_NAME), else SQLite in
    mlruns/ under the current folder; the environment is read here, at the entry point."""
    return resolve_tracking_config(
        Path.cwd(),
        env_uri=os.environ.get("MLFLOW_TRACKING_URI"),
        experiment=os.environ.get("MLFLOW_EXPERIMENT_NAME"),
        enabled=enabled,
    )


@runs_app.command("list")
@handle_errors
def list_(
    limit: int = typer.Option(
        50, "--limit", min=1, max=SEARCH_LIMIT, help="Show the newest N runs."
    ),
) -> None:
    """Recorded runs, newest first, with their test-period metrics."""
    cfg = tracking_from_environment()
    rows = list_runs(cfg, max_results=limit)
    if not rows:
        raise ArtifactError(
            f"no runs recorded in experiment {cfg.experiment!r} at {cfg.tracking_uri}; "
            "`fraudflow train` records one"
        )
    Console().print(_runs_table(rows, f"runs in {cfg.experiment} ({cfg.tracking_uri})"))


@runs_app.command("compare")
@handle_errors
def compare(
    run_ids: list[str] = typer.Argument(..., help="Two or more run ids (or unique prefixes)."),
) -> None:
    """Runs side by side: test-period metrics, then the parameters that differ."""
    if len(run_ids) < 2:
        raise ConfigError(f"`runs compare` needs two or more run ids, however got {len(run_ids)}")
    rows = compare_runs(tracking_from_environment(), run_ids)
    Console().print(_runs_table(rows, "test-period metrics"))
    params = _params_table(rows)
    if params is not None:
        Console().print(params)


@runs_app.command("seal")
@handle_errors
def seal(run: Path = typer.Argument(..., help="Run folder whose model bundle to seal.")) -> None:
    """Record the SHA-256 of each model bundle file as it is now, for bundles saved before
    fraudflow recorded them. The service refuses bundles without (or not matching) them: seal
    only files you trust, e.g. ones you trained yourself."""
    from fraudflow.artifacts import seal_bundle  # torch and LightGBM: only when it runs

    names = seal_bundle(run)
    err_console.print(f"recorded the SHA-256 of {', '.join(names)} in {run / 'model'}")


def _runs_table(rows: Sequence[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for label in ("run", "name", "model", "started (UTC)", "status"):
        table.add_column(label, no_wrap=True)
    for _, label, _ in METRIC_COLUMNS:
        table.add_column(label, justify="right", no_wrap=True)
    for row in rows:
        started = row["start_time"].strftime("%Y-%m-%d %H:%M")
        cells = [format_cell(row.get(key), fmt) for key, _, fmt in METRIC_COLUMNS]
        table.add_row(
            row["run_id"][:SHORT_ID], row["name"], row["model"], started, row["status"], *cells
        )
    return table


def _params_table(rows: Sequence[dict[str, Any]]) -> Table | None:
    """The parameters whose values differ between the runs; None if none do."""
    keys = sorted({key for row in rows for key in row["params"]})
    differing = [k for k in keys if len({row["params"].get(k) for row in rows}) > 1]
    if not differing:
        return None
    table = Table(title="parameters that differ")
    table.add_column("parameter", no_wrap=True)
    for row in rows:
        table.add_column(row["run_id"][:SHORT_ID])
    for key in differing:
        table.add_row(key, *(row["params"].get(key, "-") for row in rows))
    return table
