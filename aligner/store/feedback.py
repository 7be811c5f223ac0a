"""Feedback rows: what one piece of feedback may say, checked before it is stored.

One row says one thing, its `kind`:

- rating: `rating` on a `rating_scale`, thumbs (-1 down, 1 up) or stars (1..5, whole);
- preference: `preferred_index`, the candidate of the response the user preferred;
- pairwise: `other_trace_id`, a response to the same conversation that this one was
  preferred over;
- comment: free text only. A comment may also accompany any of the three above.

A request that says several things is several rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aligner.store.errors import StoreValidationError

KINDS = ("rating", "preference", "pairwise", "comment")
RATING_SCALES = {"thumbs": (-1, 1), "stars": (1, 2, 3, 4, 5)}
MAX_COMMENT_CHARS = 10_000
MAX_COMMENTS_PER_ANSWER = 50  # with MAX_COMMENT_CHARS, at most about 0.5 MB of comments per answer
MAX_ID_CHARS = 255  # ids, users and client keys (the columns' width)

# The fields a feedback row is compared on when its client key comes again.
CONTENT_FIELDS = ("trace_id", "kind", "rating", "rating_scale", "preferred_index",
                  "other_trace_id", "comment", "user")


def kind_of(rating: Any, preferred_index: Any, other_trace_id: Any, comment: Any) -> str:
    """The one thing a row says; a comment rides along with any of them.

    >>> kind_of(rating=None, preferred_index=2, other_trace_id=None, comment="clearer")
    'preference'
    >>> kind_of(rating=None, preferred_index=None, other_trace_id=None, comment="thanks")
    'comment'
    """
    said = [name for name, value in (("rating", rating), ("preferred_index", preferred_index),
                                     ("other_trace_id", other_trace_id)) if value is not None]
    if len(said) > 1:
        raise StoreValidationError(
            f"one feedback row says one thing; {' and '.join(said)} go in separate feedback", said[1])
    if said:
        return {"rating": "rating", "preferred_index": "preference", "other_trace_id": "pairwise"}[said[0]]
    if comment is None:
        raise StoreValidationError(
            "feedback needs a rating, preferred_index, other_trace_id or comment", "rating")
    return "comment"


def check_id(value: Any, param: str, required: bool = True) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or not value:
        raise StoreValidationError(f"{param} must be a non-empty string", param)
    if len(value) > MAX_ID_CHARS:
        raise StoreValidationError(f"{param} is longer than {MAX_ID_CHARS} characters", param)


def check_fields(*, rating: Any, rating_scale: Any, preferred_index: Any, comment: Any,
                 user: Any, client_key: Any) -> None:
    """Checks that need no database: types and ranges."""
    check_id(user, "user", required=False)
    check_id(client_key, "client_key", required=False)
    if rating is not None:
        if rating_scale not in RATING_SCALES:
            raise StoreValidationError(
                f"rating_scale must be one of {sorted(RATING_SCALES)}, got {rating_scale!r}", "rating_scale")
        allowed = RATING_SCALES[rating_scale]
        if isinstance(rating, bool) or not isinstance(rating, (int, float)) or rating not in allowed:
            raise StoreValidationError(
                f"a {rating_scale} rating is one of {list(allowed)}, got {rating!r}", "rating")
    elif rating_scale is not None:
        raise StoreValidationError("rating_scale without a rating", "rating_scale")
    if preferred_index is not None and (isinstance(preferred_index, bool) or not isinstance(preferred_index, int)):
        raise StoreValidationError(f"preferred_index must be an integer, got {preferred_index!r}",
                                   "preferred_index")
    if comment is not None:
        if not isinstance(comment, str) or not comment.strip():
            raise StoreValidationError("comment must be non-empty text", "comment")
        if len(comment) > MAX_COMMENT_CHARS:
            raise StoreValidationError(f"comment is longer than {MAX_COMMENT_CHARS} characters", "comment")


def check_against_traces(trace_id: str, trace: Mapping[str, Any] | None, preferred_index: int | None,
                         other_trace_id: str | None, other: Mapping[str, Any] | None) -> None:
    """Checks against the stored responses: both exist, the index names a candidate, a
    pairwise preference compares two different answers to one conversation."""
    if trace is None:
        raise StoreValidationError(f"no stored response with id {trace_id!r}", "trace_id", "unknown_id")
    if preferred_index is not None:
        count = len(trace.get("candidates") or ())
        if not 0 <= preferred_index < count:
            raise StoreValidationError(
                f"preferred_index {preferred_index} is out of range: response {trace_id!r} has "
                f"{count} candidate(s)", "preferred_index")
    if other_trace_id is not None:
        if other_trace_id == trace_id:
            raise StoreValidationError("a pairwise preference needs two different responses",
                                       "other_trace_id")
        if other is None:
            raise StoreValidationError(f"no stored response with id {other_trace_id!r}",
                                       "other_trace_id", "unknown_id")
        if other["conversation_hash"] != trace["conversation_hash"]:
            raise StoreValidationError(
                f"responses {trace_id!r} and {other_trace_id!r} answer different conversations",
                "other_trace_id")


def same_content(row: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    return all(row[name] == wanted[name] for name in CONTENT_FIELDS)
