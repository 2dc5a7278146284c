"""A real PostgreSQL server for the tests, on 127.0.0.1 and a free port, in a temporary folder.

Debian's ``postgresql`` package (``.ci/run`` installs it) puts the server's programs in
``/usr/lib/postgresql/<version>/bin``. The server refuses to run as root, so as root (CI, the
development machines) it runs as the package's ``postgres`` user, in a folder that user owns.
Durability is switched off (``fsync``, ``synchronous_commit``): the tests are about behaviour.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

__all__ = ["PostgresServer", "postgres_bin"]

_USER = "fraudflow"  # the superuser initdb makes: the URL's user


def postgres_bin() -> Path | None:
    """The folder of the newest installed server's programs, or None if there is none."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=_version, reverse=True)
    if found:
        return found[0].parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


def _version(pg_ctl: Path) -> tuple[int, ...]:
    name = pg_ctl.parent.parent.name
    return tuple(int(part) for part in name.split(".") if part.isdigit())


class PostgresServer:
    """Started by ``start``, stopped (and its folder removed) by ``stop``."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="fraudflow-pg-"))  # outside pytest's 0700 tree
        self.port = _free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def start(self) -> None:
        data = self.root / "data"
        self._run("initdb", "-D", str(data), "-U", _USER, "--auth=trust", "--no-sync",
                  "--encoding=UTF8", "--locale=C")  # fmt: skip
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        log = str(self.root / "server.log")
        self._run("pg_ctl", "-D", str(data), "-l", log, "-o", options, "-w", "-t", "60", "start")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{_USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        import psycopg

        name = "test_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name} STRATEGY FILE_COPY")
        return self.url(name)

    def _run(self, program: str, *args: str) -> None:
        command = [*self._as, str(self.bin_dir / program), *args]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.is_file() else ""
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr}\n{tail}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
