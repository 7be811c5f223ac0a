"""A throwaway PostgreSQL server started from the local binaries, for tests of the store (unit
tests in `tests/unit/store/`, servers sharing one database in `tests/integration/`).

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` system user
(`runuser`); otherwise as the current user. Callers skip, saying why (`NO_BINARIES`), only
when no PostgreSQL binaries are installed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

PG_BIN_DIRS = [Path(os.environ["ALIGNER_TEST_PG_BIN"])] if "ALIGNER_TEST_PG_BIN" in os.environ else [
    Path(f"/usr/lib/postgresql/{v}/bin") for v in (17, 16, 15, 14)]
NO_BINARIES = f"no PostgreSQL binaries (initdb, pg_ctl) on PATH or in {[str(d) for d in PG_BIN_DIRS]}"


def pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    return next((d for d in PG_BIN_DIRS if (d / "initdb").exists() and (d / "pg_ctl").exists()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, bin_dir: Path, base: Path, port: int, as_user: list[str]):
        self.bin_dir, self.base, self.port, self.as_user = bin_dir, base, port, as_user
        self.data = base / "data"
        self._names = itertools.count()

    def run(self, tool: str, *args: str) -> None:
        cmd = [*self.as_user, str(self.bin_dir / tool), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            log = self.base / "server.log"
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                               + (f"\nserver log:\n{log.read_text()}" if log.exists() else ""))

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"store_{next(self._names)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "server.log"), "-w", "-t", "30",
                 "-o", options, "start")

    def stop(self) -> None:
        """Stop at once, as a crash would (connections are cut, nothing is flushed)."""
        self.run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")


@contextlib.contextmanager
def running_postgres(bin_dir: Path) -> Iterator[PostgresServer]:
    """A fresh PostgreSQL cluster on a free loopback port, removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="aligner-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse root
        owner = pwd.getpwnam("postgres")
        os.chown(base, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    server = PostgresServer(bin_dir, base, _free_port(), as_user)
    try:
        server.run("initdb", "-D", str(server.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                   "--locale=C", "--no-sync")
        server.start()
        yield server
    finally:
        if server.running:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)
