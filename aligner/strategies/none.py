"""`none`: plain generation, streamed token by token. The default strategy."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aligner.strategies.base import (
    Strategy,
    StrategyContext,
    StrategyParams,
    StrategyResult,
    StreamEvent,
    register,
)
from aligner.strategies.common import generate_candidates, stream_plain


@register
class NoneStrategy(Strategy):
    name = "none"
    description = "Plain decoding with the request's sampling parameters; no reward model."
    Params = StrategyParams

    async def run(self, ctx: StrategyContext, params: StrategyParams) -> StrategyResult:
        candidates, report = await generate_candidates(ctx, ctx.num_choices)
        return StrategyResult(choices=candidates, stages=[report])

    def stream(self, ctx: StrategyContext, params: StrategyParams) -> AsyncIterator[StreamEvent]:
        return stream_plain(ctx)  # an async generator: closing it aborts the engine's request
