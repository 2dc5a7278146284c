"""What `fraudflow train` and `fraudflow demo` run: training with a progress display, MLflow
tracking and Prometheus metrics. Kept apart from the command's flags (``fraudflow.cli.train``)
so that the CLI starts, and answers --help, without importing PyTorch."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from rich.console import Console

from fraudflow.cli.errors import err_console
from fraudflow.cli.progress import EpochProgress, spinner
from fraudflow.cli.tables import metrics_table
from fraudflow.config import RunConfig, to_dict
from fraudflow.models import NEURAL_MODELS
from fraudflow.tracking import NullTracker, RunTracker, TrackingConfig, open_tracker
from fraudflow.train.device import resolve_device
from fraudflow.train.distributed import DistContext, cleanup, from_environment
from fraudflow.train.loop import LoopObserver
from fraudflow.train.metrics_server import DEFAULT_HOST, serve_metrics
from fraudflow.train.observers import CompositeObserver, TrackingObserver
from fraudflow.train.run import RunOutcome, train_run

__all__ = ["run_training", "train_and_report"]


def train_and_report(
    features: Path,
    out: Path,
    cfg: RunConfig,
    *,
    resume: bool,
    ddp: bool,
    tracking: TrackingConfig,
    metrics_port: int | None,
    metrics_host: str | None,
) -> None:
    """`fraudflow train` once its flags are a ``RunConfig``: join torchrun's process group if
    ``ddp``, train, print the metrics table (rank 0)."""
    dist_ctx = from_environment(os.environ, cfg.train.device) if ddp else None
    host = metrics_host or DEFAULT_HOST
    try:
        with _metrics_observers(metrics_port, host, cfg, dist_ctx) as observers:
            outcome = run_training(
                features, out, cfg, resume=resume, dist_ctx=dist_ctx,
                extra_observers=observers, tracking=tracking,
            )  # fmt: skip
    finally:
        cleanup()
    if dist_ctx is None or dist_ctx.is_main:
        Console().print(metrics_table([outcome.metrics], [out.name]))
        Console().print(f"run folder: {out}")


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
