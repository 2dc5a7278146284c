"""The review console's accounts and sign-in sessions, stored beside the cases: a SQLite file
(``users.db`` beside ``cases.db``) or the cases' PostgreSQL database (``fraudflow.serve.database``).

Accounts are made with ``fraudflow users add`` (there is no default account): a name, a role
(``analyst``, ``supervisor``, ``admin``) and an argon2id hash of the password (argon2-cffi,
its default parameters, which follow RFC 9106's recommendations). Disabling an account ends
its sessions; nothing is ever deleted, so the audit trail's names stay meaningful.

Sign-in is throttled per account name: after ``max_failures`` wrong passwords within
``failure_window_seconds`` further attempts are refused, without checking the password, until
the oldest of those failures leaves the window. A name that does not exist is checked against
a dummy hash, so the time taken does not tell which names exist.

Sessions: a random token (the cookie's value) of which only the SHA-256 digest is stored, with
its CSRF token and an expiry renewed by each use. The store is shared by the service's worker
processes (and, in PostgreSQL, its replicas), so a session opened by one is known to the others.

Times are integer microseconds since the epoch (UTC), as in the case store.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from fraudflow.errors import ConfigError, DataError
from fraudflow.serve.database import Connection, Database, open_database

__all__ = [
    "ROLES",
    "LoginRefused",
    "LoginThrottled",
    "Role",
    "Session",
    "User",
    "UserStore",
    "users_path_for",
]

Role = Literal["analyst", "supervisor", "admin"]
ROLES: tuple[str, ...] = get_args(Role)
MIN_PASSWORD_CHARS = 12
_US = 1_000_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    username TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    created_us BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS login_failures (
    username TEXT NOT NULL,
    at_us BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS login_failures_user ON login_failures (username, at_us);
CREATE TABLE IF NOT EXISTS sessions (
    token_sha256 {bytes} PRIMARY KEY,
    username TEXT NOT NULL,
    csrf TEXT NOT NULL,
    expires_us BIGINT NOT NULL
);
"""


class LoginRefused(DataError):
    """A sign-in refused: wrong name or password, a disabled account, or throttled."""


class LoginThrottled(LoginRefused):
    """A sign-in refused unchecked: too many recent failures for the account."""


@dataclass(frozen=True)
class User:
    username: str
    role: Role
    disabled: bool
    created_us: int


@dataclass(frozen=True)
class Session:
    token: str  # the cookie's value
    csrf: str  # the hidden field every POST of the session must carry
    user: User

    def csrf_matches(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented, self.csrf)


def users_path_for(audit_path: Path) -> Path:
    """The accounts file: beside the audit log (and the cases), as ``fraudflow serve`` has it."""
    return audit_path.parent / "users.db"


