"""WAL checkpoints of a SQLite file in a background thread, off the request path.

In WAL mode SQLite by default checkpoints inside the COMMIT that pushes the WAL past
``wal_autocheckpoint`` pages: that commit copies megabytes into the database file and fsyncs
it, and every request waiting on it (an audit group commit, a state transaction) waits too:
a tail-latency spike every few thousand decisions. The connections that write set
``wal_autocheckpoint=0``; a ``Checkpointer`` runs ``PRAGMA wal_checkpoint(PASSIVE)`` on its
own connection every ``interval_seconds``. PASSIVE never waits for readers or writers: it
copies what it can, and the next writer restarts the WAL from its start once all of it was
copied. Several processes may each run one on the same file; one that finds the checkpoint
lock taken just tries again later.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, path: Path, *, interval_seconds: float = 1.0) -> None:
        self.path = Path(path)
        self.interval_seconds = interval_seconds
        self.checkpoints = 0  # completed PASSIVE checkpoints, for tests and curiosity
        self._stop = threading.Event()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._thread = threading.Thread(
            target=self._run, name=f"fraudflow-checkpoint-{self.path.name}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop the thread, then one last checkpoint (the writers have closed or will)."""
        self._stop.set()
        self._thread.join()
        self._checkpoint()
        self._db.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            self._checkpoint()

    def _checkpoint(self) -> None:
        try:
            busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:  # a full disk, a removed file: the writers will say so
            log.warning("WAL checkpoint of %s failed: %s", self.path, exc)
            return
        if not busy:
            self.checkpoints += 1
