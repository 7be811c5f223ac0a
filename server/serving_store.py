"""The store's side of serving (issue 25): traces handed to the background writer as answers
go out, and the endpoints that read traces, take feedback on them and delete them.

A write that goes with a response never waits on the database: `record` only queues it, and
a full queue or a failing write is counted (`aligner_store_errors_total`) and logged, never
seen by the client. The endpoints' own store calls run on a few threads of their own with a
timeout, and every failure of the database becomes a 503 envelope, never a 500.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aligner.alignment import AlignmentError
from aligner.store import EVERY_TENANT, BackgroundWriter, Store, StoreConflictError, StoreValidationError
from aligner.store import feedback as store_feedback
from server.api_keys import ADMIN, TENANT_RE, Principal
from server.config import StoreConfig
from server.errors import invalid_request, make_error
from server.metrics import ServerMetrics
from server.protocol import ErrorResponse
from server.protocol_base import has_control_characters
from server.protocol_store import (
    MAX_ID_CHARS,
    DeletionResponse,
    FeedbackItem,
    FeedbackRequest,
    FeedbackResponse,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

# The store's field names as the feedback request calls them.
_PARAMS = {"trace_id": "id", "preferred_index": "preferred_candidate", "other_trace_id": "preferred_over",
           "rating_scale": "rating"}
_POLL_S = 0.02
NO_STORE = ("this server keeps no store: start it with --store-traces (every answer), --allow-request-traces "
            "(answers that ask with alignment.trace) or --store URL (a store other replicas write)")
KEY_REQUIRED = ("stored traces hold users' conversations: reading and deleting them needs the server to run "
                "with --api-key or --api-key-file")


class PendingIds:
    """Trace ids queued in this process's background writer and not yet written (or failed)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ids: collections.Counter[str] = collections.Counter()

    def add(self, trace_id: str) -> None:
        with self._lock:
            self._ids[trace_id] += 1

    def done(self, trace_id: str) -> None:
        with self._lock:
            self._ids[trace_id] -= 1
            if self._ids[trace_id] <= 0:
                del self._ids[trace_id]

    def __contains__(self, trace_id: str) -> bool:
        return trace_id in self._ids


class WriterTarget:
    """What the background writer calls: the store's writes plus the server's bookkeeping
    (which trace ids are still on their way, how many traces were written)."""

    def __init__(self, store: Store, metrics: ServerMetrics, pending: PendingIds):
        self.store, self.metrics, self.pending = store, metrics, pending

    def put_trace(self, trace: dict[str, Any]) -> None:
        try:
            written = self.store.put_trace(trace)
        finally:
            self.pending.done(trace["id"])
        if written:
            self.metrics.traces_written.inc()
        else:
            logger.info("trace %s not stored: its user was deleted after the request arrived", trace["id"])

    def prune(self, older_than_days: float) -> None:
        counts = self.store.prune(older_than_days)
        if any(counts.values()):
            logger.info("store retention (%g days): deleted %s", older_than_days, counts)


