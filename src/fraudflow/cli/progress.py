"""Rich progress displays for long steps (written to stderr, so stdout stays parseable)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from fraudflow.cli.errors import err_console

if TYPE_CHECKING:
    from fraudflow.train.loop import EpochLog

__all__ = ["EpochProgress", "spinner", "step_bar"]


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )


@contextlib.contextmanager
def step_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A bar driven by a ``callback(done, total)``."""
    with _progress() as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


@contextlib.contextmanager
def spinner(description: str) -> Iterator[None]:
    with err_console.status(description):
        yield
    err_console.print(f"[green]✓[/] {description}")


class EpochProgress:
    """A LoopObserver: one bar over the batches of each epoch, with loss and validation AP."""

    def __init__(self, progress: Progress, epochs: int, label: str) -> None:
        self.progress = progress
        self.epochs = epochs
        self.label = label
        self.task = progress.add_task(f"{label} epoch 1/{epochs}", total=None)
        self.last = ""

    def on_batch(self, epoch: int, done: int, total: int) -> None:
        # Updating the bar every batch is cheap; Rich redraws at its own rate.
        description = f"{self.label} epoch {epoch + 1}/{self.epochs}{self.last}"
        self.progress.update(self.task, completed=done, total=total, description=description)

    def on_backoff(self, old_batch_size: int, new_batch_size: int) -> None:
        err_console.print(
            f"[yellow]out of memory at batch size {old_batch_size}: "
            f"continuing with {new_batch_size}[/]"
        )

    def on_epoch(self, log: EpochLog) -> None:
        self.last = f"  loss {log.loss:.4f}  val AP {log.valid_average_precision:.4f}"
        self.progress.update(
            self.task, description=f"{self.label} epoch {log.epoch + 1}/{self.epochs}{self.last}"
        )

    @classmethod
    @contextlib.contextmanager
    def open(cls, epochs: int, label: str) -> Iterator[EpochProgress]:
        with _progress() as progress:
            yield cls(progress, epochs, label)
