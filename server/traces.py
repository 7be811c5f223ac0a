"""A response's trace: what the store keeps of one answered chat or Responses request.

Built from what the request and the strategy already hold, after the answer is built, and
handed to the store's background writer; nothing here waits on the database.
"""

from __future__ import annotations

import time
from typing import Any

from aligner.strategies import StrategyResult
from aligner.strategies.base import Candidate
from server.alignment import ResolvedAlignment

# Report fields the trace keeps in columns of their own.
_REPORT_COLUMNS = ("stages", "candidates")


def trace_candidates(result: StrategyResult) -> tuple[list[dict[str, Any]], list[int]]:
    """(every candidate the strategy weighed, the positions of the returned choices among them).

    A strategy that weighs no candidates (`none`, `blockwise`, ...) has its choices as
    candidates, so a preferred index always means one answer the user could have seen."""
    pool: list[Candidate] = result.candidates or result.choices
    candidates = [dict(c.public(), cut=c.cut) for c in pool]
    selected = []
    for choice in result.choices:
        position = next((i for i, c in enumerate(pool) if c is choice), None)
        if position is None:  # a copy (an output stage's revision): match by index, else unknown
            position = next((i for i, c in enumerate(pool) if c.index == choice.index and c.text == choice.text), None)
        selected.append(position)
    return candidates, selected


def build_trace(
    *, response_id: str, endpoint: str, request, messages: list[dict[str, Any]], tools: list | None,
    resolved: ResolvedAlignment, result: StrategyResult, report: dict[str, Any], choices: list[dict[str, Any]],
    usage: dict[str, Any], started: float, profile: tuple[str | None, str | None], tenant: str | None = None,
) -> dict[str, Any]:
    """The trace of one answered request, as `Store.put_trace` takes it.

    `messages` is the conversation as the chat template saw it (roles normalised, content
    parts joined): equal conversations hash equal, which pairs responses for pairwise
    feedback. `choices` are the answers as returned; `started` is `time.perf_counter()` at
    arrival; `tenant` owns the trace (None: the default tenant)."""
    candidates, selected = trace_candidates(result)
    info = {k: v for k, v in report.items() if k not in _REPORT_COLUMNS}
    return {
        "id": response_id,
        "created_at": time.time(),
        "user": request.user or None,
        "tenant": tenant,
        "conversation": messages,
        "model": request.model,
        "strategy": resolved.strategy.name,
        "profile": profile[0],
        "profile_version": profile[1],
        # The report reads an experiment's traces by these two (the arm is a profile version).
        "experiment": (resolved.experiment or {}).get("name"),
        "arm": (resolved.experiment or {}).get("arm"),
        "candidates": candidates,
        "selected": selected,
        "usage": usage,
        "timings": {"total_s": round(time.perf_counter() - started, 4),
                    "stages": report.get("stages", [])},
        "extra": {
            "endpoint": endpoint,
            "choices": choices,
            # What the client set besides the conversation: sampling, n, tools, format...
            "request": request.model_dump(mode="json", exclude_defaults=True,
                                          exclude={"messages", "alignment", "user", "model"}),
            "tools": tools,
            # The alignment report less what has a column: source, params, scores, fallback, budget...
            "alignment": info,
        },
    }
