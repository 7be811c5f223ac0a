"""`route`: a request classifier picks which alignment runs.

    {"route": {"classifier": "harmful-request",
               "flagged": {"pipeline": [{"strategy": "urial", "template": "safety"}, ...]},
               "otherwise": {"strategy": "none"}}}

The classifier is a registered reward model that scores the request alone (the response it
is given is empty, as it was trained: `aligner train-classifier`). It was trained on single
user turns, so each of the request's last user turns is scored on its own, without the system
message or the other turns, and the highest score decides: at or above the threshold (the
request's, else the one recorded with the model) the `flagged` branch runs, else `otherwise`.
This is how a safety pipeline can cost nothing and refuse nothing on the requests it is not
for. Like `Pipeline`, a router is built by `aligner.alignment` from the request, not registered
by name. A classifier that fails sends the request down `flagged` (a safety branch fails
closed) with `fallback` on, or fails it with 503 with `fallback` off.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import Field

from aligner.rewards import RewardError
from aligner.strategies.base import (
    StageReport,
    Strategy,
    StrategyContext,
    StrategyParams,
    StrategyResult,
    StreamEvent,
    keepalive_until,
)
from aligner.strategies.common import recorded_threshold, reward_failed

Branch = tuple[Strategy, StrategyParams]
BRANCHES = ("flagged", "otherwise")
# A conversation's user turns the classifier scores (the last ones): a harmful turn is found
# where the conversation hides it, and a long chat costs at most this many rows.
MAX_CLASSIFIED_TURNS = 8


def classifier_inputs(messages: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """Each of the last user turns as a one-turn request: what the classifier was trained on.

    A system message or earlier turns rendered in front of a request move a single-turn
    classifier's score far from anything it learned: with the shipped `harmful-request`, the
    system message "You are a friendly AI assistant. Answer concisely." took four harmful
    requests from 4.6-5.2 to between -1.0 and -0.3, under its threshold (1.87 then, 0.90 now).

    >>> classifier_inputs([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
    ...                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "and you?"}])
    [[{'role': 'user', 'content': 'hi'}], [{'role': 'user', 'content': 'and you?'}]]
    """
    turns = [m["content"] for m in messages if m.get("role") == "user" and m.get("content")]
    return [[{"role": "user", "content": text}] for text in turns[-MAX_CLASSIFIED_TURNS:]] or [messages]


class RouteParams(StrategyParams):
    classifier: str = Field(description="a registered request classifier (a reward model scoring the request alone)")
    threshold: float | None = Field(default=None, description="flag at or above this score (default: the model's own)")


class Route(Strategy):
    name = "route"
    description = "A request classifier picks the alignment: `flagged` at or above its threshold, else `otherwise`."
    Params = RouteParams

    def __init__(self, branches: dict[str, Branch]):
        self.branches = branches

    def check(self, params: RouteParams, ctx: StrategyContext) -> RouteParams:
        threshold = recorded_threshold(ctx, params.classifier, params.threshold, "route")
        return params.model_copy(update={"threshold": threshold})

    def sequences(self, params, ctx: StrategyContext) -> int:
        # Admission cannot know the branch before the classifier runs: weigh the heavier one.
        return max(strategy.sequences(p, ctx) for strategy, p in self.branches.values())

    def guide_slots(self, params, ctx: StrategyContext) -> int:
        return max(strategy.guide_slots(p, ctx) for strategy, p in self.branches.values())

    def spec(self, params: RouteParams) -> dict[str, Any]:
        return {"route": self.describe(params)}

    def describe(self, params: RouteParams) -> dict[str, Any]:
        return {**super().describe(params), **{name: self.branches[name][0].spec(self.branches[name][1])
                                               for name in BRANCHES}}

    async def classify(self, ctx: StrategyContext, params: RouteParams) -> tuple[str, dict[str, Any], StageReport]:
        began = time.perf_counter()
        try:
            score = max(await ctx.rewards.score_requests(params.classifier, classifier_inputs(ctx.messages)))
        except RewardError as exc:
            info = {"branch": "flagged", "classifier": params.classifier,
                    "fallback": reward_failed(params, exc, "route")}
            return "flagged", info, StageReport("route", time.perf_counter() - began)
        branch = "flagged" if score >= params.threshold else "otherwise"
        info = {"branch": branch, "classifier": params.classifier, "score": round(score, 4),
                "threshold": params.threshold}
        return branch, info, StageReport("route", time.perf_counter() - began)

    @staticmethod
    def _merge(result: StrategyResult, info: dict[str, Any], report: StageReport) -> StrategyResult:
        result.stages = [report, *result.stages]
        fallback = info.pop("fallback", None)
        result.info = {"route": info, **result.info}
        if fallback is not None and "fallback" not in result.info:
            result.info["fallback"] = fallback
        return result

    async def run(self, ctx: StrategyContext, params: RouteParams) -> StrategyResult:
        branch, info, report = await self.classify(ctx, params)
        strategy, branch_params = self.branches[branch]
        return self._merge(await strategy.run(ctx, branch_params), info, report)

    async def stream(self, ctx: StrategyContext, params: RouteParams) -> AsyncIterator[StreamEvent]:
        task = asyncio.ensure_future(self.classify(ctx, params))
        async with contextlib.aclosing(keepalive_until(task, ctx.keepalive_s)) as keepalives:
            async for keepalive in keepalives:
                yield keepalive
        branch, info, report = task.result()
        strategy, branch_params = self.branches[branch]
        async with contextlib.aclosing(strategy.stream(ctx, branch_params)) as events:
            async for event in events:
                if isinstance(event, StrategyResult):
                    event = self._merge(event, info, report)
                yield event
