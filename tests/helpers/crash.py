"""A training process that dies mid-epoch, for the resume tests of every model and device: a
``LoopObserver`` that raises once a share of an epoch's samples is trained (after the
step checkpoints written up to then)."""

from __future__ import annotations

from fraudflow.train.loop import EpochLog


class Crash(Exception):
    """The simulated death of the training process."""


class CrashMidEpoch:
    """Raises ``Crash`` at the first batch of ``epoch`` that ends at or past ``fraction`` of
    its samples."""

    def __init__(self, *, epoch: int = 1, fraction: float = 0.5) -> None:
        self.epoch = epoch
        self.fraction = fraction

    def on_batch(self, epoch: int, done: int, total: int) -> None:
        if epoch == self.epoch and done >= total * self.fraction:
            raise Crash

    def on_epoch(self, log: EpochLog) -> None:
        pass

    def on_backoff(self, old_batch_size: int, new_batch_size: int) -> None:
        pass
