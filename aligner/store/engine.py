"""From a `--store` value to a SQLAlchemy engine: SQLite under `$ALIGNER_HOME` by default,
PostgreSQL (psycopg 3) when given a `postgresql://` URL.

SQLite is set up for one writer thread beside readers in several processes: WAL journal
(readers never block the writer), a busy timeout (a writer waits for the lock instead of
failing at once), foreign keys on, and transactions begun by us rather than by the sqlite3
module, which skips BEGIN before SELECT and DDL (so migrations would not be atomic). A
connection run with the `immediate` execution option begins with BEGIN IMMEDIATE: it takes
the write lock up front, so a transaction that reads and then writes cannot fail half-way on
a lock another writer took in between.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from decoding.home import aligner_home

logger = logging.getLogger(__name__)

DEFAULT_FILENAME = "store.db"
DEFAULT_BUSY_TIMEOUT_S = 5.0


def resolve_url(url: str | None) -> sa.URL:
    """`None` -> `sqlite:///$ALIGNER_HOME/store.db`; a bare path -> a SQLite file;
    `postgresql://` or `postgres://` -> the psycopg 3 driver."""
    if url is None:
        return sa.URL.create("sqlite", database=str(aligner_home() / DEFAULT_FILENAME))
    if "://" not in url:
        return sa.URL.create("sqlite", database=str(Path(url).expanduser()))
    parsed = sa.make_url(url)
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg"):
            raise ValueError(f"PostgreSQL stores use the psycopg 3 driver, not {driver!r}: give postgresql://…")
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if driver not in ("", "pysqlite"):
            raise ValueError(f"SQLite stores use Python's sqlite3 driver, not {driver!r}: give sqlite:///PATH")
        if parsed.database in (None, "", ":memory:") or "mode=memory" in url:
            raise ValueError("an in-memory SQLite store is lost with its process: give sqlite:///PATH")
        return parsed.set(drivername="sqlite")
    raise ValueError(f"unsupported store URL {parsed.render_as_string(hide_password=True)!r}: "
                     "give sqlite:///PATH or postgresql://USER@HOST/DB")


def json_dumps(value: Any, *, sort_keys: bool = False) -> str:
    """JSON with NaN and infinities as null: PostgreSQL's jsonb refuses them (a reward that
    failed may score NaN), and both databases must hold the same thing."""
    return json.dumps(_finite(value), ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def create_engine(url: sa.URL, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> sa.Engine:
    if url.get_backend_name() == "postgresql":
        return sa.create_engine(
            url, json_serializer=json_dumps, pool_pre_ping=True,
            # A store that does not answer must not hold a writer forever.
            connect_args={"connect_timeout": max(1, math.ceil(busy_timeout_s))},
        )
    Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, json_serializer=json_dumps)
    _configure_sqlite(engine, busy_timeout_s)
    return engine


def _configure_sqlite(engine: sa.Engine, busy_timeout_s: float) -> None:
    @sa.event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (on_begin)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            cursor.execute("PRAGMA foreign_keys = ON")
            _enable_wal(cursor, busy_timeout_s)
            # WAL + NORMAL: a crash never corrupts; a power cut may lose the last commits.
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def on_begin(conn):
        immediate = conn.get_execution_options().get("immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _enable_wal(cursor, busy_timeout_s: float) -> None:
    # WAL is a property of the file, set once. Switching needs a moment of exclusive access,
    # and two processes creating the database together may collide on it: retry for the
    # busy timeout (the switch does not always wait on the busy handler).
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            break
        except Exception as exc:  # sqlite3.OperationalError: database is locked
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    if mode.lower() != "wal":
        logger.warning("the SQLite store cannot use WAL here (journal mode %s): writers will "
                       "block readers", mode)
