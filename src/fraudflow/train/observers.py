"""Loop observers that are not displays: fan-out to several, and epochs into a run tracker."""

from __future__ import annotations

from collections.abc import Sequence

from fraudflow.tracking import RunTracker
from fraudflow.train.loop import EpochLog, LoopObserver

__all__ = ["CompositeObserver", "TrackingObserver"]


class CompositeObserver:
    """Passes each loop event to several observers, in order (the loop takes one observer)."""

    def __init__(self, observers: Sequence[LoopObserver]) -> None:
        self.observers = tuple(observers)

    def on_batch(self, epoch: int, done: int, total: int) -> None:
        for observer in self.observers:
            observer.on_batch(epoch, done, total)

    def on_epoch(self, log: EpochLog) -> None:
        for observer in self.observers:
            observer.on_epoch(log)

    def on_backoff(self, old_batch_size: int, new_batch_size: int) -> None:
        for observer in self.observers:
            observer.on_backoff(old_batch_size, new_batch_size)


class TrackingObserver:
    """Logs each epoch's loss, validation AP and samples per second to a run tracker.

    Samples per second is the epoch's samples over its seconds, validation included, which is
    how the run's final ``train_samples_per_second`` is defined. An epoch resumed mid-way counts
    the samples from before the stop too (the loop reports offsets within the epoch), so that
    one epoch reads high.
    """

    def __init__(self, tracker: RunTracker) -> None:
        self.tracker = tracker
        self._done = 0

    def on_batch(self, epoch: int, done: int, total: int) -> None:
        self._done = done

    def on_epoch(self, log: EpochLog) -> None:
        rate = self._done / log.seconds if log.seconds > 0 else 0.0
        self.tracker.log_epoch(log.epoch, log.loss, log.valid_average_precision, rate)
        self._done = 0

    def on_backoff(self, old_batch_size: int, new_batch_size: int) -> None:
        pass
