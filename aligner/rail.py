"""The output rail: a check of the *answer*, not only of the request, on every strategy's output.

    {"alignment": {"profile": "harmless"}}                 # harmless@4 and later carry one
    {"alignment": {"strategy": "best_of_n", "rail": {"model": "harmful-response"}}}

A registered classifier scores (the request's last user turn, a window of the answer): the
last `window_words` words of the answer so far, every `every_words` words and at the end.
At or above its threshold (the request's `rail.threshold`, else the one recorded with the
model) the answer stops, is replaced by `refusal`, and the choice finishes with OpenAI's
`content_filter`. `alignment.rail` says what was checked and which choices it stopped.

A whole answer (not streamed) is replaced whole: none of it has left the server, and a window
that fails says the answer serves the request, its earlier words included (the model often sees
it only once a few dozen words are there). Keeping the words before the failing window would
answer "complies, then refuses".

Streamed, the rail holds each piece of text back until a check has passed over it, so a
window that fails is never sent; what passed earlier checks was sent and stays, and the
refusal follows it; `first_words` (default `every_words`) holds more of the opening back, so
that the first check reads a longer window before anything is sent. A stream costs up to
`first_words`, then `every_words`, words of delay, and a benign answer
arrives unchanged, byte for byte. When every choice has stopped, the strategy's decoding is
aborted.

The rail's model must not select or steer what it checks (it is not a reward of the
strategies it guards), and a bench must not judge with it: `bench.safety` judges with
`bench.refusal_judge`. A rail whose model fails lets the answer through and says so
(`alignment.rail.error`): a safety stage that fails closed is the router's job (`route`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from aligner.rewards import RewardError
from aligner.strategies.base import (
    Candidate,
    KeepAlive,
    StageReport,
    Strategy,
    StrategyContext,
    StrategyParams,
    StrategyResult,
    StreamEvent,
)
from aligner.strategies.common import recorded_threshold
from decoding.engine import SequenceDelta

logger = logging.getLogger(__name__)

CONTENT_FILTER = "content_filter"  # OpenAI's finish reason for an answer a filter stopped
REFUSAL = "I'm sorry, but I can't continue with this."


class RailParams(BaseModel):
    """`alignment.rail`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a registered classifier of (request, answer) pairs, e.g. harmful-response")
    threshold: float | None = Field(default=None, description="stop at or above this score (default: the model's)")
    every_words: int = Field(default=16, ge=4, le=256, description="check after this many new words of the answer")
    window_words: int = Field(default=48, ge=8, le=256, validate_default=True,
                              description="the answer's last words each check reads (at least every_words, so "
                                          "every word of the answer is read by some check)")
    first_words: int | None = Field(default=None, ge=4, le=256,
                                    description="streamed: words held back before the first check and send "
                                                "(default: every_words; at most window_words, so the first "
                                                "check reads all of them)")
    refusal: str = Field(default=REFUSAL, min_length=1, max_length=300,
                         description="what replaces a stopped answer (streamed: what follows the words already sent)")

    @field_validator("window_words")
    @classmethod
    def _window_covers_the_gap(cls, value: int, info: ValidationInfo) -> int:
        every_words = info.data.get("every_words")
        if every_words is not None and value < every_words:
            raise ValueError(f"window_words ({value}) must be at least every_words ({every_words}): the words between "
                             "two checks would go unread")
        return value

    @field_validator("first_words")
    @classmethod
    def _first_within_window(cls, value: int | None, info: ValidationInfo) -> int | None:
        window_words = info.data.get("window_words")
        if value is not None and window_words is not None and value > window_words:
            raise ValueError(f"first_words ({value}) must be at most window_words ({window_words})")
        return value


def check_rail(rail: RailParams, ctx: StrategyContext) -> RailParams:
    """The model is registered and has a threshold (or the request gives one)."""
    threshold = recorded_threshold(ctx, rail.model, rail.threshold, "rail", what="rail model", field="model")
    return rail.model_copy(update={"threshold": threshold})


def window(text: str, words: int) -> str:
    """The last `words` words of `text`.

    >>> window("a b c d", 2)
    'c d'
    """
    return " ".join(text.split()[-words:])


def boundaries(text: str, every: int) -> list[int]:
    """Word counts at which a whole answer is checked: every `every` words, and its end.

    >>> boundaries("w " * 40, 16)
    [16, 32, 40]
    >>> boundaries("", 16)
    []
    """
    n = len(text.split())
    return [*range(every, n, every), n] if n else []


def checked_windows(text: str, rail: RailParams) -> list[str]:
    """What a whole answer's checks read: the last `window_words` words at each boundary.

    >>> checked_windows("a b c d e f g h i", RailParams(model="m", every_words=4, window_words=8))
    ['a b c d', 'a b c d e f g h', 'b c d e f g h i']
    """
    words = text.split()
    return [" ".join(words[max(0, k - rail.window_words):k]) for k in boundaries(text, rail.every_words)]


@dataclass
class Choice:
    """One choice's state in a railed stream."""

    text: str = ""  # everything the strategy sent
    sent: str = ""  # what passed a check and went to the client
    held: list[SequenceDelta] = field(default_factory=list)
    next_check: int = 0
    stopped_at: int | None = None  # words of `sent` when the rail stopped it
    finish_reason: str | None = None


