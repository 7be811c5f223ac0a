"""Where answered requests, feedback on them and experiment arms are kept (issue 25).

    store = Store.open(None)                 # $ALIGNER_HOME/store.db, or "postgresql://…"
    writer = BackgroundWriter(store)         # responses never wait on the database
    writer.submit("put_trace", {"id": "chatcmpl-1", "conversation": [...], ...})
    store.add_feedback("chatcmpl-1", rating=1, rating_scale="thumbs", client_key="k1")

Modules: `engine` (URL -> SQLAlchemy engine, SQLite settings), `schema` (tables and
migrations), `feedback` (what feedback may say), `store` (the `Store`), `writer`
(`BackgroundWriter`), `errors`.
"""

from aligner.store.errors import StoreConflictError, StoreError, StoreSchemaError, StoreValidationError
from aligner.store.store import EVERY_TENANT, EXPERIMENT_TRACE_COLUMNS, TRACE_FIELDS, Store, conversation_hash
from aligner.store.writer import BackgroundWriter

__all__ = [
    "EVERY_TENANT", "EXPERIMENT_TRACE_COLUMNS", "TRACE_FIELDS", "BackgroundWriter", "Store", "StoreConflictError", "StoreError",
    "StoreSchemaError", "StoreValidationError", "conversation_hash",
]