class UserStore:
    """Accounts, sign-in throttling and sessions in a SQLite file (a path) or a PostgreSQL
    database (a ``postgresql://`` URL); safe to share between threads and processes."""

    def __init__(
        self,
        where: Path | str,
        *,
        session_seconds: int = 8 * 3_600,
        max_failures: int = 5,
        failure_window_seconds: int = 15 * 60,
        hasher: PasswordHasher | None = None,
    ) -> None:
        if session_seconds <= 0 or max_failures <= 0 or failure_window_seconds <= 0:
            raise ConfigError("session_seconds, max_failures, failure_window_seconds must be > 0")
        self.session_us = session_seconds * _US
        self.max_failures = max_failures
        self.failure_window_us = failure_window_seconds * _US
        self._hasher = hasher or PasswordHasher()
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))
        self._database: Database = open_database(where)
        self.where = self._database.where
        self._database.create(_SCHEMA.format(bytes=self._database.dialect.bytes))

    # ---------------------------------------------------------------- accounts

    def add(self, username: str, role: str, password: str, now_us: int) -> User:
        _check_name(username)
        if role not in ROLES:
            raise DataError(f"role must be one of {', '.join(ROLES)}, however got {role!r}")
        if len(password) < MIN_PASSWORD_CHARS:
            raise DataError(
                f"a password needs at least {MIN_PASSWORD_CHARS} characters, "
                f"however got {len(password)}"
            )
        digest = self._hasher.hash(password)
        with self._write() as db:
            added = db.execute(
                "INSERT INTO users (username, role, password_hash, created_us) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (username) DO NOTHING",
                (username, role, digest, now_us),
            ).rowcount
        if not added:
            raise DataError(f"user {username!r} exists already")
        return self.get(username)

    def get(self, username: str) -> User:
        row = self._one(
            "SELECT username, role, disabled, created_us FROM users WHERE username = ?",
            (username,),
        )
        if row is None:
            raise DataError(f"user {username!r} does not exist")
        return User(row[0], row[1], bool(row[2]), row[3])

    def list(self) -> list[User]:
        rows = self._all("SELECT username, role, disabled, created_us FROM users ORDER BY username")
        return [User(r[0], r[1], bool(r[2]), r[3]) for r in rows]

    def disable(self, username: str) -> None:
        """Disable the account and end its sessions."""
        self.get(username)  # DataError naming it if it does not exist
        with self._write() as db:
            db.execute("UPDATE users SET disabled = 1 WHERE username = ?", (username,))
            db.execute("DELETE FROM sessions WHERE username = ?", (username,))

    # ---------------------------------------------------------------- signing in

    def authenticate(self, username: str, password: str, now_us: int) -> User:
        """The user, if the password is right; ``LoginRefused`` otherwise (throttled: the
        message says for how long)."""
        wait_us = self._throttled_for(username, now_us)
        if wait_us > 0:
            minutes = -(-wait_us // (60 * _US))  # rounded up
            raise LoginThrottled(
                f"too many failed sign-ins for this account: try again in {minutes} min"
            )
        row = self._one("SELECT password_hash, disabled FROM users WHERE username = ?", (username,))
        stored, disabled = (self._dummy_hash, True) if row is None else (row[0], bool(row[1]))
        if not self._verify(stored, password) or disabled:
            with self._write() as db:
                db.execute(
                    "INSERT INTO login_failures (username, at_us) VALUES (?, ?)",
                    (username, now_us),
                )
            raise LoginRefused("wrong user name or password, or the account is disabled")
        with self._write() as db:
            db.execute("DELETE FROM login_failures WHERE username = ?", (username,))
            if self._hasher.check_needs_rehash(stored):  # parameters raised since it was set
                db.execute(
                    "UPDATE users SET password_hash = ? WHERE username = ?",
                    (self._hasher.hash(password), username),
                )
        return self.get(username)

    def _throttled_for(self, username: str, now_us: int) -> int:
        """Microseconds until ``username`` may try again (0: now)."""
        since = now_us - self.failure_window_us
        rows = self._all(
            "SELECT at_us FROM login_failures WHERE username = ? AND at_us > ? "
            "ORDER BY at_us DESC LIMIT ?",
            (username, since, self.max_failures),
        )
        recent = [r[0] for r in rows]
        if len(recent) < self.max_failures:
            return 0
        return recent[-1] + self.failure_window_us - now_us

    def _verify(self, stored: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False

    # ---------------------------------------------------------------- sessions

    def open_session(self, user: User, now_us: int) -> Session:
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self._write() as db:
            db.execute("DELETE FROM sessions WHERE expires_us < ?", (now_us,))
            db.execute(
                "INSERT INTO sessions (token_sha256, username, csrf, expires_us) "
                "VALUES (?, ?, ?, ?)",
                (_digest(token), user.username, csrf, now_us + self.session_us),
            )
        return Session(token, csrf, user)

    def session(self, token: str | None, now_us: int) -> Session | None:
        """The live session of a cookie's token (its expiry renewed); None if none."""
        if not token:
            return None
        key = _digest(token)
        row = self._one(
            "SELECT s.csrf, u.username, u.role, u.disabled, u.created_us "
            "FROM sessions s JOIN users u ON u.username = s.username "
            "WHERE s.token_sha256 = ? AND s.expires_us >= ?",
            (key, now_us),
        )
        if row is None or row[3]:
            return None
        with self._write() as db:
            db.execute(
                "UPDATE sessions SET expires_us = ? WHERE token_sha256 = ?",
                (now_us + self.session_us, key),
            )
        return Session(token, row[0], User(row[1], row[2], bool(row[3]), row[4]))

    def close_session(self, token: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM sessions WHERE token_sha256 = ?", (_digest(token),))

    def close(self) -> None:
        """Close the store's connections (a later call opens new ones)."""
        self._database.close()

    def _one(self, sql: str, params: Sequence[Any]) -> Any:
        with self._database.read() as db:
            return db.execute(sql, params).fetchone()

    def _all(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Any]:
        with self._database.read() as db:
            return db.execute(sql, params).fetchall()

    def _write(self) -> AbstractContextManager[Connection]:
        return self._database.write()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _check_name(username: str) -> None:
    ok = 0 < len(username) <= 64 and all(c.isalnum() or c in "._-@" for c in username)
    if not ok:
        raise DataError(
            "a user name is 1-64 letters, digits or . _ - @, however got " + repr(username)
        )
