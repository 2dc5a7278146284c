"""Console accounts: adding, disabling, signing in, throttling, sessions; each test on both
stores, a SQLite file and a real PostgreSQL server's database (``cases_url``)."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from fraudflow.errors import DataError
from fraudflow.serve.users import LoginRefused, UserStore

T0 = 1_780_000_000 * 1_000_000
MINUTE = 60 * 1_000_000
PASSWORD = "correct horse battery"


@pytest.fixture
def store(cases_url: str | None, tmp_path: Path) -> Iterator[UserStore]:
    # Cheap hashing parameters: these tests are about the rules, not the hash's cost.
    cheap = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    store = UserStore(cases_url or tmp_path / "users.db", hasher=cheap, session_seconds=3_600)
    yield store
    store.close()


def test_accounts_are_added_listed_and_disabled(store: UserStore) -> None:
    assert store.list() == []  # no default account
    store.add("ann", "analyst", PASSWORD, T0)
    store.add("sue", "supervisor", PASSWORD, T0)
    assert [(u.username, u.role, u.disabled) for u in store.list()] == [
        ("ann", "analyst", False), ("sue", "supervisor", False)
    ]  # fmt: skip
    with pytest.raises(DataError, match="user 'ann' exists already"):
        store.add("ann", "admin", PASSWORD, T0)
    roles = "role must be one of analyst, supervisor, admin, however got 'boss'"
    with pytest.raises(DataError, match=roles):
        store.add("bob", "boss", PASSWORD, T0)
    with pytest.raises(DataError, match="at least 12 characters, however got 5"):
        store.add("bob", "analyst", "short", T0)
    with pytest.raises(DataError, match="however got 'a b'"):
        store.add("a b", "analyst", PASSWORD, T0)
    store.disable("ann")
    assert store.get("ann").disabled
    with pytest.raises(DataError, match="user 'zed' does not exist"):
        store.disable("zed")


def test_the_password_is_stored_hashed(
    store: UserStore, cases_url: str | None, tmp_path: Path
) -> None:
    store.add("ann", "analyst", PASSWORD, T0)
    if cases_url is None:
        assert PASSWORD.encode() not in (tmp_path / "users.db").read_bytes()
    else:
        import psycopg

        with psycopg.connect(cases_url) as db:
            rows = db.execute("SELECT * FROM users").fetchall()
        assert len(rows) == 1 and PASSWORD not in repr(rows)
        assert "$argon2id$" in repr(rows)
    assert store.authenticate("ann", PASSWORD, T0).role == "analyst"


def test_wrong_passwords_unknown_and_disabled_accounts_are_refused(store: UserStore) -> None:
    store.add("ann", "analyst", PASSWORD, T0)
    for name, password in [("ann", "wrong password!"), ("nobody", PASSWORD)]:
        with pytest.raises(LoginRefused, match="wrong user name or password"):
            store.authenticate(name, password, T0)
    store.disable("ann")
    with pytest.raises(LoginRefused, match="wrong user name or password"):
        store.authenticate("ann", PASSWORD, T0)


def test_five_failures_in_fifteen_minutes_throttle_the_account(store: UserStore) -> None:
    store.add("ann", "analyst", PASSWORD, T0)
    store.add("bob", "analyst", PASSWORD, T0)
    for i in range(5):
        with pytest.raises(LoginRefused, match="wrong user name"):
            store.authenticate("ann", "wrong password!", T0 + i * MINUTE)
    # Throttled: even the right password is refused, with how long to wait.
    with pytest.raises(LoginRefused, match=r"too many failed sign-ins.*try again in 10 min"):
        store.authenticate("ann", PASSWORD, T0 + 5 * MINUTE)
    assert store.authenticate("bob", PASSWORD, T0 + 5 * MINUTE).username == "bob"  # per account
    # The first failure leaves the window after 15 minutes: one more try is allowed.
    assert store.authenticate("ann", PASSWORD, T0 + 15 * MINUTE + 1).username == "ann"


def test_sessions_expire_renew_and_end(store: UserStore) -> None:
    user = store.add("ann", "analyst", PASSWORD, T0)
    session = store.open_session(user, T0)
    found = store.session(session.token, T0 + 50 * MINUTE)
    assert found is not None and found.user.username == "ann" and found.csrf == session.csrf
    assert found.csrf_matches(session.csrf) and not found.csrf_matches("forged")
    assert store.session(session.token, T0 + 100 * MINUTE) is not None  # renewed at 50 min
    assert store.session(session.token, T0 + 161 * MINUTE) is None  # idle for over an hour
    assert store.session("not-a-token", T0) is None
    second = store.open_session(user, T0)
    store.close_session(second.token)
    assert store.session(second.token, T0) is None
    third = store.open_session(user, T0)
    store.disable("ann")
    assert store.session(third.token, T0) is None
