"""The store: traces of answered requests, feedback on them, sticky experiment arms.

One object per process, shared by threads; every method is one short transaction (or a few,
for the batched ones), so several processes and replicas can share one database. Methods are
blocking: the server calls them off the event loop, and writes that must not delay a response
go through `BackgroundWriter`.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from aligner.experiments import UNIT_SEPARATOR, tenant_unit
from aligner.store import feedback as fb
from aligner.store.engine import DEFAULT_BUSY_TIMEOUT_S, create_engine, json_dumps, resolve_url
from aligner.store.errors import StoreConflictError, StoreValidationError
from aligner.store.schema import experiment_assignments, feedback, migrate, store_counters, traces, user_deletions

TRACE_FIELDS = frozenset({
    "id", "created_at", "user", "conversation", "strategy", "profile", "profile_version", "model",
    "candidates", "selected", "usage", "timings", "extra", "experiment", "arm", "tenant",
})
EVERY_TENANT = object()  # `Store.delete_user(..., tenant=EVERY_TENANT)`: the user in every tenant
# What an experiment's report reads of each trace (not the conversation, nor the texts' extra).
EXPERIMENT_TRACE_COLUMNS = ("id", "seq", "created_at", "user", "tenant", "arm", "candidates", "selected", "usage",
                            "timings")
DAY_S = 86400.0


def conversation_hash(conversation: Any) -> str:
    """sha256 of the conversation's canonical JSON: equal for equal conversations."""
    return hashlib.sha256(json_dumps(conversation, sort_keys=True).encode()).hexdigest()


def _epoch(value: float | datetime | None) -> float | None:
    return value.timestamp() if isinstance(value, datetime) else value


