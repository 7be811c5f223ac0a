"""`speculative_rejection` (Sun et al., NeurIPS 2024): best-of-N that stops the unpromising.

N candidates start together; after every `chunk_tokens` tokens the partial answers are
scored and the lowest-scoring `rejection_rate` fraction stop generating. Survivors continue
(their prefixes come from vLLM's prefix cache) until one finishes or `max_tokens`; the best
finished answer is returned. It reaches best-of-N quality with far fewer generated tokens.
"""

from __future__ import annotations

import asyncio
import math

from pydantic import Field

from aligner.rewards import RewardError
from aligner.strategies.base import (
    Candidate,
    StageReport,
    Strategy,
    StrategyContext,
    StrategyParamError,
    StrategyParams,
    StrategyResult,
    register,
)
from aligner.strategies.best_of_n import RewardField, check_candidates
from aligner.strategies.candidates import fallback_result, generate_candidates, score_candidates
from aligner.strategies.selection import rank


class SpeculativeRejectionParams(StrategyParams):
    n: int = Field(default=8, ge=1, description="candidates to start (server maximum applies)")
    chunk_tokens: int = Field(default=16, ge=1, le=256, description="tokens between scoring rounds")
    rejection_rate: float = Field(default=0.5, ge=0.0, lt=1.0, description="fraction stopped at each round")
    reward: str | dict[str, float] | None = RewardField


@register
class SpeculativeRejectionStrategy(Strategy):
    name = "speculative_rejection"
    description = (
        "Start N candidates, score them every chunk_tokens tokens, stop the lowest-scoring fraction, "
        "continue the rest until one finishes; return the best finished answer."
    )
    Params = SpeculativeRejectionParams

    def check(self, params: SpeculativeRejectionParams, ctx: StrategyContext) -> SpeculativeRejectionParams:
        if ctx.n != 1:
            raise StrategyParamError("speculative rejection returns one answer: use n=1", "n")
        return params.model_copy(update={"reward": check_candidates(params, ctx)})

    def sequences(self, params: SpeculativeRejectionParams, ctx: StrategyContext) -> int:
        return params.n

    async def run(self, ctx: StrategyContext, params: SpeculativeRejectionParams) -> StrategyResult:
        budget = min(ctx.sampling.max_tokens, ctx.engine.max_model_len - len(ctx.prompt_ids))
        tokenizer = ctx.engine.tokenizer
        # The first chunk is one request with n=N, sharing the prompt's KV cache.
        alive, first = await generate_candidates(ctx, params.n, stage="chunk-0", max_tokens=min(params.chunk_tokens, budget))
        stages: list[StageReport] = [first]
        rounds = []
        everyone = list(alive)
        step = 0
        while True:
            try:
                stages.append(await score_candidates(ctx, params.reward, alive, stage=f"score-{step}"))
            except RewardError as exc:
                return fallback_result(ctx, params, everyone, stages, exc)
            finished = [c for c in alive if c.finish_reason == "stop"]
            longest = max(len(c.token_ids) for c in alive)
            if finished or longest >= budget:
                break
            order = rank([c.score for c in alive])
            keep = max(1, len(alive) - math.floor(params.rejection_rate * len(alive)))
            survivors = [alive[i] for i in sorted(order[:keep])]
            rounds.append({"round": step, "alive": len(alive), "kept": [c.index for c in survivors],
                           "scores": [c.score for c in alive]})
            step += 1
            limit = min(params.chunk_tokens, budget - longest)

            async def extend(c: Candidate, seed_offset: int) -> StageReport:
                seed = None if ctx.sampling.seed is None else ctx.sampling.seed + 7919 * step + seed_offset
                (more,), report = await generate_candidates(
                    ctx, 1, stage=f"chunk-{step}-{c.index}", prompt_ids=ctx.prompt_ids + c.token_ids,
                    max_tokens=limit, seed=seed,
                )
                c.text = tokenizer.decode(c.token_ids + more.token_ids)
                c.token_ids = c.token_ids + more.token_ids
                c.finish_reason = more.finish_reason
                return report

            stages += await asyncio.gather(*(extend(c, i) for i, c in enumerate(survivors)))
            alive = survivors
        pool = finished or alive
        best = pool[rank([c.score for c in pool])[0]]
        rounds.append({"round": step, "alive": len(alive), "finished": [c.index for c in finished],
                       "scores": [c.score for c in alive]})
        return StrategyResult(
            choices=[best],
            stages=stages,
            candidates=everyone,
            info={"selected": [best.index], "scores": [best.score], "rounds": rounds,
                  "stopped_early": params.n - len(alive)},
        )
