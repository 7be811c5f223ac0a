"""A request's limits: a wall-clock deadline and a cap on the tokens it generates, shared by
every stage, round and candidate of the request.

A strategy sees its engines and rewards through `BudgetedEngine` and `BudgetedRewards`, which
stop work at a limit instead of failing: an engine stream is cut (its unfinished samples end
with finish_reason "length", as if they had hit max_tokens), a reward call raises
`BudgetExhausted` (a `RewardError`, so a strategy keeps the answers it has, as when a reward
fails). Strategies check `Budget.spent()` before starting new work, keep their best answer so
far, and say what they skipped (`Budget.skip`); `Budget.public()` is the response's
`alignment.budget`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from aligner.rewards import RewardError
from decoding.engine import GenerationChunk, SamplingConfig, SequenceDelta

DEADLINE = "deadline"
TOKENS = "max_total_tokens"


class BudgetParams(BaseModel):
    """The request's own limits (`alignment.deadline_s`, `alignment.max_total_tokens`)."""

    model_config = ConfigDict(extra="forbid")

    deadline_s: float | None = Field(
        default=None, gt=0, le=86400,
        description="wall-clock seconds from arrival; when reached the best answer so far is returned",
    )
    max_total_tokens: int | None = Field(
        default=None, ge=1,
        description="tokens generated for the request in all, every candidate and stage counted",
    )


class BudgetExhausted(RewardError):
    """The deadline passed before a reward finished scoring: no scores, keep what you have."""


@dataclass
class Budget:
    deadline_s: float | None = None
    max_total_tokens: int | None = None
    started: float = field(default_factory=time.monotonic)
    parent: Budget | None = None
    used_tokens: int = 0
    ran_out: str | None = None  # the first limit that cut work here or in a share of this budget
    skipped: list[str] = field(default_factory=list)

    @classmethod
    def capped(cls, asked: BudgetParams, max_seconds: float | None, max_tokens: int | None,
               started: float | None = None) -> Budget:
        """The request's limits, each capped by the server's maximum, which also applies when
        the request names none."""
        return cls(_smaller(asked.deadline_s, max_seconds), _smaller(asked.max_total_tokens, max_tokens),
                   started if started is not None else time.monotonic())

    @property
    def limited(self) -> bool:
        return self.deadline_s is not None or self.max_total_tokens is not None or (
            self.parent is not None and self.parent.limited)

    def remaining_s(self) -> float | None:
        own = None if self.deadline_s is None else self.started + self.deadline_s - time.monotonic()
        return _smaller(own, self.parent.remaining_s() if self.parent else None)

    def remaining_tokens(self) -> int | None:
        own = None if self.max_total_tokens is None else self.max_total_tokens - self.used_tokens
        return _smaller(own, self.parent.remaining_tokens() if self.parent else None)

    def exhausted(self) -> str | None:
        """The limit reached now (noted), or None."""
        seconds, tokens = self.remaining_s(), self.remaining_tokens()
        limit = DEADLINE if seconds is not None and seconds <= 0 else (
            TOKENS if tokens is not None and tokens <= 0 else None)
        if limit is not None:
            self.note(limit)
        return limit

    def spent(self) -> bool:
        """A limit is reached: start no new work."""
        return self.exhausted() is not None

    def charge(self, tokens: int) -> None:
        self.used_tokens += tokens
        if self.parent is not None:
            self.parent.charge(tokens)

    def note(self, limit: str) -> None:
        if self.ran_out is None:
            self.ran_out = limit
        if self.parent is not None:
            self.parent.note(limit)

    def skip(self, what: str) -> None:
        """Record work the request planned but did not do (reported at the root)."""
        if self.parent is not None:
            self.parent.skip(what)
        else:
            self.skipped.append(what)

    def share(self, fraction: float, tokens_fraction: float | None = None) -> Budget:
        """A part of what remains (of the tokens, `tokens_fraction` if given), for work that
        must leave the rest to later work."""
        seconds, tokens = self.remaining_s(), self.remaining_tokens()
        tokens_fraction = fraction if tokens_fraction is None else tokens_fraction
        return Budget(
            None if seconds is None else max(0.0, seconds * fraction),
            None if tokens is None else max(0, int(tokens * tokens_fraction)),
            parent=self,
        )

    def public(self) -> dict[str, Any]:
        return {
            "deadline_s": self.deadline_s,
            "max_total_tokens": self.max_total_tokens,
            "elapsed_s": round(time.monotonic() - self.started, 4),
            "used_tokens": self.used_tokens,
            "exhausted": self.ran_out,
            "skipped": list(self.skipped),
        }


def _smaller(a, b):
    if a is None:
        return b
    return a if b is None else min(a, b)


class BudgetedEngine:
    """An engine whose streams stop at the request's limits (see the module docstring)."""

    def __init__(self, engine, budget: Budget):
        self.inner = engine
        self.budget = budget

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingConfig
    ) -> AsyncIterator[GenerationChunk]:
        budget = self.budget
        if budget.spent():
            yield _cut(sampling.n, set())
            return
        room = budget.remaining_tokens()
        capped = room is not None and room < sampling.max_tokens
        if capped:
            sampling = replace(sampling, max_tokens=room, min_tokens=min(sampling.min_tokens, room))
        finished: set[int] = set()
        stream = self.inner.generate(request_id, prompt_token_ids, sampling)
        try:
            while True:
                seconds = budget.remaining_s()
                try:
                    async with asyncio.timeout(seconds) if seconds is not None else contextlib.nullcontext():
                        chunk = await anext(stream)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    budget.note(DEADLINE)
                    yield _cut(sampling.n, finished)
                    return
                budget.charge(sum(len(d.token_ids) for d in chunk.sequences))
                for delta in chunk.sequences:
                    if delta.finish_reason is not None:
                        finished.add(delta.index)
                        if capped and delta.finish_reason == "length":
                            delta.cut = True  # at the budget's cap, not the request's max_tokens
                            budget.note(TOKENS)
                if not chunk.finished and len(finished) < sampling.n and budget.spent():
                    await stream.aclose()  # abort before the consumer handles the last chunk
                    yield chunk
                    yield _cut(sampling.n, finished)
                    return
                yield chunk
        finally:
            await stream.aclose()


def _cut(n: int, finished: set[int]) -> GenerationChunk:
    """The end of a stream stopped at a limit: every unfinished sample ends as if at max_tokens."""
    return GenerationChunk(0, [SequenceDelta(i, "", [], None, "length", cut=True) for i in range(n)
                               if i not in finished], finished=True)


class BudgetedRewards:
    """A reward registry whose scoring stops at the request's deadline (`BudgetExhausted`).
    Rule rewards cost nothing and always score."""

    def __init__(self, rewards, budget: Budget):
        self.inner = rewards
        self.budget = budget

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def score(self, weights: Mapping[str, float], prompt, responses: Sequence[str]):
        seconds = self.budget.remaining_s()
        free = all(getattr(self.inner.get(name), "kind", None) == "rule" for name in weights)
        if seconds is None or free:
            return await self.inner.score(weights, prompt, responses)
        name = next(iter(weights))
        if seconds <= 0:
            self.budget.note(DEADLINE)
            raise BudgetExhausted(name, "the request's deadline passed before scoring")
        try:
            async with asyncio.timeout(seconds):
                return await self.inner.score(weights, prompt, responses)
        except TimeoutError:
            self.budget.note(DEADLINE)
            raise BudgetExhausted(name, "the request's deadline passed while scoring") from None