@dataclass
class Rail:
    """One request's rail: its params (checked), the request turn it reads, what it did."""

    params: RailParams
    request: list[dict[str, str]]
    checks: int = 0
    seconds: float = 0.0
    top: float | None = None
    error: str | None = None

    @classmethod
    def of(cls, params: RailParams, ctx: StrategyContext) -> Rail:
        users = [m["content"] for m in ctx.messages if m.get("role") == "user" and m.get("content")]
        return cls(params, [{"role": "user", "content": users[-1] if users else ""}])

    async def flags(self, ctx: StrategyContext, texts: list[str]) -> list[bool]:
        """Whether each window is at or above the threshold (all False when the model fails)."""
        if not texts or self.error is not None:
            return [False] * len(texts)
        began = time.perf_counter()
        try:
            report = await ctx.rewards.score({self.params.model: 1.0}, self.request, texts)
        except RewardError as exc:
            logger.warning("rail model %s failed; answer let through: %s", self.params.model, exc)
            self.error = f"the rail model failed ({exc.name}); the answer was not checked further"
            return [False] * len(texts)
        finally:
            self.seconds += time.perf_counter() - began
        self.checks += len(texts)
        scores = list(report.total)
        self.top = max([*scores, *([self.top] if self.top is not None else [])])
        return [s >= self.params.threshold for s in scores]

    def report(self, stopped: list[int]) -> dict[str, Any]:
        out = {"model": self.params.model, "threshold": self.params.threshold, "checks": self.checks,
               "max_score": None if self.top is None else round(self.top, 4), "stopped": stopped}
        if self.error:
            out["error"] = self.error
        return out

    def stage(self) -> StageReport:
        return StageReport("rail", self.seconds)


async def run(strategy: Strategy, params: StrategyParams, rail_params: RailParams, ctx: StrategyContext) -> StrategyResult:
    """The strategy's answers, each checked whole at every boundary (one scoring call); a
    choice that fails any window is replaced whole by the refusal."""
    rail = Rail.of(rail_params, ctx)
    result = await strategy.run(ctx, params)
    windows, where = [], []
    for i, choice in enumerate(result.choices):
        for text in checked_windows(choice.text, rail_params):
            windows.append(text)
            where.append(i)
    stopped = {i for i, flagged in zip(where, await rail.flags(ctx, windows)) if flagged}
    for i in stopped:
        result.choices[i] = Candidate(result.choices[i].index, rail_params.refusal, [], CONTENT_FILTER)
    result.stages.append(rail.stage())
    result.info["rail"] = rail.report(sorted(stopped))
    return result


async def stream(strategy: Strategy, params: StrategyParams, rail_params: RailParams,
                 ctx: StrategyContext) -> AsyncIterator[StreamEvent]:
    """The strategy's stream with each piece held back until a check passes over it."""
    rail = Rail.of(rail_params, ctx)
    first = rail_params.first_words or rail_params.every_words
    choices = {i: Choice(next_check=first) for i in range(ctx.num_choices)}
    tokens, began, result = 0, time.perf_counter(), None
    events = strategy.stream(ctx, params)
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, KeepAlive):
                yield event
            elif isinstance(event, SequenceDelta):
                state = choices.setdefault(event.index, Choice(next_check=first))
                tokens += len(event.token_ids)
                if state.stopped_at is not None:
                    continue
                state.text += event.text
                state.held.append(event)
                for out in await _release(rail, ctx, event.index, state, event.finish_reason is not None):
                    yield out
                if all(c.stopped_at is not None for c in choices.values()):
                    break  # nothing left to send: closing the stream aborts the decoding
            elif isinstance(event, StrategyResult):
                result = event
                for i, state in choices.items():
                    for out in await _release(rail, ctx, i, state, True):
                        yield out
                break
    if result is None:  # every choice stopped: the strategy's own result never came
        result = StrategyResult(choices=[Candidate(i, "", [], CONTENT_FILTER) for i in sorted(choices)],
                                stages=[StageReport("generate", time.perf_counter() - began, len(ctx.prompt_ids),
                                                    tokens)])
    yield _streamed_result(rail, choices, result)


async def _release(rail: Rail, ctx: StrategyContext, i: int, state: Choice, final: bool) -> list[StreamEvent]:
    """What choice `i` may send now: nothing until its next check is due (or it ended); then
    what it held, when the check passes, or the refusal that stops it."""
    if state.stopped_at is not None or not state.held:
        return []
    if not final and len(state.text.split()) < state.next_check:
        return []
    (flagged,) = await rail.flags(ctx, [window(state.text, rail.params.window_words)])
    if flagged:
        state.stopped_at = len(state.sent.split())
        state.held.clear()
        return [SequenceDelta(i, _joined(state.sent, rail.params.refusal), [], None, CONTENT_FILTER)]
    out, state.held = state.held, []
    state.sent = state.text
    state.next_check = len(state.text.split()) + rail.params.every_words
    return out


def _streamed_result(rail: Rail, choices: dict[int, Choice], result: StrategyResult) -> StrategyResult:
    """The strategy's result with each stopped choice as the client saw it, and the report."""
    stopped = sorted(i for i, c in choices.items() if c.stopped_at is not None)
    for i in stopped:
        if i < len(result.choices):
            sent = choices[i].sent
            result.choices[i] = Candidate(i, sent + _joined(sent, rail.params.refusal), [], CONTENT_FILTER)
    result.stages.append(rail.stage())
    result.info["rail"] = rail.report(stopped)
    return result


def _joined(sent: str, refusal: str) -> str:
    """The refusal as it follows `sent` (a space between them unless `sent` ends in one)."""
    return (" " if sent and not sent[-1].isspace() else "") + refusal
