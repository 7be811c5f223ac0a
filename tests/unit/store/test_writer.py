"""The background writer: a response never waits on the store, and a full, slow or broken
store is counted, logged and survived."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
import time

import pytest

from aligner.store import BackgroundWriter, Store
from aligner.store.writer import QUEUE_FULL, UNKNOWN_OPERATION, WRITE_FAILED

# What "returns at once" means here: far below any store timeout, with room for a busy CI box.
QUICK_S = 0.1


class GatedStore:
    """A store whose writes wait for `gate` and raise for payloads named "boom"."""

    def __init__(self):
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.traces: list[dict] = []

    def put_trace(self, trace):
        self.entered.set()
        self.gate.wait(10)
        if trace["id"] == "boom":
            raise RuntimeError("disk on fire")
        self.traces.append(trace)


def timed_submit(writer, fn_name, payload) -> tuple[bool, float]:
    started = time.perf_counter()
    accepted = writer.submit(fn_name, payload)
    return accepted, time.perf_counter() - started


def test_a_full_queue_drops_the_write_and_counts_it():
    store, kinds = GatedStore(), []
    writer = BackgroundWriter(store, max_pending=2, on_error=kinds.append)
    assert writer.submit("put_trace", {"id": "t0"})
    assert store.entered.wait(5)  # t0 is being written (and held), the queue is empty
    assert writer.submit("put_trace", {"id": "t1"}) and writer.submit("put_trace", {"id": "t2"})
    accepted, took = timed_submit(writer, "put_trace", {"id": "t3"})
    assert (accepted, kinds) == (False, [QUEUE_FULL])
    assert took < QUICK_S
    assert writer.stats() == {"submitted": 3, "written": 0, "dropped": 1, "failed": 0, "pending": 3,
                              "pending_bytes": 0}
    assert writer.full
    assert writer.flush(timeout=0.05) is False  # still held
    store.gate.set()
    assert writer.flush(timeout=5)
    assert [t["id"] for t in store.traces] == ["t0", "t1", "t2"]
    assert writer.stats()["written"] == 3
    assert writer.close()


def test_the_queue_is_bounded_in_bytes_too():
    store, kinds = GatedStore(), []
    writer = BackgroundWriter(store, max_pending=100, max_pending_bytes=1000, on_error=kinds.append)
    assert writer.submit("put_trace", {"id": "t0"}, 10)
    assert store.entered.wait(5)  # held; its bytes left the queue with it
    assert writer.pending_bytes == 0
    assert writer.submit("put_trace", {"id": "t1"}, 600) and not writer.full
    assert not writer.submit("put_trace", {"id": "t2"}, 600) and kinds == [QUEUE_FULL]  # 1200 > 1000
    assert writer.submit("put_trace", {"id": "t3"}, 400) and writer.full  # exactly at the bound
    store.gate.set()
    assert writer.flush(timeout=5) and writer.pending_bytes == 0 and not writer.full
    assert [t["id"] for t in store.traces] == ["t0", "t1", "t3"]
    assert writer.close()


def test_a_write_that_raises_is_counted_and_logged_once_and_the_thread_goes_on(caplog):
    store, kinds = GatedStore(), []
    store.gate.set()
    writer = BackgroundWriter(store, on_error=kinds.append)
    with caplog.at_level(logging.ERROR, logger="aligner.store.writer"):
        for trace_id in ["boom", "boom", "ok", "boom"]:
            assert writer.submit("put_trace", {"id": trace_id})
        assert writer.flush(timeout=5)
    assert (writer.written, writer.failed, kinds) == (1, 3, [WRITE_FAILED] * 3)
    assert [t["id"] for t in store.traces] == ["ok"]
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1  # a broken store logs once a minute, not once per response
    assert "disk on fire" in failures[0].getMessage() and failures[0].exc_info
    assert writer.close()


def test_unknown_operations_and_writes_after_close_are_dropped():
    store, kinds = GatedStore(), []
    store.gate.set()
    writer = BackgroundWriter(store, on_error=kinds.append)
    assert writer.submit("drop_all_tables", None) is False
    assert writer.submit("put_trace", {"id": "last"})
    assert writer.close(timeout=5)  # finishes what was queued
    assert [t["id"] for t in store.traces] == ["last"]
    assert writer.submit("put_trace", {"id": "late"}) is False
    assert kinds == [UNKNOWN_OPERATION, QUEUE_FULL]
    assert writer.dropped == 2


def test_a_failing_error_hook_does_not_reach_the_caller():
    def hook(kind):
        raise RuntimeError("metrics down")

    store = GatedStore()
    writer = BackgroundWriter(store, max_pending=1, on_error=hook)
    writer.submit("put_trace", {"id": "t0"})
    store.entered.wait(5)
    writer.submit("put_trace", {"id": "t1"})
    assert writer.submit("put_trace", {"id": "t2"}) is False  # full, and the hook raised
    store.gate.set()
    assert writer.close(timeout=5)


def trace(i: int) -> dict:
    return {"id": f"r{i}", "conversation": [{"role": "user", "content": str(i)}]}


def test_submit_returns_at_once_while_the_database_is_locked(tmp_path):
    store = Store.open(str(tmp_path / "s.db"), busy_timeout_s=10)
    writer = BackgroundWriter(store)
    holder = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        results = [timed_submit(writer, "put_trace", trace(i)) for i in range(20)]
        assert all(accepted for accepted, _ in results)
        assert max(took for _, took in results) < QUICK_S
        time.sleep(0.2)
        assert writer.written == 0 and writer.pending == 20  # the worker waits on the lock
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert writer.flush(timeout=10)
    assert (writer.written, writer.failed) == (20, 0)
    assert store.get_trace("r19") is not None
    writer.close()
    store.close()


def break_store(store: Store, backend: str, store_url: str, tmp_path, postgres=None) -> None:
    if backend == "sqlite":
        shutil.rmtree(tmp_path)  # the database's directory is gone
    else:
        import psycopg

        name = store_url.rsplit("/", 1)[1]
        with psycopg.connect(postgres.url("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')  # and its connections killed
    store.engine.dispose()  # what is pooled is gone too: every write needs a new connection


def test_a_broken_store_is_counted_and_survived(store_url, backend, tmp_path, request):
    postgres = request.getfixturevalue("postgres") if backend == "postgresql" else None
    store, kinds = Store.open(store_url, busy_timeout_s=1), []
    writer = BackgroundWriter(store, on_error=kinds.append)
    assert writer.submit("put_trace", trace(0)) and writer.flush(timeout=5) and writer.written == 1
    break_store(store, backend, store_url, tmp_path, postgres)
    results = [timed_submit(writer, "put_trace", trace(i)) for i in range(1, 6)]
    assert all(accepted for accepted, _ in results)
    assert max(took for _, took in results) < QUICK_S
    assert writer.flush(timeout=30)
    assert (writer.written, writer.failed, kinds) == (1, 5, [WRITE_FAILED] * 5)
    # The thread is still there to take the next write.
    assert writer.submit("delete_user", "alice") and writer.flush(timeout=30) and writer.failed == 6
    assert writer.close(timeout=5)
    store.close()


def test_max_pending_must_be_positive():
    with pytest.raises(ValueError, match="max_pending"):
        BackgroundWriter(GatedStore(), max_pending=0)
