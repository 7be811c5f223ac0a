"""Pydantic models of the store's endpoints: feedback on a response, and what the trace and
deletion endpoints answer (`server.serving_store` holds the logic)."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from server.protocol_base import PlainId, UserId

# Ids, users and keys fit the store's columns (255); a client key leaves room for the suffix
# that tells apart the rows one feedback body becomes (`FeedbackRequest.rows`).
MAX_ID_CHARS = 255
MAX_CLIENT_KEY_CHARS = 200
MAX_COMMENT_CHARS = 10_000

THUMBS = {"up": 1, "down": -1}


class FeedbackRequest(BaseModel):
    """`POST /v1/alignment/feedback`: what a user said about the response `id`.

    Any of: `thumbs` ("up"/"down") or `rating` (1..5 stars); `preferred_candidate` (an index
    into the trace's candidates, as `alignment.candidates[i].index` reports them);
    `preferred_over` (another response to the same conversation that this one beat); and a
    free-text `comment`. Unknown fields are refused, never ignored.
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    thumbs: Literal["up", "down"] | None = None
    rating: StrictInt | None = Field(default=None, ge=1, le=5)
    preferred_candidate: StrictInt | None = Field(default=None, ge=0)
    preferred_over: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)
    comment: str | None = Field(default=None, min_length=1, max_length=MAX_COMMENT_CHARS)
    user: UserId = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)
    client_key: PlainId = Field(default=None, min_length=1, max_length=MAX_CLIENT_KEY_CHARS)

    @model_validator(mode="after")
    def _says_something(self):
        if self.thumbs is not None and self.rating is not None:
            raise ValueError("give thumbs or rating, not both: they are two scales for one judgement")
        if self.comment is not None and not self.comment.strip():
            raise ValueError("comment must be non-empty text")
        if all(getattr(self, name) is None for name in
               ("thumbs", "rating", "preferred_candidate", "preferred_over", "comment")):
            raise ValueError("feedback needs thumbs, rating, preferred_candidate, preferred_over or comment")
        return self

    def rows(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """The store rows this body becomes, one per thing it says (the store keeps one kind
        per row): a rating, a preferred candidate, a pairwise preference, in that order. The
        comment rides on the first of them, or is a row of its own when it is all there is.
        Each row gets its own client key, `<client_key>:<kind>`, within the tenant's own key
        space (`<tenant digest>\\x1f<client_key>:<kind>` for a named tenant)."""
        rows: list[dict[str, Any]] = []
        if self.thumbs is not None:
            rows.append({"rating": THUMBS[self.thumbs], "rating_scale": "thumbs"})
        elif self.rating is not None:
            rows.append({"rating": self.rating, "rating_scale": "stars"})
        if self.preferred_candidate is not None:
            rows.append({"preferred_index": self.preferred_candidate})
        if self.preferred_over is not None:
            rows.append({"other_trace_id": self.preferred_over})
        if not rows:
            rows.append({})
        rows[0]["comment"] = self.comment
        for row in rows:
            row["user"] = self.user
            row["client_key"] = None if self.client_key is None else f"{_scope(tenant)}{self.client_key}:{_kind(row)}"
        return rows


def _scope(tenant: str | None) -> str:
    """The prefix of a tenant's client keys: a short digest (a key and its suffix still fit the
    column) and a separator no client key holds. The default tenant's keys have none."""
    if tenant is None:
        return ""
    return hashlib.blake2b(tenant.encode(), digest_size=6).hexdigest() + "\x1f"


def _kind(row: dict[str, Any]) -> str:
    if "rating" in row:
        return "rating"
    if "preferred_index" in row:
        return "preference"
    if "other_trace_id" in row:
        return "pairwise"
    return "comment"


class FeedbackItem(BaseModel):
    """One stored feedback row, in the request's terms."""

    id: int
    object: Literal["alignment.feedback"] = "alignment.feedback"
    created_at: float
    response_id: str
    kind: Literal["rating", "preference", "pairwise", "comment"]
    rating: float | None = None
    rating_scale: Literal["thumbs", "stars"] | None = None
    preferred_candidate: int | None = None
    preferred_over: str | None = None
    comment: str | None = None
    user: str | None = None
    client_key: str | None = None  # the client's key, as sent

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> FeedbackItem:
        key = row.get("client_key")
        return cls(
            id=row["id"], created_at=row["created_at"], response_id=row["trace_id"], kind=row["kind"],
            rating=row.get("rating"), rating_scale=row.get("rating_scale"),
            preferred_candidate=row.get("preferred_index"), preferred_over=row.get("other_trace_id"),
            comment=row.get("comment"), user=row.get("user"),
            client_key=None if key is None else (key.rpartition(":")[0] or key).rpartition("\x1f")[2],
        )


class FeedbackResponse(BaseModel):
    object: Literal["list"] = "list"
    response_id: str
    data: list[FeedbackItem]


class DeletionResponse(BaseModel):
    object: Literal["alignment.deletion"] = "alignment.deletion"
    response_id: str | None = None
    user: str | None = None
    deleted: dict[str, int]
    # A user's deletion holds for every request that arrived before this time (epoch seconds):
    # no row of theirs from one will appear later, here or on a replica sharing the store.
    complete_before: float | None = None
