"""`none`: plain generation, streamed token by token. The default strategy."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aligner.strategies.base import (
    Strategy,
    StrategyContext,
    StrategyParams,
    StrategyResult,
    StreamEvent,
    Timer,
    register,
)
from aligner.strategies.common import candidates_of, generate_candidates, stage_report, stream_generation
from decoding.engine import Generation


@register
class NoneStrategy(Strategy):
    name = "none"
    description = "Plain decoding with the request's sampling parameters; no reward model."
    Params = StrategyParams

    async def run(self, ctx: StrategyContext, params: StrategyParams) -> StrategyResult:
        candidates, report = await generate_candidates(ctx, ctx.num_choices)
        return StrategyResult(choices=candidates, stages=[report])

    async def stream(self, ctx: StrategyContext, params: StrategyParams) -> AsyncIterator[StreamEvent]:
        generation = Generation.empty(ctx.num_choices, len(ctx.prompt_ids))
        with Timer() as timer:
            async with contextlib.aclosing(stream_generation(ctx, generation)) as deltas:
                async for delta in deltas:
                    yield delta
        choices = candidates_of(generation, ctx.sampling.logprobs is not None)
        yield StrategyResult(choices=choices, stages=[stage_report("generate", timer.seconds, generation)])
