"""`fraudflow train`."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console

from fraudflow.cli.errors import err_console, handle_errors
from fraudflow.cli.progress import EpochProgress, spinner
from fraudflow.cli.runs import tracking_from_environment
from fraudflow.cli.tables import metrics_table
from fraudflow.config import RunConfig, load_run_config, to_dict
from fraudflow.models import NEURAL_MODELS
from fraudflow.tracking import NullTracker, RunTracker, TrackingConfig, open_tracker
from fraudflow.train.device import resolve_device
from fraudflow.train.distributed import DistContext, cleanup, from_environment
from fraudflow.train.loop import LoopObserver
from fraudflow.train.metrics_server import DEFAULT_HOST, serve_metrics
from fraudflow.train.observers import CompositeObserver, TrackingObserver
from fraudflow.train.run import RunOutcome, train_run

__all__ = ["run_training", "train"]


@handle_errors
def train(
    features: Path = typer.Option(
        ...,
        "--features",
        "--data",
        help="Feature table from `fraudflow features`: a file, or a folder of Parquet shards "
        "(streamed shard by shard).",
    ),
    model: str = typer.Option(..., "--model", help="mlp or gbdt."),
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
        None, "--config", help="TOML preset (sections split, train, gbdt)."
    ),
    set_: list[str] = typer.Option([], "--set", help="Override, e.g. --set train.dropout=0.1."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue a stopped run from its last checkpoint."
    ),
    ddp: bool = typer.Option(
        False, "--ddp", help="DistributedDataParallel under torchrun (NCCL on GPUs, gloo on CPU)."
    ),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the model."),
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
        DEFAULT_HOST, "--metrics-host", help="Address for --metrics-port (0.0.0.0: all)."
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
        "max_batch_memory_mb": max_batch_memory, "min_batch_size": min_batch_size,
    }  # fmt: skip
    cfg = _with_flags(cfg, split_flags, train_flags)
    dist_ctx = from_environment(os.environ, cfg.train.device) if ddp else None
    tracking = tracking_from_environment(enabled=not no_track)
    try:
        with _metrics_observers(metrics_port, metrics_host, cfg, dist_ctx) as observers:
            outcome = run_training(
                features, out, cfg, resume=resume, dist_ctx=dist_ctx,
                extra_observers=observers, tracking=tracking,
            )  # fmt: skip
    finally:
        cleanup()
    if dist_ctx is None or dist_ctx.is_main:
        Console().print(metrics_table([outcome.metrics], [out.name]))
        Console().print(f"run folder: {out}")


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


@contextlib.contextmanager
def _metrics_observers(
    port: int | None, host: str, cfg: RunConfig, dist_ctx: DistContext | None
) -> Iterator[list[LoopObserver]]:
    """A Prometheus observer on ``port``, if given; rank 0 only, as only rank 0 observes."""
    if port is None or (dist_ctx is not None and not dist_ctx.is_main):
        yield []
        return
    device = dist_ctx.device if dist_ctx else resolve_device(cfg.train.device)
    with serve_metrics(port, host=host, batch_size=cfg.train.batch_size, device=device) as obs:
        err_console.print(f"Prometheus metrics: http://{host}:{obs.port}/metrics")
        yield [obs]


def run_training(
    features: Path,
    out: Path,
    cfg: RunConfig,
    *,
    resume: bool = False,
    dist_ctx: DistContext | None = None,
    extra_observers: Sequence[LoopObserver] = (),
    tracking: TrackingConfig | None = None,
) -> RunOutcome:
    """Train with a progress display suited to the model kind and, given ``tracking``, record
    the run in MLflow (rank 0 only under DDP; no tracking by default)."""
    if dist_ctx is not None and not dist_ctx.is_main:
        return train_run(features, out, cfg, resume=resume, dist_ctx=dist_ctx)
    tracker = open_tracker(tracking) if tracking else NullTracker()
    with tracker:  # an exception inside ends the MLflow run as FAILED
        if tracking is not None and tracking.enabled:
            _start_tracking(tracker, tracking, features, out, cfg, resume=resume)
        observers = [*extra_observers, TrackingObserver(tracker)]
        outcome = _train_with_display(features, out, cfg, resume, dist_ctx, observers)
        tracker.finish(outcome.metrics, outcome.run_dir)
    if tracking is not None and tracker.run_id is not None:
        err_console.print(f"MLflow run {tracker.run_id} in {tracking.tracking_uri}")
    return outcome


def _start_tracking(
    tracker: RunTracker,
    tracking: TrackingConfig,
    features: Path,
    out: Path,
    cfg: RunConfig,
    *,
    resume: bool,
) -> None:
    tags = {"fraudflow.run_dir": str(out.resolve()), "fraudflow.resumed": str(resume).lower()}
    with spinner(f"starting an MLflow run in {tracking.tracking_uri}"):
        tracker.start(to_dict(cfg), features_path=features, run_name=out.name, tags=tags)


def _train_with_display(
    features: Path,
    out: Path,
    cfg: RunConfig,
    resume: bool,
    dist_ctx: DistContext | None,
    observers: Sequence[LoopObserver],
) -> RunOutcome:
    label = cfg.train.model
    if label in NEURAL_MODELS:
        with EpochProgress.open(cfg.train.epochs, label) as progress:
            observer = CompositeObserver([progress, *observers])
            return train_run(
                features, out, cfg, resume=resume, observer=observer, dist_ctx=dist_ctx
            )
    with spinner(f"training {label} (LightGBM, early stopping on validation AP)"):
        return train_run(features, out, cfg, resume=resume)
