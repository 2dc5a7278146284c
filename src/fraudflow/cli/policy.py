"""`fraudflow policy calibrate`: decision thresholds for the service, from a run's validation
period (see ``fraudflow.eval.thresholds`` for the rules)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from fraudflow.cli.errors import err_console, handle_errors
from fraudflow.files import write_text_atomic

if TYPE_CHECKING:
    from fraudflow.eval.thresholds import PolicyCalibration

__all__ = ["calibrate", "policy_app"]

policy_app = typer.Typer(help="Decision policy for the service.", no_args_is_help=True)


@policy_app.command("calibrate")
@handle_errors
def calibrate(
    run: Path = typer.Option(..., "--run", help="A finished run folder."),
    review_budget: int = typer.Option(
        100, "--review-budget", help="Cards the analysts can review a day."
    ),
    block_precision: float = typer.Option(
        0.9, "--block-precision", help="Precision an automatic block must reach on validation."
    ),
    out: Path = typer.Option(
        None, "--out", help="Policy file to write (default: RUN/policy.yaml)."
    ),
) -> None:
    """Choose review and block thresholds on the run's validation period; write policy.yaml."""
    from fraudflow.eval.thresholds import (
        calibrate_policy,
        policy_document,
        policy_yaml,
        read_validation,
        validation_amounts,
    )

    validation = read_validation(run)
    cal = calibrate_policy(
        validation,
        validation_amounts(run),
        review_budget=review_budget,
        block_precision=block_precision,
    )
    target = out or run / "policy.yaml"
    doc = policy_document(cal, run_dir=run, created=datetime.now(UTC))
    write_text_atomic(target, policy_yaml(doc))
    if not cal.block_reachable:
        err_console.print(
            f"[bold yellow]warning:[/] no threshold reaches {block_precision:.0%} precision on "
            "validation: block = 1.0, nothing is blocked automatically",
            highlight=False,
        )
    Console().print(_summary(cal))
    Console().print(f"policy: {target}")


def _summary(cal: PolicyCalibration) -> Table:
    table = Table(title=f"policy from {cal.validation_days} validation days")
    table.add_column("")
    table.add_column("threshold", justify="right")
    table.add_column("on validation", justify="right")
    review = f"{cal.expected_review_cards_per_day:.1f} cards/day (budget {cal.review_budget})"
    table.add_row("review", f"{cal.review:.4f}", review)
    table.add_row("block", f"{cal.block:.4f}", _block_outcome(cal))
    table.add_row("large amount", f"{cal.large_amount:,.0f}", "review")
    return table


def _block_outcome(cal: PolicyCalibration) -> str:
    if cal.expected_block_precision is None or cal.expected_block_recall is None:
        return "never blocks"
    return f"precision {cal.expected_block_precision:.1%}, recall {cal.expected_block_recall:.1%}"
