"""Writes that never delay or fail a response: queued in memory, done by one daemon thread.

`submit` only appends to a bounded queue under a lock the worker holds for a pop, so it returns
at once even while the database is slow or locked. The queue is bounded in writes and in bytes
(each write's size, as the submitter measured it). A full queue drops the write; a write that
raises is logged (at most once per `log_interval_s`, with a count) and dropped; either way the
counters move and `on_error(kind)` is called, so the server can export them as metrics.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# The store methods a write may name; each takes the payload as its one argument.
OPERATIONS = frozenset({"put_trace", "delete_trace", "delete_user", "prune"})

QUEUE_FULL = "queue_full"  # dropped at submit: the queue was full, or the writer closed
WRITE_FAILED = "write_failed"  # the store raised
UNKNOWN_OPERATION = "unknown_operation"  # dropped at submit: not one of OPERATIONS


class BackgroundWriter:
    """`store.<operation>(payload)` for each `submit`, in order, on one daemon thread.

    `on_error(kind)` is called (from the submitting or the writer thread) with `QUEUE_FULL`,
    `WRITE_FAILED` or `UNKNOWN_OPERATION`; the counters `submitted`, `written`, `dropped` and
    `failed` are plain ints (`submitted == written + failed + pending`)."""

    def __init__(self, store: Any, max_pending: int = 1000, *, max_pending_bytes: int | None = None,
                 on_error: Callable[[str], None] | None = None, log_interval_s: float = 60.0):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.store = store
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes  # None: bounded in writes only
        self.pending_bytes = 0  # the sizes of the queued writes (not of the one in progress)
        self.on_error = on_error
        self.log_interval_s = log_interval_s
        # Plain counters, written under the lock, read without it.
        self.submitted = 0
        self.written = 0
        self.dropped = 0
        self.failed = 0
        self._queue: collections.deque[tuple[str, Any, int]] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._last_log: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="aligner-store-writer", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Writes queued or in progress."""
        return len(self._queue) + self._busy

    @property
    def full(self) -> bool:
        """Whether the queue is at its bound in writes or in bytes (the next write may drop)."""
        return len(self._queue) >= self.max_pending or (
            self.max_pending_bytes is not None and self.pending_bytes >= self.max_pending_bytes)

    def stats(self) -> dict[str, int]:
        return {"submitted": self.submitted, "written": self.written, "dropped": self.dropped,
                "failed": self.failed, "pending": self.pending, "pending_bytes": self.pending_bytes}

    def _fits(self, size: int) -> bool:
        if len(self._queue) >= self.max_pending:
            return False
        return self.max_pending_bytes is None or self.pending_bytes + size <= self.max_pending_bytes

    def submit(self, fn_name: str, payload: Any, size: int = 0) -> bool:
        """Queue `store.<fn_name>(payload)`, `size` bytes of it; False when dropped. Never blocks,
        never raises."""
        try:
            with self._cond:
                if fn_name in OPERATIONS and not self._closed and self._fits(size):
                    self._queue.append((fn_name, payload, size))
                    self.pending_bytes += size
                    self.submitted += 1
                    self._cond.notify()
                    return True
                self.dropped += 1
                closed = self._closed
            if fn_name not in OPERATIONS:
                self._log(UNKNOWN_OPERATION, "store write %r is not one of %s: dropped",
                          fn_name, sorted(OPERATIONS))
                self._report(UNKNOWN_OPERATION)
            else:
                self._log(QUEUE_FULL, "store writer %s: %s dropped", "closed" if closed else
                          f"full ({len(self._queue)} writes, {self.pending_bytes} bytes pending)", fn_name)
                self._report(QUEUE_FULL)
        except Exception:  # noqa: BLE001 - a store problem must never reach the response
            logger.exception("store writer: submit failed")
        return False

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted write is done (written or failed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float | None = 5.0) -> bool:
        """Finish the queued writes (for up to `timeout`) and stop the thread; later submits are
        dropped. True when everything was done in time. The store stays open: its owner closes it."""
        started = time.monotonic()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        return self.flush(left) and not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return  # closed and drained
                fn_name, payload, size = self._queue.popleft()
                self.pending_bytes -= size
                self._busy = True
            ok = False
            try:
                getattr(self.store, fn_name)(payload)
                ok = True
            except Exception as exc:  # noqa: BLE001 - counted and logged; the thread keeps going
                self._log(WRITE_FAILED, "store write %s failed: %s: %s", fn_name, type(exc).__name__, exc,
                          exc=exc)
            finally:
                with self._cond:
                    self._busy = False
                    if ok:
                        self.written += 1
                    else:
                        self.failed += 1
                    self._cond.notify_all()
            if not ok:
                self._report(WRITE_FAILED)

    def _log(self, kind: str, message: str, *args: Any, exc: BaseException | None = None) -> None:
        # A broken store fails every write: one line per kind a minute, not one per response.
        count = self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
        now = time.monotonic()
        if now - self._last_log.get(kind, -float("inf")) >= self.log_interval_s:
            self._last_log[kind] = now
            self._unlogged[kind] = 0
            logger.error(message + " (%d time(s) since the last report)", *args, count, exc_info=exc)

    def _report(self, kind: str) -> None:
        if self.on_error is None:
            return
        try:
            self.on_error(kind)
        except Exception:  # noqa: BLE001
            logger.exception("store writer: on_error hook failed")
