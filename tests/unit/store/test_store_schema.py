"""Opening a store: where it lives, SQLite's settings, and migrations that run once per
database however many threads, processes or replicas open it together."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from aligner.store import Store, StoreSchemaError
from aligner.store.engine import create_engine, resolve_url
from aligner.store.schema import LATEST, MIGRATIONS, metadata, schema_version

REPO = Path(__file__).resolve().parents[3]


def versions(store: Store) -> list[int]:
    with store.engine.connect() as conn:
        return list(conn.scalars(sa.select(schema_version.c.version).order_by(schema_version.c.version)))


def test_default_store_lives_under_aligner_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNER_HOME", str(tmp_path / "home"))
    assert resolve_url(None).render_as_string() == f"sqlite:///{tmp_path}/home/store.db"
    store = Store.open(None)
    try:
        assert (tmp_path / "home" / "store.db").exists()
    finally:
        store.close()


@pytest.mark.parametrize("given, expected", [
    ("/data/x.db", "sqlite:////data/x.db"),
    ("sqlite:///rel/x.db", "sqlite:///rel/x.db"),
    ("postgresql://u:secret@db:5432/aligner", "postgresql+psycopg://u:***@db:5432/aligner"),
    ("postgres://u@db/aligner", "postgresql+psycopg://u@db/aligner"),
    ("postgresql+psycopg://u@db/aligner", "postgresql+psycopg://u@db/aligner"),
])
def test_store_urls(given, expected):
    assert resolve_url(given).render_as_string(hide_password=True) == expected


@pytest.mark.parametrize("given, says", [
    ("mysql://u@db/x", "unsupported store URL"),
    ("postgresql+psycopg2://u@db/x", "psycopg 3"),
    ("sqlite://", "in-memory"),
    ("sqlite:///:memory:", "in-memory"),
])
def test_unsupported_urls_are_refused(given, says):
    with pytest.raises(ValueError, match=says):
        resolve_url(given)


def test_sqlite_runs_in_wal_mode_with_foreign_keys_and_a_busy_timeout(tmp_path):
    store = Store.open(str(tmp_path / "s.db"), busy_timeout_s=2.5)
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 2500
    finally:
        store.close()
    # WAL is the file's own mode: a plain sqlite3 connection sees it too.
    assert sqlite3.connect(tmp_path / "s.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_fresh_database_has_exactly_the_declared_schema(store):
    inspector = sa.inspect(store.engine)
    assert set(inspector.get_table_names()) == set(metadata.tables)
    for table in metadata.sorted_tables:
        assert {c["name"] for c in inspector.get_columns(table.name)} == set(table.columns.keys())
        declared = {tuple(i.columns.keys()) for i in table.indexes}
        assert declared <= {tuple(i["column_names"]) for i in inspector.get_indexes(table.name)}
    unique = {tuple(u["column_names"]) for u in inspector.get_unique_constraints("feedback")}
    unique |= {tuple(i["column_names"]) for i in inspector.get_indexes("feedback") if i["unique"]}
    assert ("client_key",) in unique
    assert versions(store) == [m.version for m in MIGRATIONS]


def test_reopening_applies_nothing_again(store_url):
    for _ in range(3):
        Store.open(store_url).close()
    store = Store.open(store_url)
    try:
        assert versions(store) == list(range(1, LATEST + 1))
    finally:
        store.close()


def test_threads_opening_a_new_database_together_migrate_it_once(store_url):
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []
    stores: list[Store] = []

    def open_store():
        try:
            barrier.wait()
            stores.append(Store.open(store_url))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert errors == []
        assert len(stores) == 6
        assert versions(stores[0]) == list(range(1, LATEST + 1))
    finally:
        for s in stores:
            s.close()


OPEN_ON_GO = """
import sys
from aligner.store import Store
print("ready", flush=True)
sys.stdin.readline()
Store.open(sys.argv[1]).close()
"""


def test_processes_opening_a_new_database_together_migrate_it_once(store_url):
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_ON_GO, store_url], cwd=REPO, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(3)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 3  # all imported
        for p in procs:  # then all open at once
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * 3, outputs
    store = Store.open(store_url)
    try:
        assert versions(store) == list(range(1, LATEST + 1))
    finally:
        store.close()


def test_a_version_1_store_upgrades_in_place_keeping_its_rows(store_url):
    from aligner.store.schema import migrate

    engine = create_engine(resolve_url(store_url))
    try:
        assert migrate(engine, lambda: 0.0, MIGRATIONS[:1]) == [1]
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO traces (id, created_at, conversation, conversation_hash) "
                                 "VALUES ('old', 2.0, '[]', 'h'), ('older', 1.0, '[]', 'h')"))
    finally:
        engine.dispose()
    store = Store.open(store_url)
    try:
        assert versions(store) == list(range(1, LATEST + 1))
        old = store.get_trace("old")
        assert (old["experiment"], old["arm"], old["tenant"]) == (None, None, None)  # the default tenant's
        store.put_trace({"id": "new", "conversation": [], "experiment": "tone", "arm": "helpful@2"})
        assert [(t["id"], t["seq"]) for t in store.experiment_traces("tone")] == [("new", 3)]
        with store.engine.connect() as conn:  # the stored traces numbered in the order they were made
            assert conn.execute(sa.text("SELECT id, seq FROM traces ORDER BY seq")).all() == [
                ("older", 1), ("old", 2), ("new", 3)]
        indexes = {tuple(i["column_names"]) for i in sa.inspect(store.engine).get_indexes("traces")}
        assert ("experiment", "arm") in indexes and ("tenant", "user") in indexes
        assert ("experiment", "seq") in indexes and ("experiment", "id") not in indexes
    finally:
        store.close()


def test_a_newer_schema_is_refused(store_url):
    store = Store.open(store_url)
    with store.engine.begin() as conn:
        conn.execute(schema_version.insert().values(version=LATEST + 1, description="from the future",
                                                    applied_at=0.0))
    store.close()
    with pytest.raises(StoreSchemaError, match=f"version {LATEST + 1}, newer than this aligner knows"):
        Store.open(store_url)
