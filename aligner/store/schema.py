"""The store's tables and the migrations that build them.

Migrations are plain SQLAlchemy DDL run by a small runner here, not Alembic: the store has a
handful of tables, must migrate itself at open (no separate `alembic upgrade` step), and needs
a lock Alembic does not take: several replicas may open one database at the same moment. So
`migrate` runs every pending step in one transaction that first takes a database-wide lock:

- PostgreSQL: `pg_advisory_xact_lock`, released at commit or rollback; its DDL is
  transactional, so a step that fails leaves nothing behind.
- SQLite: `BEGIN IMMEDIATE` (the engine's `immediate` option), which takes the file's write
  lock; a second process waits its busy timeout. SQLite's DDL is transactional too.

Inside the lock the runner reads `schema_version`, applies the steps after it in order and
records each one, so a step runs once per database however many processes open it. A database
whose version is newer than `MIGRATIONS` knows is refused (`StoreSchemaError`) before anything
is touched: an older replica must not write rows a newer schema means differently.

How to change the schema: append a `Migration` (never edit a released one) and change the
tables below to the new shape. Step 1 creates the tables as version 1 defined them (frozen in
`_create_v1`), so a fresh database runs every step in turn, exactly as an old one upgrades;
`test_store_schema` checks that both end with the tables declared here. A new table may be
created from its definition below only if no later step changes it (else freeze it too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from aligner.store.errors import StoreSchemaError

metadata = sa.MetaData()

# JSONB on PostgreSQL (binary, indexable); JSON as text on SQLite. A missing value is SQL NULL.
Json = sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
# 64-bit ids on PostgreSQL; SQLite autoincrements only a column typed exactly INTEGER.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Id = sa.String(255)

# Times are UTC epoch seconds (float): one representation on both databases, cheap to compare.
traces = sa.Table(
    "traces", metadata,
    sa.Column("id", Id, primary_key=True),  # the response id
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("user", Id, nullable=True, index=True),
    sa.Column("conversation", Json, nullable=False),
    # sha256 of the conversation's canonical JSON: pairs responses to the same conversation.
    sa.Column("conversation_hash", sa.String(64), nullable=False, index=True),
    sa.Column("strategy", sa.String(64)),
    sa.Column("profile", Id),
    sa.Column("profile_version", sa.String(64)),
    sa.Column("model", Id),
    sa.Column("candidates", Json),  # [{"text": ..., "scores": {reward: score}}, ...]
    sa.Column("selected", Json),  # indices into candidates, one per returned choice
    sa.Column("usage", Json),
    sa.Column("timings", Json),
    sa.Column("extra", Json),
    # The experiment the request named and the arm (a pinned profile, "name@version") it got.
    sa.Column("experiment", Id),
    sa.Column("arm", Id),
    # The tenant whose key made the answer (NULL: the default tenant, and traces stored before
    # tenants); a user is one person within a tenant.
    sa.Column("tenant", Id),
    sa.Index("ix_traces_experiment_arm", "experiment", "arm"),
    sa.Index("ix_traces_tenant_user", "tenant", "user"),
    # The order traces were written in, one counter for every replica (`store_counters`):
    # an experiment's report reads only what was written since its last read.
    sa.Column("seq", sa.BigInteger),
    sa.Index("ix_traces_experiment_seq", "experiment", "seq"),
)

feedback = sa.Table(
    "feedback", metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("trace_id", Id, sa.ForeignKey("traces.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("user", Id, nullable=True, index=True),
    sa.Column("kind", sa.String(16), nullable=False),  # rating | preference | pairwise | comment
    sa.Column("rating", sa.Float),
    sa.Column("rating_scale", sa.String(8)),  # thumbs (-1 | 1) | stars (1..5)
    sa.Column("preferred_index", sa.Integer),  # a candidate of trace_id the user preferred
    # pairwise: the response trace_id was preferred over this one (same conversation).
    sa.Column("other_trace_id", Id, sa.ForeignKey("traces.id", ondelete="CASCADE"), index=True),
    sa.Column("comment", sa.Text),
    sa.Column("client_key", Id, unique=True),  # idempotency: one row per key
)

experiment_assignments = sa.Table(
    "experiment_assignments", metadata,
    sa.Column("experiment", Id, primary_key=True),
    sa.Column("unit", Id, primary_key=True, index=True),  # the user; indexed for delete-by-user
    sa.Column("arm", Id, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
)

# A deleted user's tombstone: a trace of theirs whose request arrived before `deleted_at` is
# dropped when it is written, on any replica (it was queued, or still streaming, at deletion).
# `tenant_key`: the tenant's name, "" for the default tenant, "*" for a deletion in every tenant.
user_deletions = sa.Table(
    "user_deletions", metadata,
    sa.Column("tenant_key", Id, primary_key=True),
    sa.Column("user", Id, primary_key=True),
    sa.Column("deleted_at", sa.Float, nullable=False, index=True),
)

# Counters every replica shares. `traces`: the last trace's `seq`; `feedback`: bumped by each
# feedback write, so that writes (and their ids) commit in the order they were numbered;
# `deletions`: bumped by every deletion of traces or feedback, so that a report kept up to date
# by new rows knows when rows it counted are gone.
store_counters = sa.Table(
    "store_counters", metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)
COUNTERS = ("traces", "feedback", "deletions")

schema_version = sa.Table(
    "schema_version", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("applied_at", sa.Float, nullable=False),
)

ADVISORY_LOCK_KEY = 0x616C69676E6572  # "aligner": one key for every aligner store in a database


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[sa.Connection], None]


def _create_v1(conn: sa.Connection) -> None:
    """The tables as version 1 made them, frozen: later steps change them from there."""
    v1 = sa.MetaData()
    sa.Table(
        "traces", v1,
        sa.Column("id", Id, primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False, index=True),
        sa.Column("user", Id, nullable=True, index=True),
        sa.Column("conversation", Json, nullable=False),
        sa.Column("conversation_hash", sa.String(64), nullable=False, index=True),
        sa.Column("strategy", sa.String(64)),
        sa.Column("profile", Id),
        sa.Column("profile_version", sa.String(64)),
        sa.Column("model", Id),
        sa.Column("candidates", Json),
        sa.Column("selected", Json),
        sa.Column("usage", Json),
        sa.Column("timings", Json),
        sa.Column("extra", Json),
    )
    sa.Table(
        "feedback", v1,
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("trace_id", Id, sa.ForeignKey("traces.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("created_at", sa.Float, nullable=False, index=True),
        sa.Column("user", Id, nullable=True, index=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("rating", sa.Float),
        sa.Column("rating_scale", sa.String(8)),
        sa.Column("preferred_index", sa.Integer),
        sa.Column("other_trace_id", Id, sa.ForeignKey("traces.id", ondelete="CASCADE"), index=True),
        sa.Column("comment", sa.Text),
        sa.Column("client_key", Id, unique=True),
    )
    sa.Table(
        "experiment_assignments", v1,
        sa.Column("experiment", Id, primary_key=True),
        sa.Column("unit", Id, primary_key=True, index=True),
        sa.Column("arm", Id, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False, index=True),
    )
    v1.create_all(conn, checkfirst=False)


def _add_trace_experiment(conn: sa.Connection) -> None:
    """traces.experiment and traces.arm (NULL for earlier traces), indexed together: an
    experiment's report reads its traces by these two."""
    for column in (traces.c.experiment, traces.c.arm):
        type_ = column.type.compile(dialect=conn.dialect)
        conn.execute(sa.text(f"ALTER TABLE traces ADD COLUMN {column.name} {type_}"))
    next(i for i in traces.indexes if i.name == "ix_traces_experiment_arm").create(conn)