class Store:
    def __init__(self, engine: sa.Engine, clock: Callable[[], float] = time.time):
        """Wraps an engine whose database is already migrated; use `Store.open`."""
        self.engine = engine
        self.clock = clock

    @classmethod
    def open(cls, url: str | None = None, *, clock: Callable[[], float] = time.time,
             busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> Store:
        """Open (and create or migrate) the store at `url`: None for
        `$ALIGNER_HOME/store.db`, a path or `sqlite:///PATH`, or `postgresql://…`."""
        engine = create_engine(resolve_url(url), busy_timeout_s)
        try:
            migrate(engine, clock)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, clock)

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    # -- transactions ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        with self.engine.connect().execution_options(immediate=True) as conn, conn.begin():
            yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def _insert(self, table: sa.Table):
        return (postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert)(table)

    @staticmethod
    def _lock(conn: sa.Connection, counter: str) -> None:
        """Hold a shared counter's row until the transaction ends, without moving it (PostgreSQL;
        SQLite's one writer holds everything already). Counters are locked in one order,
        traces then deletions, and before any row they guard, so no two writers deadlock."""
        conn.execute(sa.select(store_counters.c.value).where(store_counters.c.name == counter).with_for_update())

    @staticmethod
    def _bump(conn: sa.Connection, counter: str) -> int:
        """Add one to a shared counter and return it. The row stays locked until the
        transaction ends (PostgreSQL's row lock; SQLite's one writer), so what is numbered
        under it commits in the order of its numbers, on every replica."""
        row = store_counters.c.name == counter
        conn.execute(store_counters.update().where(row).values(value=store_counters.c.value + 1))
        return conn.scalar(sa.select(store_counters.c.value).where(row))

    def deletions(self) -> int:
        """How many deletions of traces or feedback the store has seen (any replica): a
        report kept up to date by new rows starts over when this moves."""
        with self._read() as conn:
            return conn.scalar(sa.select(store_counters.c.value).where(store_counters.c.name == "deletions"))

    # -- traces -----------------------------------------------------------------------------

    def put_trace(self, trace: Mapping[str, Any]) -> bool:
        """Store one response's trace under its id (`trace["id"]`); the same id again replaces
        it, so a retried write is harmless. Keys are `TRACE_FIELDS`; `id` and `conversation`
        are required, `created_at` (epoch seconds or datetime) defaults to now. False (nothing
        written) when its user was deleted after its request arrived (`created_at` less
        `timings.total_s`): a trace still queued or streaming at the deletion, on any replica."""
        unknown = set(trace) - TRACE_FIELDS
        if unknown:
            raise ValueError(f"unknown trace field(s) {sorted(unknown)}; known: {sorted(TRACE_FIELDS)}")
        fb.check_id(trace.get("id"), "id")
        fb.check_id(trace.get("user"), "user", required=False)
        fb.check_id(trace.get("experiment"), "experiment", required=False)
        fb.check_id(trace.get("arm"), "arm", required=False)
        fb.check_id(trace.get("tenant"), "tenant", required=False)
        if (trace.get("experiment") is None) != (trace.get("arm") is None):
            raise ValueError("a trace names both its experiment and its arm, or neither")
        if trace.get("conversation") is None:
            raise ValueError("a trace needs its conversation")
        row = {name: trace.get(name) for name in TRACE_FIELDS}
        row["created_at"] = self.clock() if row["created_at"] is None else _epoch(row["created_at"])
        row["conversation_hash"] = conversation_hash(trace["conversation"])
        stmt = self._insert(traces)
        # A retried write keeps the trace's first seq: a report that counted it counts it once.
        stmt = stmt.on_conflict_do_update(
            index_elements=[traces.c.id], set_={k: stmt.excluded[k] for k in row if k != "id"})
        total_s = (row.get("timings") or {}).get("total_s")
        arrived = row["created_at"] - (total_s if isinstance(total_s, (int, float)) else 0.0)
        with self._write() as conn:
            # The number first: its lock is what a user's deletion also takes (see delete_user),
            # so the tombstone is read after any deletion that could miss this trace committed.
            seq = self._bump(conn, "traces")
            if row["user"] is not None and conn.scalar(sa.select(user_deletions.c.user).where(
                    user_deletions.c.user == row["user"], user_deletions.c.deleted_at >= arrived,
                    user_deletions.c.tenant_key.in_([tenant_key(row["tenant"]), "*"])).limit(1)) is not None:
                return False
            conn.execute(stmt.values(**row, seq=seq))
        return True

    def get_trace(self, trace_id: str) -> dict[str, Any] | None:
        with self._read() as conn:
            return _get_trace(conn, trace_id)

    # -- feedback ---------------------------------------------------------------------------

    def add_feedback(self, trace_id: str, *, rating: float | None = None, rating_scale: str | None = None,
                     preferred_index: int | None = None, other_trace_id: str | None = None,
                     comment: str | None = None, user: str | None = None,
                     client_key: str | None = None) -> dict[str, Any]:
        """Store one piece of feedback on the response `trace_id` and return its row.

        Raises `StoreValidationError` for what the store refuses (see `aligner.store.feedback`).
        With a `client_key`, sending the same feedback again returns the first row instead of
        adding one; the same key with different content raises `StoreConflictError`."""
        return self.add_feedback_rows(trace_id, [{
            "rating": rating, "rating_scale": rating_scale, "preferred_index": preferred_index,
            "other_trace_id": other_trace_id, "comment": comment, "user": user, "client_key": client_key}])[0]

    def add_feedback_rows(self, trace_id: str, rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Several pieces of feedback on the response `trace_id` (each with `add_feedback`'s
        keywords) in one transaction: all are stored, or, when one is refused, none."""
        fb.check_id(trace_id, "trace_id")
        wanted = []
        for given in rows:
            row = {"rating": None, "rating_scale": None, "preferred_index": None, "other_trace_id": None,
                   "comment": None, "user": None, "client_key": None, **given}
            fb.check_id(row["other_trace_id"], "other_trace_id", required=False)
            kind = fb.kind_of(row["rating"], row["preferred_index"], row["other_trace_id"], row["comment"])
            fb.check_fields(rating=row["rating"], rating_scale=row["rating_scale"],
                            preferred_index=row["preferred_index"], comment=row["comment"], user=row["user"],
                            client_key=row["client_key"])
            wanted.append({"trace_id": trace_id, "kind": kind, **row})
        stored = []
        try:
            with self._write() as conn:  # an exception below rolls every row back
                self._bump(conn, "feedback")  # ids then commit in their order (see _bump)
                trace = _get_trace(conn, trace_id)
                for row in wanted:
                    other = _get_trace(conn, row["other_trace_id"]) if row["other_trace_id"] is not None else None
                    fb.check_against_traces(trace_id, trace, row["preferred_index"], row["other_trace_id"], other)
                    stored.append(self._insert_feedback(conn, row))
        except sa.exc.IntegrityError as exc:  # a foreign key: the response was deleted meanwhile
            raise StoreValidationError(f"no stored response with id {trace_id!r} (deleted just now)",
                                       "trace_id", "unknown_id") from exc
        return stored

    def _insert_feedback(self, conn: sa.Connection, row: dict[str, Any]) -> dict[str, Any]:
        """Insert one row, or return the row its client key already holds (same content)."""
        key = row["client_key"]
        by_key = sa.select(feedback).where(feedback.c.client_key == key)
        if key is not None and (earlier := conn.execute(by_key).first()) is not None:
            return self._repeat(dict(earlier._mapping), row)
        if row["comment"] is not None:
            said = conn.scalar(sa.select(sa.func.count()).select_from(feedback).where(
                feedback.c.trace_id == row["trace_id"], feedback.c.comment.is_not(None)))
            if said >= fb.MAX_COMMENTS_PER_ANSWER:
                raise StoreValidationError(f"response {row['trace_id']!r} has {said} comments, the most kept for "
                                           "one answer", "comment", "too_many_comments")
        stmt = self._insert(feedback).values(created_at=self.clock(), **row)
        if key is not None:
            # Another replica may have taken the key since we looked: keep its row.
            stmt = stmt.on_conflict_do_nothing(index_elements=[feedback.c.client_key])
        new_id = conn.execute(stmt.returning(feedback.c.id)).scalar()
        if new_id is None:
            earlier = conn.execute(by_key).first()
            return self._repeat(None if earlier is None else dict(earlier._mapping), row)
        return dict(conn.execute(sa.select(feedback).where(feedback.c.id == new_id)).one()._mapping)

    @staticmethod
    def _repeat(earlier: dict[str, Any] | None, wanted: Mapping[str, Any]) -> dict[str, Any]:
        if earlier is None:  # the row that held the key was deleted in between
            raise StoreConflictError("client_key was used for feedback that has since been deleted")
        if not fb.same_content(earlier, wanted):
            raise StoreConflictError(  # not which feedback: that may be another client's answer
                f"client_key {wanted['client_key']!r} was already used for different feedback", "client_key")
        return earlier

    def feedback_for(self, trace_id: str) -> list[dict[str, Any]]:
        """Every feedback row on the response, oldest first (pairwise rows that name it as the
        other response too)."""
        where = sa.or_(feedback.c.trace_id == trace_id, feedback.c.other_trace_id == trace_id)
        with self._read() as conn:
            rows = conn.execute(sa.select(feedback).where(where).order_by(feedback.c.id))
            return [dict(r._mapping) for r in rows]

    def iter_feedback(self, since: float | datetime | None = None,
                      batch_size: int = 500) -> Iterator[dict[str, Any]]:
        """Feedback in the order it came, each as {"feedback": row, "trace": the response's
        trace, "other_trace": the pairwise other's trace or None}, for preference export.

        Read in batches of short transactions, so a long export holds no lock; rows added
        while it runs are included, rows deleted before their batch is read are not."""
        since = _epoch(since)
        last_id = 0
        while True:
            query = sa.select(feedback).where(feedback.c.id > last_id)
            if since is not None:
                query = query.where(feedback.c.created_at >= since)
            with self._read() as conn:
                rows = [dict(r._mapping) for r in conn.execute(query.order_by(feedback.c.id).limit(batch_size))]
                ids = {r["trace_id"] for r in rows} | {r["other_trace_id"] for r in rows if r["other_trace_id"]}
                found = {t["id"]: t for t in (_trace_dict(r) for r in conn.execute(
                    sa.select(traces).where(traces.c.id.in_(ids))))} if ids else {}
            for row in rows:
                if row["trace_id"] in found:
                    yield {"feedback": row, "trace": found[row["trace_id"]],
                           "other_trace": found.get(row["other_trace_id"])}
            if len(rows) < batch_size:
                return
            last_id = rows[-1]["id"]

    # -- experiments ------------------------------------------------------------------------

    def assign_arm(self, experiment: str, unit: str, choose: Callable[[], str]) -> str:
        """The unit's arm in the experiment: the stored one, else `choose()`'s, stored. The first
        assignment wins, also when replicas assign the same unit at once."""
        fb.check_id(experiment, "experiment")
        fb.check_id(unit, "unit")
        key = (experiment_assignments.c.experiment == experiment) & (experiment_assignments.c.unit == unit)
        query = sa.select(experiment_assignments.c.arm).where(key)
        with self._read() as conn:
            arm = conn.scalar(query)
        if arm is not None:
            return arm
        arm = choose()
        fb.check_id(arm, "arm")
        with self._write() as conn:
            conn.execute(self._insert(experiment_assignments).values(
                experiment=experiment, unit=unit, arm=arm, created_at=self.clock(),
            ).on_conflict_do_nothing())
            return conn.scalar(query)

    def experiment_traces(self, experiment: str, since: float | datetime | None = None,
                          batch_size: int = 500, after_seq: int = 0) -> Iterator[dict[str, Any]]:
        """The traces of the experiment's requests (created at `since` or later), in the order
        they were written, each with `EXPERIMENT_TRACE_COLUMNS`; only those written after
        `after_seq` (a `seq` read before). Read in batches of short transactions, like
        `iter_feedback`, each a range scan of (experiment, seq)."""
        since = _epoch(since)
        columns = [traces.c[name] for name in EXPERIMENT_TRACE_COLUMNS]
        while True:
            query = sa.select(*columns).where(traces.c.experiment == experiment, traces.c.seq > after_seq)
            if since is not None:
                query = query.where(traces.c.created_at >= since)
            with self._read() as conn:
                rows = [dict(r._mapping) for r in conn.execute(query.order_by(traces.c.seq).limit(batch_size))]
            yield from rows
            if len(rows) < batch_size:
                return
            after_seq = rows[-1]["seq"]

    def experiment_feedback(self, experiment: str, since: float | datetime | None = None,
                            batch_size: int = 500, after_id: int = 0,
                            scanned: Callable[[int], None] | None = None) -> Iterator[dict[str, Any]]:
        """The ratings and pairwise preferences on the experiment's responses (created at
        `since` or later), oldest first, each as {"id", "kind", "trace_id", "arm", "rating",
        "rating_scale", "other_trace_id", "other_arm", "user"} (`user`: who judged, scoped by
        the answer's tenant as an experiment unit). A pairwise row counts only when both
        responses belong to the experiment (and to the window); `arm` is the preferred one's.
        Only rows after `after_id` (an id read before: ids commit in order, see `_bump`).

        Read by feedback id in batches (a range scan of the primary key, no sort), each then
        joined to its responses and kept when it is the experiment's: the cost is the feedback
        written after `after_id`, whatever the experiment's size. `scanned` is told the last id
        of each batch read, the experiment's or not: where the next read may start."""
        since = _epoch(since)
        last_id = after_id
        while True:
            # The batch first (a subquery with a limit is never flattened into the join), so
            # the join starts from it and not from every trace of the experiment.
            batch = sa.select(feedback).where(feedback.c.id > last_id).order_by(feedback.c.id).limit(
                batch_size).subquery("batch")
            with self._read() as conn:
                ids = list(conn.scalars(sa.select(batch.c.id)))
                if not ids:
                    return
                rows = [dict(r._mapping) for r in conn.execute(_experiment_feedback(batch, experiment, since))]
            for row in rows:
                row["user"] = tenant_unit(row.pop("tenant"), row["user"])
            yield from rows
            if scanned is not None:
                scanned(ids[-1])
            if len(ids) < batch_size:
                return
            last_id = ids[-1]

    # -- deletion and retention -------------------------------------------------------------

    def delete_trace(self, trace_id: str) -> dict[str, int]:
        """Delete the response's trace and every feedback row that names it."""
        with self._write() as conn:
            self._bump(conn, "deletions")
            removed = conn.execute(feedback.delete().where(
                sa.or_(feedback.c.trace_id == trace_id, feedback.c.other_trace_id == trace_id))).rowcount
            return {"traces": conn.execute(traces.delete().where(traces.c.id == trace_id)).rowcount,
                    "feedback": removed}

    def delete_user(self, user: str, tenant: str | None | object = None) -> dict[str, int]:
        """Delete everything stored about a user of `tenant` (None: the default tenant;
        `EVERY_TENANT`: that name in every tenant): their traces, feedback they gave on the
        tenant's answers or that names their traces, and their experiment assignments."""
        fb.check_id(user, "user")
        unit = experiment_assignments.c.unit
        if tenant is EVERY_TENANT:
            in_tenant = sa.true()
            # A named tenant's unit ends with the separator and the name; no user id holds it.
            units = sa.or_(unit == user, unit.endswith(UNIT_SEPARATOR + user, autoescape=True))
        else:
            in_tenant = traces.c.tenant.is_(None) if tenant is None else traces.c.tenant == tenant
            units = unit == tenant_unit(tenant, user)
        theirs = sa.select(traces.c.id).where(traces.c.user == user, in_tenant)
        tenants = sa.select(traces.c.id).where(in_tenant)
        tombstone = self._insert(user_deletions).values(
            tenant_key="*" if tenant is EVERY_TENANT else tenant_key(tenant), user=user, deleted_at=self.clock())
        tombstone = tombstone.on_conflict_do_update(index_elements=[user_deletions.c.tenant_key, user_deletions.c.user],
                                                    set_={"deleted_at": tombstone.excluded.deleted_at})
        with self._write() as conn:
            # No trace of the user is being written meanwhile (put_trace holds this lock from
            # before it reads the tombstones to its commit), and none after sees no tombstone.
            self._lock(conn, "traces")
            self._bump(conn, "deletions")
            conn.execute(tombstone)  # in the deletion's transaction: later writes of the user see it
            removed = conn.execute(feedback.delete().where(sa.or_(
                sa.and_(feedback.c.user == user, feedback.c.trace_id.in_(tenants)),
                feedback.c.trace_id.in_(theirs), feedback.c.other_trace_id.in_(theirs)))).rowcount
            return {
                "traces": conn.execute(traces.delete().where(traces.c.user == user, in_tenant)).rowcount,
                "feedback": removed,
                "assignments": conn.execute(experiment_assignments.delete().where(units)).rowcount,
            }

    def prune(self, older_than_days: float, batch_size: int = 1000) -> dict[str, int]:
        """Delete what is older than the retention: traces with their feedback, and experiment
        assignments (a unit seen again after that is assigned afresh). In batches, so the
        write lock is never held for long."""
        if isinstance(older_than_days, bool) or not older_than_days >= 0:
            raise ValueError(f"older_than_days must be >= 0, got {older_than_days!r}")
        cutoff = self.clock() - older_than_days * DAY_S
        counts = {"traces": 0, "feedback": 0, "assignments": 0}
        while True:
            with self._write() as conn:
                self._lock(conn, "deletions")  # before any row it deletes: see _lock
                ids = list(conn.scalars(sa.select(traces.c.id).where(traces.c.created_at < cutoff)
                                        .limit(batch_size)))
                if not ids:
                    break
                self._bump(conn, "deletions")
                counts["feedback"] += conn.execute(feedback.delete().where(sa.or_(
                    feedback.c.trace_id.in_(ids), feedback.c.other_trace_id.in_(ids)))).rowcount
                counts["traces"] += conn.execute(traces.delete().where(traces.c.id.in_(ids))).rowcount
        with self._write() as conn:
            self._lock(conn, "deletions")
            old_feedback = conn.execute(feedback.delete().where(feedback.c.created_at < cutoff)).rowcount
            if old_feedback:
                self._bump(conn, "deletions")
            counts["feedback"] += old_feedback
            counts["assignments"] += conn.execute(experiment_assignments.delete().where(
                experiment_assignments.c.created_at < cutoff)).rowcount
            # A tombstone older than the retention guards nothing a request could still write.
            conn.execute(user_deletions.delete().where(user_deletions.c.deleted_at < cutoff))
        return counts


def tenant_key(tenant: str | None) -> str:
    """A tenant as a tombstone's key: its name, "" for the default tenant."""
    return tenant or ""


def _experiment_feedback(batch: sa.Subquery, experiment: str, since: float | None) -> sa.Select:
    """The rows of a batch of feedback that are the experiment's: a rating on one of its
    responses, or a pairwise preference between two of them (both in the window)."""
    mine, other = traces.alias("mine"), traces.alias("other")
    joined = batch.join(mine, batch.c.trace_id == mine.c.id).outerjoin(other, batch.c.other_trace_id == other.c.id)
    in_window = [mine.c.experiment == experiment]
    pairwise = [batch.c.kind == "pairwise", other.c.experiment == experiment]
    if since is not None:
        in_window.append(mine.c.created_at >= since)
        pairwise.append(other.c.created_at >= since)
    return sa.select(
        batch.c.id, batch.c.kind, batch.c.trace_id, mine.c.arm, batch.c.rating, batch.c.rating_scale,
        batch.c.other_trace_id, other.c.arm.label("other_arm"), batch.c.user, mine.c.tenant,
    ).select_from(joined).where(*in_window, sa.or_(batch.c.kind == "rating", sa.and_(*pairwise))).order_by(batch.c.id)


def _trace_dict(row: sa.Row) -> dict[str, Any]:
    trace = dict(row._mapping)
    trace.pop("seq", None)  # the store's bookkeeping (write order), not the trace's
    return trace


def _get_trace(conn: sa.Connection, trace_id: str) -> dict[str, Any] | None:
    row = conn.execute(sa.select(traces).where(traces.c.id == trace_id)).first()
    return None if row is None else _trace_dict(row)
