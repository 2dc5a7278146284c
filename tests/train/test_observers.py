"""Fan-out to several observers, and epochs into a run tracker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fraudflow.tracking import NullTracker
from fraudflow.train.loop import EpochLog
from fraudflow.train.observers import CompositeObserver, TrackingObserver

LOG = EpochLog(epoch=1, loss=0.3, valid_average_precision=0.6, seconds=2.0)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def on_batch(self, epoch: int, done: int, total: int) -> None:
        self.events.append(("batch", epoch, done, total))

    def on_epoch(self, log: EpochLog) -> None:
        self.events.append(("epoch", log))

    def on_backoff(self, old_batch_size: int, new_batch_size: int) -> None:
        self.events.append(("backoff", old_batch_size, new_batch_size))


class EpochTracker(NullTracker):
    def __init__(self) -> None:
        self.epochs: list[tuple[int, float, float, float]] = []

    def log_epoch(
        self, epoch: int, loss: float, valid_ap: float, samples_per_second: float
    ) -> None:
        self.epochs.append((epoch, loss, valid_ap, samples_per_second))

    def finish(self, metrics: dict[str, Any], run_dir: Path) -> None:
        pass


def test_composite_passes_every_event_to_each_observer_in_order() -> None:
    a, b = Recorder(), Recorder()
    composite = CompositeObserver([a, b])
    composite.on_batch(0, 10, 100)
    composite.on_backoff(64, 32)
    composite.on_epoch(LOG)
    expected = [("batch", 0, 10, 100), ("backoff", 64, 32), ("epoch", LOG)]
    assert a.events == expected and b.events == expected


def test_tracking_observer_logs_each_epoch_with_its_throughput() -> None:
    tracker = EpochTracker()
    observer = TrackingObserver(tracker)
    for done in (300, 600, 1000):
        observer.on_batch(1, done, 1000)
    observer.on_epoch(LOG)
    observer.on_epoch(LOG)  # an epoch with no batches: no samples
    assert tracker.epochs == [(1, 0.3, 0.6, 500.0), (1, 0.3, 0.6, 0.0)]
