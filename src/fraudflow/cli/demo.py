"""`fraudflow demo`: the whole pipeline on simulated data, end to end."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer
from rich.console import Console

from fraudflow.cli.errors import err_console, handle_errors
from fraudflow.cli.progress import spinner, step_bar
from fraudflow.cli.tables import metrics_table
from fraudflow.config import FeatureConfig, RunConfig, SimulationConfig, TrainConfig
from fraudflow.errors import ConfigError

__all__ = ["demo"]

MODELS = ("gbdt", "mlp")


@handle_errors
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for data, runs and report."),
    customers: int = typer.Option(5_000, "--customers"),
    terminals: int = typer.Option(10_000, "--terminals"),
    days: int = typer.Option(90, "--days"),
    epochs: int = typer.Option(TrainConfig.epochs, "--epochs", help="Maximum MLP epochs."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Simulate data, build features, train LightGBM and the MLP, compare them on a future week."""
    from fraudflow.cli.training import run_training
    from fraudflow.eval.report import write_report

    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; remove it or pass another --out")
    sim = SimulationConfig(n_customers=customers, n_terminals=terminals, n_days=days, seed=seed)
    features_path = _prepare_features(out, sim)
    cfg = RunConfig(train=TrainConfig(epochs=epochs, seed=seed))
    outcomes = [run_training(features_path, out / name, _for_model(cfg, name)) for name in MODELS]
    Console().print(metrics_table([o.metrics for o in outcomes], list(MODELS)))
    report = out / "report.html"
    with spinner(f"writing report {report}"):
        write_report([o.run_dir for o in outcomes], report, title="fraudflow demo")
    Console().print(f"report: {report}")


def _prepare_features(out: Path, sim: SimulationConfig) -> Path:
    from fraudflow.data.io import write_table
    from fraudflow.data.simulator import simulate
    from fraudflow.features import build_features, write_feature_table

    with step_bar("simulating transactions") as update:
        transactions = simulate(sim, progress=update)
    write_table(transactions, out / "transactions.parquet")
    err_console.print(f"{transactions.height:,} transactions -> {out / 'transactions.parquet'}")
    cfg = FeatureConfig()
    with spinner("building point-in-time features"):
        table = build_features(transactions, cfg)
    path = out / "features.parquet"
    write_feature_table(table, path, cfg)
    return path


def _for_model(cfg: RunConfig, name: str) -> RunConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, model=name))
