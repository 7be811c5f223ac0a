"""Composition: prompt stages, then exactly one decoding stage, then output stages.

`PromptStrategy` and `OutputStrategy` are the bases of the stages that act before and after
decoding; used alone, each runs as a two-stage pipeline around plain decoding (`none`).
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aligner.strategies.base import (
    StageReport,
    Strategy,
    StrategyContext,
    StrategyParams,
    StrategyResult,
    StreamEvent,
    get_strategy,
    keepalive_until,
)
from aligner.strategies.common import reward_failed

Stage = tuple[Strategy, StrategyParams]
ORDER = {"prompt": 0, "decode": 1, "output": 2}
# The part of a request's remaining budget (time, tokens) one prompt stage may spend.
PROMPT_STAGE_SHARE = 0.5


@dataclass
class PromptOutcome:
    messages: list[dict[str, str]]
    stages: list[StageReport]
    info: dict[str, Any] = field(default_factory=dict)


class PromptStrategy(Strategy):
    phase = "prompt"

    @abstractmethod
    async def transform(self, ctx: StrategyContext, params: StrategyParams) -> PromptOutcome: ...

    async def run(self, ctx: StrategyContext, params: StrategyParams) -> StrategyResult:
        return await Pipeline([(self, params), plain_stage()]).run(ctx, PipelineParams())

    def stream(self, ctx: StrategyContext, params: StrategyParams) -> AsyncIterator[StreamEvent]:
        return Pipeline([(self, params), plain_stage()]).stream(ctx, PipelineParams())


class OutputStrategy(Strategy):
    phase = "output"

    @abstractmethod
    async def refine(self, ctx: StrategyContext, params: StrategyParams, result: StrategyResult) -> StrategyResult:
        """Improve `result.choices`, appending this stage's reports and info to `result`."""

    async def run(self, ctx: StrategyContext, params: StrategyParams) -> StrategyResult:
        return await Pipeline([plain_stage(), (self, params)]).run(ctx, PipelineParams())


def gate_failed(result: StrategyResult, params: StrategyParams, exc, stage: str) -> StrategyResult:
    """An output stage's reward gate failed: keep the answers as they are (the one reward
    failure policy decides whether that is allowed)."""
    result.info = {**result.info, "fallback": reward_failed(params, exc, stage)}
    return result


def plain_stage() -> Stage:
    none = get_strategy("none")
    return none, none.Params()


def order_error(phases: list[str]) -> str | None:
    """Why a sequence of stage phases is not a valid pipeline, or None.

    >>> order_error(["prompt", "decode", "output"]) is None
    True
    >>> order_error(["output", "decode"])
    "stage 1 ('decode') comes after an 'output' stage; the order is prompt*, decode, output*"
    >>> order_error(["prompt", "decode", "decode"])
    'a pipeline needs exactly one decode stage, this one has 2'
    """
    decodes = [i for i, phase in enumerate(phases) if phase == "decode"]
    if len(decodes) != 1:
        return f"a pipeline needs exactly one decode stage, this one has {len(decodes)}"
    for i in range(1, len(phases)):
        if ORDER[phases[i]] < ORDER[phases[i - 1]]:
            return (
                f"stage {i} ('{phases[i]}') comes after an '{phases[i - 1]}' stage; "
                "the order is prompt*, decode, output*"
            )
    return None


class PipelineParams(StrategyParams):
    pass


class Pipeline(Strategy):
    name = "pipeline"
    description = "Stages run in order: prompt stages, one decode stage, output stages."
    Params = PipelineParams

    def __init__(self, stages: list[Stage]):
        self.stages = stages

    def sequences(self, params, ctx: StrategyContext) -> int:
        # Admission weighs the whole plan: stages run one after another, so a six-stage
        # pipeline holds the engine for six stages' work, not its largest stage's.
        return sum(strategy.sequences(p, ctx) for strategy, p in self.stages)

    def guide_slots(self, params, ctx: StrategyContext) -> int:
        return max(strategy.guide_slots(p, ctx) for strategy, p in self.stages)

    def spec(self, params) -> dict[str, Any]:
        return {"pipeline": [s.spec(p) for s, p in self.stages]}

    def describe(self, params) -> dict[str, Any]:
        return {**super().describe(params), **self.spec(params)}

    async def _prompt_stages(self, ctx: StrategyContext) -> tuple[StrategyContext, list[StageReport], list[dict]]:
        reports: list[StageReport] = []
        infos: list[dict] = []
        for i, (strategy, params) in enumerate(self.stages):
            if strategy.phase != "prompt":
                break
            if ctx.budget.spent():
                ctx.budget.skip(f"pipeline stage {i} ({strategy.name})")
                continue
            # A prompt stage may spend part of what remains, never what the answer needs.
            share = ctx.budget.share(PROMPT_STAGE_SHARE) if ctx.budget.limited else ctx.budget
            outcome = await strategy.transform(ctx.with_budget(share), params)
            reports += outcome.stages
            if share is not ctx.budget and share.ran_out:
                # Cut short: the conversation stays the last completed stage's.
                ctx.budget.skip(f"pipeline stage {i} ({strategy.name}): its {share.ran_out} share ran out")
                infos.append({"stage": strategy.name, "cut": share.ran_out})
                continue
            ctx = ctx.with_messages(outcome.messages, f"s{i}")
            infos.append({"stage": strategy.name, **outcome.info})
        return ctx, reports, infos

    def _decode(self) -> Stage:
        return next((s, p) for s, p in self.stages if s.phase == "decode")

    async def run(self, ctx: StrategyContext, params: StrategyParams) -> StrategyResult:
        ctx, reports, infos = await self._prompt_stages(ctx)
        decode, decode_params = self._decode()
        result = await decode.run(ctx, decode_params)
        result = merge_prompt_stages(result, reports, infos, decode.name)
        for i, (strategy, stage_params) in enumerate(self.stages):
            if strategy.phase != "output":
                continue
            if ctx.budget.spent():  # the answer stays the last completed stage's
                ctx.budget.skip(f"pipeline stage {i} ({strategy.name})")
                continue
            result = await strategy.refine(ctx, stage_params, result)
        return result

    async def stream(self, ctx: StrategyContext, params: StrategyParams) -> AsyncIterator[StreamEvent]:
        if any(s.phase == "output" for s, _ in self.stages):
            # Output stages change the answer after decoding: nothing can be sent early.
            async with contextlib.aclosing(super().stream(ctx, params)) as events:
                async for event in events:
                    yield event
            return
        # Prompt stages first (keep-alives meanwhile), then the decode stage's own stream.
        task = asyncio.ensure_future(self._prompt_stages(ctx))
        async with contextlib.aclosing(keepalive_until(task, ctx.keepalive_s)) as keepalives:
            async for keepalive in keepalives:
                yield keepalive
        staged_ctx, reports, infos = task.result()
        decode, decode_params = self._decode()
        async with contextlib.aclosing(decode.stream(staged_ctx, decode_params)) as events:
            async for event in events:
                if isinstance(event, StrategyResult):
                    event = merge_prompt_stages(event, reports, infos, decode.name)
                yield event


def merge_prompt_stages(result: StrategyResult, reports, infos, decode_name: str) -> StrategyResult:
    if not reports and not infos:
        return result
    result.stages = list(reports) + result.stages
    result.info = {**result.info, "prompt_stages": infos, "decode_stage": decode_name}
    # A prompt stage that fell back is reported (and counted) like any other fallback.
    fell_back = next((info["fallback"] for info in infos if "fallback" in info), None)
    if fell_back is not None and "fallback" not in result.info:
        result.info["fallback"] = fell_back
    return result
