"""Map fraudflow errors to a one-line message and exit code, without a traceback."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from fraudflow.errors import FraudflowError

__all__ = ["err_console", "handle_errors"]

P = ParamSpec("P")
R = TypeVar("R")

err_console = Console(stderr=True)


def handle_errors(command: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except FraudflowError as exc:
            # The message may quote input values: escape them so Rich does not read markup.
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(code=exc.exit_code) from None

    return wrapper
