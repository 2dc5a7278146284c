"""What /readyz reports: causes named from real errors, stalls, recovery (``Health``)."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest
import redis

from fraudflow.serve.health import AUDIT_LOG, STATE_STORE, FolderProbe, Health, cause_of


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (sqlite3.OperationalError("database or disk is full"), "disk full"),
        (sqlite3.OperationalError("attempt to write a readonly database"), "read-only file system"),
        (sqlite3.OperationalError("disk I/O error"), "I/O error"),
        (OSError(errno.ENOSPC, "No space left on device"), "disk full"),
        (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
        (redis.exceptions.ConnectionError("Connection refused"), "unreachable"),
        (ValueError("something else"), "failed"),
    ],
)
def test_causes_are_named_from_real_errors(error: Exception, cause: str) -> None:
    assert cause_of(error) == cause


def test_a_cause_is_found_behind_a_wrapping_error() -> None:
    try:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.Error as inner:
            raise RuntimeError("audit log cannot be opened") from inner
    except RuntimeError as outer:
        assert cause_of(outer) == "disk full"


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_failure_lasts_until_a_success_and_a_stalled_call_is_not_responding(
    tmp_path: Path,
) -> None:
    clock = _Clock()
    probes = {STATE_STORE: [FolderProbe(tmp_path)], AUDIT_LOG: [FolderProbe(tmp_path)]}
    health = Health(probes, stall_seconds=2.0, clock=clock)
    with pytest.raises(sqlite3.OperationalError), health.watch(AUDIT_LOG):
        raise sqlite3.OperationalError("database or disk is full")
    assert health.problems() == {AUDIT_LOG: "disk full"}
    with pytest.raises(KeyError), health.watch(STATE_STORE, ignore=(KeyError,)):
        raise KeyError("a refused request says nothing about the store")
    assert health.problems() == {AUDIT_LOG: "disk full"}
    with health.watch(AUDIT_LOG):
        pass
    assert health.problems() == {}
    with health.watch(STATE_STORE):
        clock.now = 2.5
        assert health.problems() == {STATE_STORE: "not responding"}
    assert health.problems() == {}


def test_the_probe_clears_a_failure_once_the_folder_takes_a_write(tmp_path: Path) -> None:
    health = Health({AUDIT_LOG: [FolderProbe(tmp_path)]}, stall_seconds=2.0)
    health.failed(AUDIT_LOG, "disk full")
    health.probe_once()  # the folder is writable: the probe's write succeeds
    assert health.problems() == {}
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
