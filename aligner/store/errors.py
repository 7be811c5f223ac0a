"""What the store raises. Each error names the request field it is about (`param`), so the
server can map it to an OpenAI-style 4xx error without parsing messages."""

from __future__ import annotations


class StoreError(Exception):
    """Base of the store's own errors (database driver errors pass through unchanged)."""


class StoreValidationError(StoreError, ValueError):
    """A value the store refuses: `code` is "unknown_id" for an id it does not hold (a 404) and
    "invalid_value" for a value out of range or a field that does not belong (a 400)."""

    def __init__(self, message: str, param: str, code: str = "invalid_value"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class StoreConflictError(StoreError):
    """A client key reused for different feedback (a 409): the first use stands."""

    def __init__(self, message: str, param: str = "client_key"):
        super().__init__(message)
        self.message = message
        self.param = param


class StoreSchemaError(StoreError):
    """The database's schema is newer than this aligner knows: it refuses rather than guess."""