def _add_trace_tenant(conn: sa.Connection) -> None:
    """traces.tenant (NULL, the default tenant, for earlier traces), indexed with the user:
    deleting a user reads their traces within one tenant."""
    type_ = traces.c.tenant.type.compile(dialect=conn.dialect)
    conn.execute(sa.text(f"ALTER TABLE traces ADD COLUMN tenant {type_}"))
    next(i for i in traces.indexes if i.name == "ix_traces_tenant_user").create(conn)


def _add_user_deletions(conn: sa.Connection) -> None:
    user_deletions.create(conn)  # unchanged since
    conn.execute(sa.text("CREATE INDEX ix_traces_experiment_id ON traces (experiment, id)"))


def _add_trace_seq(conn: sa.Connection) -> None:
    """traces.seq, numbered for the traces already stored in the order they were made, and the
    shared counters; an experiment's traces are then read by seq (the index by id goes)."""
    type_ = traces.c.seq.type.compile(dialect=conn.dialect)
    conn.execute(sa.text(f"ALTER TABLE traces ADD COLUMN seq {type_}"))
    conn.execute(sa.text(
        "UPDATE traces SET seq = numbered.n FROM (SELECT id, row_number() OVER (ORDER BY created_at, id) AS n "
        "FROM traces) AS numbered WHERE traces.id = numbered.id"))
    conn.execute(sa.text("DROP INDEX ix_traces_experiment_id"))
    next(i for i in traces.indexes if i.name == "ix_traces_experiment_seq").create(conn)
    store_counters.create(conn)
    written = conn.scalar(sa.select(sa.func.count()).select_from(traces))
    conn.execute(store_counters.insert(), [{"name": name, "value": written if name == "traces" else 0}
                                           for name in COUNTERS])


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "traces, feedback and experiment assignments", _create_v1),
    Migration(2, "traces.experiment and traces.arm (A/B experiments)", _add_trace_experiment),
    Migration(3, "traces.tenant (keys with a tenant)", _add_trace_tenant),
    Migration(4, "user_deletions (tombstones that drop a deleted user's late writes); traces by experiment and id",
              _add_user_deletions),
    Migration(5, "traces.seq and store_counters (experiment reports that read only new rows)", _add_trace_seq),
)
LATEST = MIGRATIONS[-1].version


def current_version(conn: sa.Connection) -> int:
    """The database's schema version; 0 for a database the store never opened."""
    if not sa.inspect(conn).has_table(schema_version.name):
        return 0
    return conn.scalar(sa.select(sa.func.max(schema_version.c.version))) or 0


def migrate(engine: sa.Engine, clock: Callable[[], float],
            migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Bring the database to the newest schema under a database-wide lock; returns the versions
    this call applied (empty when another process, or an earlier open, already had)."""
    known = migrations[-1].version
    # `immediate`: BEGIN IMMEDIATE on SQLite (see aligner.store.engine), ignored elsewhere.
    with engine.connect().execution_options(immediate=True) as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
        version = current_version(conn)
        if version > known:
            raise StoreSchemaError(
                f"the store's schema is version {version}, newer than this aligner knows ({known}): "
                "upgrade aligner, or give it a store of its own")
        if version == 0:
            schema_version.create(conn, checkfirst=True)
        applied = []
        for step in migrations:
            if step.version <= version:
                continue
            step.apply(conn)
            conn.execute(schema_version.insert().values(
                version=step.version, description=step.description, applied_at=clock()))
            applied.append(step.version)
    return applied
