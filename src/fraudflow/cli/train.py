"""`fraudflow train`: its flags. What it runs is in ``fraudflow.cli.training``, imported when
the command runs: the CLI starts, and answers --help, without importing PyTorch."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import typer

from fraudflow.cli.errors import handle_errors
from fraudflow.cli.runs import tracking_from_environment
from fraudflow.config import RunConfig, load_run_config

__all__ = ["train"]


@handle_errors
def train(
    features: Path = typer.Option(
        ...,
        "--features",
        "--data",
        help="Feature table from `fraudflow features`: a file, or a folder of Parquet shards "
        "(streamed shard by shard).",
    ),
    model: str = typer.Option(..., "--model", help="mlp, gbdt, transformer or gnn."),
    out: Path = typer.Option(
        ..., "--out", help="Run folder to create (or continue with --resume)."
    ),
    train_start: datetime = typer.Option(
        None, "--train-start", formats=["%Y-%m-%d"], help="First training day."
    ),
    train_days: int = typer.Option(
        None, "--train-days", help="Training days, validation included."
    ),
    delay_days: int = typer.Option(None, "--delay-days", help="Gap between training and test [7]."),
    test_days: int = typer.Option(None, "--test-days", help="Test days [7]."),
    valid_days: int = typer.Option(
        None, "--valid-days", help="Last training days held out for early stopping [7]."
    ),
    epochs: int = typer.Option(None, "--epochs", help="Maximum epochs [20]."),
    batch_size: int = typer.Option(None, "--batch-size", help="Batch size [2048]."),
    learning_rate: float = typer.Option(
        None, "--learning-rate", help="AdamW learning rate [1e-3]."
    ),
    patience: int = typer.Option(None, "--patience", help="Early-stopping patience in epochs [4]."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda [auto]."),
    amp: str = typer.Option(None, "--amp", help="Mixed precision: bf16, fp16 (CUDA) or off [off]."),
    seed: int = typer.Option(None, "--seed", help="Random seed [0]."),
    config: Path = typer.Option(
        None,
        "--config",
        help="TOML preset (sections split, train, gbdt, model.transformer, model.gnn).",
    ),
    set_: list[str] = typer.Option([], "--set", help="Override, e.g. --set train.dropout=0.1."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue a stopped run from its last checkpoint."
    ),
    ddp: bool = typer.Option(
        False, "--ddp", help="DistributedDataParallel under torchrun (NCCL on GPUs, gloo on CPU)."
    ),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    cuda_graphs: bool = typer.Option(
        None,
        "--cuda-graphs/--no-cuda-graphs",
        help="Replay each training step as one CUDA graph [on by default on CUDA where the "
        "model and run allow it; --cuda-graphs refuses a run that cannot].",
    ),
    checkpoint_every_steps: int = typer.Option(
        None, "--checkpoint-every-steps", help="Also checkpoint every N steps [0: epochs only]."
    ),
    max_batch_memory: float = typer.Option(
        None, "--max-batch-memory", help="CPU cap (MiB) on a batch's activation memory."
    ),
    min_batch_size: int = typer.Option(
        None, "--min-batch-size", help="Out-of-memory back-off stops here [32]."
    ),
    no_track: bool = typer.Option(
        False,
        "--no-track",
        help="Do not record the run in MLflow [MLFLOW_TRACKING_URI or mlruns/].",
    ),
    metrics_port: int = typer.Option(
        None, "--metrics-port", min=0, max=65535, help="Serve Prometheus training metrics here."
    ),
    metrics_host: str = typer.Option(
        None, "--metrics-host", help="Address for --metrics-port [127.0.0.1; 0.0.0.0: all]."
    ),
) -> None:
    """Train a model on a feature table, evaluate it on the test period, write the run folder."""
    cfg = load_run_config(config, set_)
    split_flags = {
        "train_start": train_start.date() if train_start else None,
        "train_days": train_days,
        "delay_days": delay_days,
        "test_days": test_days,
        "valid_days": valid_days,
    }
    train_flags = {
        "model": model, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
        "patience": patience, "device": device, "amp": amp, "seed": seed,
        "compile": compile_ or None, "checkpoint_every_steps": checkpoint_every_steps,
        "cuda_graphs": None if cuda_graphs is None else ("on" if cuda_graphs else "off"),
        "max_batch_memory_mb": max_batch_memory, "min_batch_size": min_batch_size,
    }  # fmt: skip
    cfg = _with_flags(cfg, split_flags, train_flags)
    from fraudflow.cli.training import train_and_report

    train_and_report(
        features, out, cfg, resume=resume, ddp=ddp,
        tracking=tracking_from_environment(enabled=not no_track),
        metrics_port=metrics_port, metrics_host=metrics_host,
    )  # fmt: skip


def _with_flags(
    cfg: RunConfig, split: Mapping[str, object], train: Mapping[str, object]
) -> RunConfig:
    """Flags given on the command line win over the preset."""
    split_set = {k: v for k, v in split.items() if v is not None}
    train_set = {k: v for k, v in train.items() if v is not None}
    return dataclasses.replace(
        cfg,
        split=dataclasses.replace(cfg.split, **split_set),  # type: ignore[arg-type]
        train=dataclasses.replace(cfg.train, **train_set),  # type: ignore[arg-type]
    )
