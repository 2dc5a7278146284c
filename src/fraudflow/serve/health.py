"""Whether the state store and the audit log work: what ``/readyz`` reports beside the model.

``Health`` keeps, per part (``state_store``, ``audit_log``), the cause of its latest failure
or None. Two sources feed it:

* The requests' own calls: a failure names its cause (``cause_of``: disk full, read-only file
  system, Redis unreachable, ...); a success clears it. A call still running after
  ``stall_seconds`` (a frozen disk, a hung Redis) counts as "not responding" while it runs.
* A probe (``probe_once``, in a thread every ``interval_seconds``): a read-only file system
  under a SQLite file, and a Redis that does not answer PING, fail a part before any request
  has to; while a part has failed, the probe also writes, syncs and deletes a small file
  beside its SQLite file, and a success clears the failure, so the service turns ready again
  once the disk has room or is writable again without waiting for a request to try.

Everything ``/readyz`` reads (``problems``) is in memory: a readiness check never touches a
disk or the network, so it answers even while both hang.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fraudflow.serve.redis_shards import is_cluster, redis_client

__all__ = ["AUDIT_LOG", "STATE_STORE", "FolderProbe", "Health", "RedisProbe", "cause_of"]

log = logging.getLogger(__name__)

STATE_STORE, AUDIT_LOG = "state_store", "audit_log"
_PROBE_BYTES = 64 * 1024  # a few SQLite pages and WAL frames

# Causes are fixed phrases (they are shown to anyone who may call /readyz): no paths, no text
# of the underlying error.
DISK_FULL = "disk full"
READ_ONLY = "read-only file system"
NO_PERMISSION = "permission denied"
IO_ERROR = "I/O error"
UNREACHABLE = "unreachable"
NOT_RESPONDING = "not responding"
FAILED = "failed"

_CAUSE_OF_ERRNO = {
    errno.ENOSPC: DISK_FULL,
    errno.EDQUOT: DISK_FULL,
    errno.EFBIG: DISK_FULL,
    errno.EROFS: READ_ONLY,
    errno.EACCES: NO_PERMISSION,
    errno.EPERM: NO_PERMISSION,
    errno.EIO: IO_ERROR,
}
# SQLite reports these as text only (sqlite3.OperationalError).
_CAUSE_OF_SQLITE_TEXT = (
    ("database or disk is full", DISK_FULL),
    ("readonly database", READ_ONLY),
    ("read-only", READ_ONLY),
    ("disk i/o error", IO_ERROR),
)


def cause_of(exc: BaseException, folder: Path | None = None) -> str:
    """The cause of a failed call, as one of the fixed phrases above.

    ``folder``: where the failing file lives; a read-only or full file system there is the
    cause whatever SQLite's message says (it reports "unable to open database file" for a
    read-only folder).
    """
    if folder is not None:
        found = _folder_condition(folder)
        if found is not None:
            return found
    for error in _chain(exc):
        if isinstance(error, OSError) and error.errno in _CAUSE_OF_ERRNO:
            return _CAUSE_OF_ERRNO[error.errno]
        if isinstance(error, sqlite3.Error):
            text = str(error).lower()
            for fragment, cause in _CAUSE_OF_SQLITE_TEXT:
                if fragment in text:
                    return cause
        if type(error).__module__.startswith("redis"):  # ConnectionError, TimeoutError, ...
            return UNREACHABLE
    return FAILED


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _folder_condition(folder: Path) -> str | None:
    """READ_ONLY or DISK_FULL if the file system of ``folder`` says so, else None."""
    try:
        st = os.statvfs(_existing(folder))
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return READ_ONLY
    free = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may use the reserve
    return DISK_FULL if free == 0 else None


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


@dataclass(frozen=True)
class FolderProbe:
    """A SQLite file's folder: read-only is a failure; while failed, a write must work."""

    folder: Path

    def check(self, *, failed: bool) -> str | None:
        found = _folder_condition(self.folder)
        if found == READ_ONLY or not failed:
            return found if found == READ_ONLY else None
        return self._write()

    def _write(self) -> str | None:
        probe = _existing(self.folder) / f".fraudflow-probe-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * _PROBE_BYTES)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            return cause_of(exc)
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
        return None


