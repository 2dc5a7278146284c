"""The `fraudflow` command: a thin shell over the library."""

from __future__ import annotations

import typer

from fraudflow.cli.cases import cases_app
from fraudflow.cli.data import features_app, generate
from fraudflow.cli.decisions import decisions_app
from fraudflow.cli.demo import demo
from fraudflow.cli.evaluate import evaluate
from fraudflow.cli.policy import policy_app
from fraudflow.cli.runs import runs_app
from fraudflow.cli.serve import serve
from fraudflow.cli.shadow import shadow_app
from fraudflow.cli.train import train
from fraudflow.cli.users import users_app

__all__ = ["app", "main"]

app = typer.Typer(
    name="fraudflow",
    help="Fraud detection from transaction logs to decisions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("generate")(generate)
app.add_typer(features_app, name="features")
app.command("train")(train)
app.command("evaluate")(evaluate)
app.command("demo")(demo)
app.command("serve")(serve)
app.add_typer(runs_app, name="runs")
app.add_typer(policy_app, name="policy")
app.add_typer(decisions_app, name="decisions")
app.add_typer(users_app, name="users")
app.add_typer(cases_app, name="cases")
app.add_typer(shadow_app, name="shadow")


def main() -> None:
    app()
