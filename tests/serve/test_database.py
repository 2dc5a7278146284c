"""The console's storage seam: choosing SQLite or PostgreSQL, and what an unusable
``--cases`` database says. The stores' behaviour on both is in test_cases.py and
test_users.py (each test runs on both)."""

import sys
import threading
from pathlib import Path

import pytest

from fraudflow.errors import ConfigError
from fraudflow.serve.cases import CaseStore
from fraudflow.serve.database import SqliteDatabase, open_database, postgres_url, redact_url
from fraudflow.serve.users import UserStore


def test_a_path_is_a_sqlite_file_and_a_postgresql_url_a_server(
    tmp_path: Path, postgres_url: str
) -> None:
    sqlite = open_database(tmp_path / "cases.db")
    assert isinstance(sqlite, SqliteDatabase) and sqlite.dialect.name == "sqlite"
    sqlite.close()
    server = open_database(postgres_url)
    assert server.dialect.name == "postgresql" and server.where == postgres_url
    server.close()


def test_passwords_never_show_in_messages() -> None:
    assert (
        redact_url("postgresql://app:s3cret@db:5432/cases") == "postgresql://app:***@db:5432/cases"
    )
    assert redact_url("postgresql://app@db/cases") == "postgresql://app@db/cases"
    assert redact_url("postgresql://db/cases") == "postgresql://db/cases"
    with pytest.raises(ConfigError, match=r"however got 'mysql://app:\*\*\*@db/cases'"):
        postgres_url("mysql://app:s3cret@db/cases")


def test_without_psycopg_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` now fails
    with pytest.raises(ConfigError, match=r"needs psycopg: pip install 'fraudflow\[postgres\]'"):
        open_database("postgresql://app:s3cret@127.0.0.1:1/cases")


def test_an_unreachable_server_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"cannot connect to postgresql://app:\*\*\*@127.0.0.1:1"):
        open_database("postgresql://app:s3cret@127.0.0.1:1/cases")


def test_replicas_starting_at_once_create_the_schema_once(postgres_url: str) -> None:
    """Every replica creates the tables it needs (IF NOT EXISTS) as it starts; at once, they
    must not collide in PostgreSQL's catalogue."""
    barrier = threading.Barrier(6)
    failures: list[BaseException] = []

    def start(make: type[CaseStore] | type[UserStore]) -> None:
        barrier.wait()
        try:
            make(postgres_url).close()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=start, args=(kind,)) for kind in [CaseStore, UserStore] * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
