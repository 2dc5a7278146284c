"""`fraudflow users add|list|disable`: the review console's accounts.

The accounts file is found as ``fraudflow serve`` finds it: beside the audit log, so the same
``--run`` / ``--data-dir`` / ``--audit`` flags name it; or the PostgreSQL database that
``fraudflow serve --cases postgresql://...`` keeps them in, named by the same ``--cases``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from fraudflow.cli.errors import err_console, handle_errors

if TYPE_CHECKING:
    from fraudflow.serve.users import UserStore

__all__ = ["users_app"]

users_app = typer.Typer(
    help="Accounts of the review console (/console) of `fraudflow serve`.", no_args_is_help=True
)

_RUN = typer.Option(None, "--run", help="The run served (its RUN/serve folder).")
_DATA_DIR = typer.Option(None, "--data-dir", help="Or: the --data-dir served with.")
_AUDIT = typer.Option(None, "--audit", help="Or: the --audit log served with.")
_CASES = typer.Option(
    None, "--cases", envvar="FRAUDFLOW_CASES", help="Or: the postgresql:// --cases served with."
)


def _store(
    run: Path | None, data_dir: Path | None, audit: Path | None, cases: str | None
) -> UserStore:
    from fraudflow.serve.database import postgres_url
    from fraudflow.serve.settings import audit_path_for
    from fraudflow.serve.users import UserStore, users_path_for

    if cases is not None:
        return UserStore(postgres_url(cases))
    return UserStore(users_path_for(audit_path_for(audit=audit, run=run, data_dir=data_dir)))


@users_app.command("add")
@handle_errors
def add(
    name: str = typer.Argument(..., help="User name (letters, digits, . _ - @)."),
    role: str = typer.Option(..., "--role", help="analyst, supervisor or admin."),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from standard input (one line)."
    ),
    run: Path = _RUN,
    data_dir: Path = _DATA_DIR,
    audit: Path = _AUDIT,
    cases: str = _CASES,
) -> None:
    """Add an account; the password is asked for (twice), or read from stdin."""
    from fraudflow.serve.audit import now_us

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    store = _store(run, data_dir, audit, cases)
    user = store.add(name, role, password, now_us())
    err_console.print(f"added {user.username} ({user.role}) to {store.where}")


@users_app.command("list")
@handle_errors
def list_users(
    run: Path = _RUN, data_dir: Path = _DATA_DIR, audit: Path = _AUDIT, cases: str = _CASES
) -> None:
    """List the accounts: name, role, and whether disabled."""
    store = _store(run, data_dir, audit, cases)
    for user in store.list():
        state = "disabled" if user.disabled else "active"
        typer.echo(f"{user.username}\t{user.role}\t{state}")


@users_app.command("disable")
@handle_errors
def disable(
    name: str = typer.Argument(..., help="The account to disable."),
    run: Path = _RUN,
    data_dir: Path = _DATA_DIR,
    audit: Path = _AUDIT,
    cases: str = _CASES,
) -> None:
    """Disable an account and end its sessions (the account stays, for the audit trail)."""
    store = _store(run, data_dir, audit, cases)
    store.disable(name)
    err_console.print(f"disabled {name}")
