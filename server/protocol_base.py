"""The base of every OpenAI protocol model here."""

from __future__ import annotations

import uuid
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def has_control_characters(value: str) -> bool:
    return any(ord(c) < 32 for c in value)


def check_plain_id(value: str | None) -> str | None:
    """An end-user id or a client key holds no control character: it is stored (PostgreSQL
    text holds no NUL), and a tenant's scope is joined to it by one (`\\x1f`, see
    `aligner.experiments.tenant_unit`), which a client must not be able to forge."""
    if value is not None and has_control_characters(value):
        raise ValueError("must not hold control characters (U+0000 to U+001F)")
    return value


PlainId = Annotated[str | None, AfterValidator(check_plain_id)]
UserId = PlainId


class OpenAIModel(BaseModel):
    # Unknown fields (user, metadata, store, ...) are accepted and ignored, as vLLM does.
    model_config = ConfigDict(extra="ignore")
