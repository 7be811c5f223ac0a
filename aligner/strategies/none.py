"""`none`: plain generation, streamed token by token. The default strategy."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aligner.strategies.base import (
    Candidate,
    StageReport,
    Strategy,
    StrategyContext,
    StrategyParams,
    StrategyResult,
    StreamEvent,
    Timer,
    register,
)
from aligner.strategies.candidates import generate_candidates


@register
class NoneStrategy(Strategy):
    name = "none"
    description = "Plain decoding with the request's sampling parameters; no reward model."
    Params = StrategyParams

    async def run(self, ctx: StrategyContext, params: StrategyParams) -> StrategyResult:
        candidates, report = await generate_candidates(ctx, ctx.n)
        return StrategyResult(choices=candidates, stages=[report])

    async def stream(self, ctx: StrategyContext, params: StrategyParams) -> AsyncIterator[StreamEvent]:
        n = ctx.n
        texts, tokens, logprobs = [""] * n, [[] for _ in range(n)], [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        prompt_tokens = len(ctx.prompt_ids)
        cached = 0
        with Timer() as timer:
            async for chunk in ctx.engine.generate(f"{ctx.request_id}-generate", ctx.prompt_ids, ctx.sampling):
                prompt_tokens = chunk.prompt_tokens or prompt_tokens
                cached = max(cached, chunk.cached_tokens)
                for delta in chunk.sequences:
                    texts[delta.index] += delta.text
                    tokens[delta.index].extend(delta.token_ids)
                    logprobs[delta.index].extend(delta.logprobs or ())
                    if delta.finish_reason is not None:
                        finish[delta.index] = delta.finish_reason
                    yield delta
        report = StageReport("generate", timer.seconds, prompt_tokens, sum(map(len, tokens)), cached)
        want = ctx.sampling.logprobs is not None
        choices = [Candidate(i, texts[i], tokens[i], finish[i], logprobs[i] if want else None) for i in range(n)]
        yield StrategyResult(choices=choices, stages=[report])
