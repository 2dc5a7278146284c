"""Where the review console keeps its cases and accounts: SQLite or PostgreSQL, one seam.

The case store and the accounts are written once, in SQL that both databases run, against
``Database``: ``read()`` and ``write()`` hand out a ``Connection`` (``execute`` with ``?``
placeholders, ``executemany``), ``write()`` inside one transaction. What differs between the
two is named in a ``Dialect``, and the stores put it into their SQL where it matters:

    the auto-numbered key   SQLite: INTEGER PRIMARY KEY; PostgreSQL: an identity column
    bytes                   BLOB; BYTEA
    row locks               SQLite: none (a write transaction takes the whole file's write
                            lock first, so writers run one at a time); PostgreSQL: FOR UPDATE
                            on the rows a transaction reads then changes, and FOR UPDATE SKIP
                            LOCKED where several transactions each want one free row (a case to
                            take: each gets a different one, none waits on another)

``open_database`` picks one by its target: a ``postgresql://`` (or ``postgres://``) URL is a
PostgreSQL server (``fraudflow.serve.postgres``; psycopg, the ``postgres`` extra), anything else
the path of a SQLite file (``fraudflow.serve.sqlite``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fraudflow.errors import ConfigError
from fraudflow.serve.sqlite import ThreadConnections

__all__ = [
    "POSTGRES_SCHEMES",
    "POSTGRES_URL_FORM",
    "SQLITE",
    "Connection",
    "Database",
    "Dialect",
    "Rows",
    "SqliteDatabase",
    "is_postgres_url",
    "open_database",
    "postgres_url",
    "redact_url",
]

POSTGRES_SCHEMES = ("postgresql", "postgres")
POSTGRES_URL_FORM = "postgresql://[user[:password]@]host[:port]/database"


@dataclass(frozen=True)
class Dialect:
    name: str
    serial_key: str  # an integer primary key numbered by the database
    bytes: str  # the type of a byte string
    for_update: str  # appended to a SELECT of rows the transaction goes on to change
    skip_locked: str  # appended to a SELECT of a free row to claim


SQLITE = Dialect(
    name="sqlite", serial_key="INTEGER PRIMARY KEY", bytes="BLOB", for_update="", skip_locked=""
)


class Rows(Protocol):
    """What ``execute`` returns: sqlite3's and psycopg's cursors alike."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Rows: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]], /) -> Rows: ...


class Database(Protocol):
    dialect: Dialect
    where: str  # for messages: the file's path, or the URL without its password

    def create(self, schema: str) -> None:
        """Run ``schema`` (``CREATE ... IF NOT EXISTS`` statements): safe from several
        processes at once."""
        ...

    def read(self) -> AbstractContextManager[Connection]:
        """A connection for reads; each statement sees what was committed before it."""
        ...

    def write(self) -> AbstractContextManager[Connection]:
        """A connection in a transaction, committed at the end (rolled back on an exception)."""
        ...

    def close(self) -> None: ...


class SqliteDatabase:
    """A SQLite file shared by threads (a connection each) and processes."""

    dialect = SQLITE

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        self._connections = ThreadConnections(self.path)

    def create(self, schema: str) -> None:
        self._connections.get().executescript(schema)  # commits by itself

    @contextmanager
    def read(self) -> Iterator[Connection]:
        yield self._connections.get()

    def write(self) -> AbstractContextManager[Connection]:
        return self._connections.transaction()

    def close(self) -> None:
        self._connections.close()


def is_postgres_url(target: Path | str) -> bool:
    return isinstance(target, str) and target.partition("://")[0] in POSTGRES_SCHEMES


def open_database(target: Path | str) -> Database:
    """The database at ``target``: a ``postgresql://`` URL, else a SQLite file's path.

    Raises ``ConfigError`` for a PostgreSQL server that cannot be reached, or without psycopg.
    """
    if is_postgres_url(target):
        from fraudflow.serve.postgres import PostgresDatabase  # psycopg only when asked for

        return PostgresDatabase(str(target))
    return SqliteDatabase(Path(target))


def postgres_url(url: str, *, flag: str = "--cases") -> str:
    """``url``, checked to be a PostgreSQL URL (``ConfigError`` naming ``flag`` otherwise)."""
    if not (is_postgres_url(url) and url.partition("://")[2]):
        raise ConfigError(f"{flag} must be {POSTGRES_URL_FORM}, however got {redact_url(url)!r}")
    return url


def redact_url(url: str) -> str:
    """``url`` without the password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in credentials:
        return url
    return f"{scheme}://{credentials.partition(':')[0]}:***@{host}"