class ServingStore:
    """Traces, feedback and deletion over one `Store` (or none: every endpoint then says how
    to configure one). `keyed`: the server checks API keys, which reading and deleting
    traces require."""

    def __init__(self, store: Store | None, config: StoreConfig, metrics: ServerMetrics, *, keyed: bool):
        self.store, self.config, self.metrics, self.keyed = store, config, metrics, keyed
        self.pending = PendingIds()
        self.writer: BackgroundWriter | None = None
        if store is not None:
            self.writer = BackgroundWriter(WriterTarget(store, metrics, self.pending), config.max_pending,
                                           max_pending_bytes=config.max_pending_bytes,
                                           on_error=self._count_write_error)
            metrics.watch_store_writer(self.writer)
        self._threads: ThreadPoolExecutor | None = None

    # -- traces, as answers go out ----------------------------------------------------------

    def wanted(self, asked: bool, user: str | None, experiment: bool = False) -> bool:
        """Whether this answer is traced (`aligner.plan.TraceStore`): every answer under
        `--store-traces`, one that asked (`alignment.trace: true`) under
        `--allow-request-traces`, one in an experiment whenever there is a store (its report
        counts traces). A request asking where none of these holds is refused (AlignmentError,
        a 400), not answered untraced."""
        if self.writer is not None and (self.config.traces or experiment):
            wanted = True
        elif asked and self.writer is not None and self.config.allow_request_traces:
            wanted = True
        elif asked:
            raise AlignmentError("this server does not store traces on request (start it with "
                                 "--allow-request-traces or --store-traces)", ("alignment", "trace"),
                                 "unsupported_value")
        else:
            wanted = False
        if wanted and user is not None and len(user) > MAX_ID_CHARS:
            raise AlignmentError(f"user is longer than {MAX_ID_CHARS} characters; this server stores it with "
                                 "the answer's trace, for deletion by user", ("user",))
        return wanted

    def record(self, trace: dict[str, Any]) -> bool:
        """Queue the trace (bounded: `bound_trace`) for the background writer; False when it was
        dropped. Never blocks."""
        if self.writer is None:
            return False
        trace, size = bound_trace(trace, self.config.max_trace_bytes)
        self.pending.add(trace["id"])
        if self.writer.submit("put_trace", trace, size):
            return True
        self.pending.done(trace["id"])
        return False

    def _count_write_error(self, kind: str) -> None:
        self.metrics.store_errors.labels(kind).inc()

    async def prune_periodically(self) -> None:
        """Retention: delete what is older than `retention_days`, at start and then every
        `prune_interval_s`, on a thread of its own: never queued behind traces, so never dropped
        when the writer's queue is full (the store prunes in small batches, so writes go on)."""
        if self.writer is None or self.config.retention_days is None:
            return
        target = self.writer.store
        while True:
            try:
                await asyncio.to_thread(target.prune, self.config.retention_days)
            except Exception as exc:  # noqa: BLE001 - retried at the next interval
                logger.error("store retention failed, retried in %g s: %s: %s", self.config.prune_interval_s,
                             type(exc).__name__, exc)
                self._count_write_error("write_failed")
            await asyncio.sleep(self.config.prune_interval_s)

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Finish the queued writes (for up to `timeout_s`) and stop the threads."""
        if self.writer is not None:
            writer = self.writer
            if not await asyncio.to_thread(writer.close, timeout_s):
                logger.warning("store writer: %d write(s) not done at shutdown", writer.pending)
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._threads = None

    # -- endpoints ----------------------------------------------------------------------------

    async def get_trace(self, trace_id: str, who: Principal = ADMIN) -> dict[str, Any] | ErrorResponse:
        """The stored trace of the response `trace_id` with its feedback. Another tenant's
        trace is a 404, as a missing one is: its id tells nothing."""
        if refusal := self._refusal(owner=True):
            return refusal
        await self._settled(trace_id)

        def read(store: Store):
            trace = owned(store.get_trace(trace_id), who)
            return trace, (store.feedback_for(trace_id) if trace is not None else [])

        found = await self._call("read a trace", read)
        if isinstance(found, ErrorResponse):
            return found
        trace, feedback = found
        if trace is None:
            return unknown_response(trace_id, "id")
        return public_trace(trace, feedback)

    async def add_feedback(self, request: FeedbackRequest, who: Principal = ADMIN) -> FeedbackResponse | ErrorResponse:
        """Store what `request` says as one row per kind; every row is checked against the
        stored responses before any is written, so a refused body stores nothing. Both
        responses must be the caller's tenant's: another tenant's is unknown (404)."""
        if refusal := self._refusal(owner=False):
            return refusal
        await self._settled(request.id)
        if request.preferred_over is not None:
            await self._settled(request.preferred_over)
        rows = request.rows(who.tenant)
        started = time.time()

        def write(store: Store) -> list[dict[str, Any]]:
            trace = owned(store.get_trace(request.id), who)
            other = owned(store.get_trace(request.preferred_over), who) if request.preferred_over is not None else None
            store_feedback.check_against_traces(request.id, trace, request.preferred_candidate,
                                                request.preferred_over, other)
            return store.add_feedback_rows(request.id, rows)

        stored = await self._call("store feedback", write)
        if isinstance(stored, ErrorResponse):
            if stored.error.code == "client_key_reused":  # the key as the client sent it, not as stored
                stored.error.message = f"client_key {request.client_key!r} was already used for different feedback"
            return stored
        for row in stored:
            if row["created_at"] >= started:  # an earlier row returned for a client-key retry is not new
                self.metrics.feedback.labels(row["kind"]).inc()
        return FeedbackResponse(response_id=request.id, data=[FeedbackItem.from_row(row) for row in stored])

    async def delete_trace(self, trace_id: str, who: Principal = ADMIN) -> DeletionResponse | ErrorResponse:
        """Delete the response's trace and every feedback row that names it (the caller's
        tenant's trace only: another's is a 404)."""
        if refusal := self._refusal(owner=True):
            return refusal
        await self._settled(trace_id)

        def delete(store: Store) -> dict[str, int]:
            if owned(store.get_trace(trace_id), who) is None:
                return {"traces": 0, "feedback": 0}
            return store.delete_trace(trace_id)

        deleted = await self._call("delete a trace", delete)
        if isinstance(deleted, ErrorResponse):
            return deleted
        if not deleted["traces"]:
            return unknown_response(trace_id, "id")
        return DeletionResponse(response_id=trace_id, deleted=deleted)

    async def delete_user(self, user: str, who: Principal = ADMIN,
                          tenant: str | None = None) -> DeletionResponse | ErrorResponse:
        """Delete everything stored about `user` of the caller's tenant, after this process's
        queued writes (which may hold their answers) are done. An admin deletes the name in
        every tenant, or in `tenant` when it names one; a client names no other tenant."""
        if refusal := self._refusal(owner=True):
            return refusal
        if not user or len(user) > MAX_ID_CHARS or has_control_characters(user):
            return invalid_request(f"user must be 1 to {MAX_ID_CHARS} characters, none a control character", "user")
        if tenant is not None and not who.admin and tenant != who.tenant:
            return make_error("only an admin key deletes users of another tenant; a client key deletes its "
                              "own tenant's users (leave tenant out)", 403, param="tenant", code="permission_denied")
        if tenant is not None and not TENANT_RE.match(tenant):
            return invalid_request("tenant is 1 to 64 letters, digits, '.', '_' or '-'", "tenant")
        scope = tenant if tenant is not None else (EVERY_TENANT if who.admin else who.tenant)
        writer, wait_s = self.writer, self.config.trace_wait_s

        def delete(store: Store) -> dict[str, int]:
            if not writer.flush(wait_s):
                logger.warning("deleting user data while %d store write(s) are still queued", writer.pending)
            return store.delete_user(user, scope)

        asked = time.time()  # the tombstone's time is this or later
        deleted = await self._call("delete a user's data", delete)
        if isinstance(deleted, ErrorResponse):
            return deleted
        return DeletionResponse(user=user, deleted=deleted, complete_before=asked)

    # -- helpers ------------------------------------------------------------------------------

    def _refusal(self, owner: bool) -> ErrorResponse | None:
        if self.store is None:  # not a fault to retry (no 5xx): nothing is stored here
            return make_error(NO_STORE, 404, code="store_not_configured")
        if owner and not self.keyed:
            return make_error(KEY_REQUIRED, 403, code="api_key_required")
        return None

    async def _settled(self, trace_id: str) -> None:
        """Wait (up to `trace_wait_s`) while this process still has the trace queued: feedback
        may come right after the answer, before its trace is written."""
        deadline = time.monotonic() + self.config.trace_wait_s
        while trace_id in self.pending and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)

    async def run(self, what: str, fn: Callable[[Store], T], timeout_s: float | None = None) -> T | ErrorResponse:
        """`fn(store)` for another serving module (experiments), as the endpoints here call it."""
        return await self._call(what, fn, timeout_s)

    async def _call(self, what: str, fn: Callable[[Store], T], timeout_s: float | None = None) -> T | ErrorResponse:
        """`fn(store)` on the store's threads, bounded by `timeout_s` (default `request_timeout_s`);
        the store's refusals as 4xx, every other failure as a 503 (counted and logged)."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(max_workers=self.config.threads, thread_name_prefix="store")
        loop = asyncio.get_running_loop()
        timeout_s = self.config.request_timeout_s if timeout_s is None else timeout_s
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._threads, functools.partial(fn, self.store)),
                                          timeout_s)
        except StoreValidationError as exc:
            status = 404 if exc.code == "unknown_id" else 400
            return make_error(exc.message, status, param=_PARAMS.get(exc.param, exc.param), code=exc.code)
        except StoreConflictError as exc:
            return make_error(exc.message, 409, param=exc.param, code="client_key_reused")
        except TimeoutError:
            return self._failed(what, f"no answer within {timeout_s:g} s")
        except Exception as exc:  # noqa: BLE001 - any database fault is a 503, never a 500
            logger.error("store: could not %s: %s: %s", what, type(exc).__name__, exc)
            return self._failed(what, type(exc).__name__)

    def _failed(self, what: str, why: str) -> ErrorResponse:
        self.metrics.store_errors.labels("request_failed").inc()
        return make_error(f"the store could not {what} ({why}); try again later", 503, code="store_unavailable")


def bound_trace(trace: dict[str, Any], max_bytes: int) -> tuple[dict[str, Any], int]:
    """(the trace within `max_bytes` of JSON where it can be, its size). Beyond the bound the
    request's own settings (`extra.request`: stop strings, choices, schemas...), then the
    tools, then the answers as returned (the candidates hold them too) are each replaced by
    `{"truncated": true, "bytes": N}`, in that order, until it fits; the conversation and the
    candidates are kept whole (the engine's context bounds them)."""
    def size(value: Any) -> int:
        return len(json.dumps(value, default=str, ensure_ascii=False).encode())

    total = size(trace)
    extra = trace.get("extra")
    if total <= max_bytes or not isinstance(extra, dict):
        return trace, total
    extra = dict(extra)
    for name in ("request", "tools", "choices"):
        if total <= max_bytes:
            break
        if extra.get(name) is None:
            continue
        part = size(extra[name])
        extra[name] = {"truncated": True, "bytes": part}
        total -= part - size(extra[name])
    return {**trace, "extra": extra}, total


def owned(trace: dict[str, Any] | None, who: Principal) -> dict[str, Any] | None:
    """The trace if it is `who`'s to see (their tenant's, or any for an admin), else None:
    another tenant's trace is answered as a missing one."""
    return trace if trace is not None and who.owns(trace.get("tenant")) else None


def unknown_response(trace_id: str, param: str) -> ErrorResponse:
    return make_error(f"no stored response with id {trace_id!r}", 404, param=param, code="unknown_id")


def public_trace(trace: dict[str, Any], feedback: list[dict[str, Any]]) -> dict[str, Any]:
    """A stored trace as `GET /v1/alignment/traces/{id}` answers it: its columns, what the
    server put in `extra` (endpoint, choices as returned, request settings, tools, the rest
    of the alignment report), and the feedback on it."""
    body = {"object": "alignment.trace"}
    body.update({k: trace.get(k) for k in ("id", "created_at", "user", "model", "strategy", "profile",
                                           "profile_version", "conversation", "candidates", "selected", "usage",
                                           "timings")})
    body.update(trace.get("extra") or {})
    body["feedback"] = [FeedbackItem.from_row(row).model_dump() for row in feedback]
    return body