class RedisProbe:
    """A Redis server that must answer PING within ``timeout_seconds``."""

    def __init__(self, url: str, *, timeout_seconds: float = 1.0) -> None:
        self._url = url
        self._options = {"socket_timeout": timeout_seconds,
                         "socket_connect_timeout": timeout_seconds}  # fmt: skip
        self._client: Any = None

    def check(self, *, failed: bool) -> str | None:
        # A cluster client connects (discovers the slots) when made: made at the first probe,
        # so that a cluster down at start-up is a failed probe, not a failed start.
        try:
            if self._client is None:
                self._client = redis_client(self._url, **self._options)
            if is_cluster(self._client):  # every master must answer
                self._client.ping(target_nodes=self._client.PRIMARIES)
            else:
                self._client.ping()
            if is_cluster(self._client):
                # Every slot served: CLUSTERDOWN (a master lost, its replica not yet
                # promoted) fails the decisions, so it fails readiness too.
                state = self._client.cluster_info(target_nodes="random")
                if state.get("cluster_state") != "ok":
                    return UNREACHABLE
        except Exception as exc:
            if is_cluster(self._client):  # discover the cluster afresh at the next probe
                with contextlib.suppress(Exception):
                    self._client.close()
                self._client = None
            return cause_of(exc)
        return None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


Probe = FolderProbe | RedisProbe


class Health:
    """The condition of each part (module docstring). Thread-safe."""

    def __init__(
        self,
        probes: dict[str, Sequence[Probe]],
        *,
        stall_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probes = probes
        self._stall = stall_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._causes: dict[str, str] = {}
        self._running: dict[int, tuple[str, float]] = {}  # calls in progress: part, start
        self._tokens = itertools.count()

    def failed(self, part: str, cause: str) -> None:
        with self._lock:
            if self._causes.get(part) != cause:
                log.warning("%s: %s", part.replace("_", " "), cause)
            self._causes[part] = cause

    def succeeded(self, part: str) -> None:
        if part in self._causes:  # read without the lock: the usual case costs nothing
            with self._lock:
                if self._causes.pop(part, None) is not None:
                    log.warning("%s: working again", part.replace("_", " "))

    @contextlib.contextmanager
    def watch(
        self,
        part: str,
        folder: Path | None = None,
        *,
        ignore: tuple[type[Exception], ...] = (),
    ) -> Iterator[None]:
        """Around one call of ``part``: running, it may stall; its outcome is recorded.
        ``ignore``: errors that say nothing about the part (a refused request)."""
        with self._running_call(part):
            try:
                yield
            except ignore:
                raise
            except Exception as exc:
                self.failed(part, cause_of(exc, folder))
                raise
        self.succeeded(part)

    @contextlib.contextmanager
    def _running_call(self, part: str) -> Iterator[None]:
        token = next(self._tokens)
        self._running[token] = (part, self._clock())
        try:
            yield
        finally:
            del self._running[token]

    def problems(self) -> dict[str, str]:
        """Each failing part and its cause; in memory only (never blocks)."""
        now = self._clock()
        found = dict(self._causes)
        for part, started in list(self._running.values()):
            if now - started > self._stall and part not in found:
                found[part] = NOT_RESPONDING
        return found

    def probe_once(self) -> None:
        """Check every part (module docstring); blocking: run it in a thread."""
        for part, probes in self._probes.items():
            failed = part in self._causes
            with self._running_call(part):  # a probe that hangs shows as "not responding"
                causes = [c for p in probes if (c := p.check(failed=failed)) is not None]
            if causes:
                self.failed(part, causes[0])
            elif failed:
                self.succeeded(part)

    def close(self) -> None:
        for probe in itertools.chain.from_iterable(self._probes.values()):
            if isinstance(probe, RedisProbe):
                probe.close()
