"""The base of every OpenAI protocol model here."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, ConfigDict


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    # Unknown fields (user, metadata, store, ...) are accepted and ignored, as vLLM does.
    model_config = ConfigDict(extra="ignore")
