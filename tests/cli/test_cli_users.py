"""`fraudflow users add|list|disable` through Typer's CliRunner."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner, Result

from fraudflow.cli.main import app
from fraudflow.serve.settings import audit_path_for
from fraudflow.serve.users import UserStore, users_path_for

PASSWORD = "correct horse battery"


def invoke(*args: str | Path, stdin: str | None = None) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], input=stdin, env={"COLUMNS": "300"})


def test_add_list_disable_in_the_store_serve_uses(tmp_path: Path, cases_url: str | None) -> None:
    data = tmp_path / "data"
    # The flags `fraudflow serve` was given: --data-dir, and --cases for PostgreSQL.
    served = ["--cases", cases_url] if cases_url else ["--data-dir", data]
    added = invoke(
        "users", "add", "ann", "--role", "analyst", "--password-stdin", *served,
        stdin=PASSWORD + "\n",
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    assert "added ann (analyst)" in added.output
    # Prompted (twice) when not piped with --password-stdin.
    prompted = invoke(
        "users", "add", "sue", "--role", "supervisor", *served,
        stdin=f"{PASSWORD}\n{PASSWORD}\n",
    )  # fmt: skip
    assert prompted.exit_code == 0, prompted.output
    # The store `fraudflow serve --data-dir DATA` reads: beside its audit log (or --cases).
    path = users_path_for(audit_path_for(audit=None, run=None, data_dir=data))
    assert path == data / "users.db"
    store = UserStore(cases_url or path)
    assert store.authenticate("sue", PASSWORD, 0).role == "supervisor"
    store.close()
    listed = invoke("users", "list", *served)
    assert listed.exit_code == 0
    assert listed.stdout.splitlines() == ["ann\tanalyst\tactive", "sue\tsupervisor\tactive"]
    assert invoke("users", "disable", "ann", *served).exit_code == 0
    assert "ann\tanalyst\tdisabled" in invoke("users", "list", *served).stdout


def test_errors_are_one_line_with_exit_2(tmp_path: Path) -> None:
    data = tmp_path / "data"
    weak = invoke(
        "users", "add", "ann", "--role", "analyst", "--password-stdin", "--data-dir", data,
        stdin="short\n",
    )  # fmt: skip
    assert weak.exit_code == 2
    assert "a password needs at least 12 characters, however got 5" in weak.output
    bad_role = invoke(
        "users", "add", "ann", "--role", "root", "--password-stdin", "--data-dir", data,
        stdin=PASSWORD + "\n",
    )  # fmt: skip
    assert bad_role.exit_code == 2 and "however got 'root'" in bad_role.output
    missing = invoke("users", "disable", "zed", "--data-dir", data)
    assert missing.exit_code == 2 and "user 'zed' does not exist" in missing.output
    nowhere = invoke("users", "list")
    assert nowhere.exit_code == 2 and "--audit PATH, or the --run" in nowhere.output
