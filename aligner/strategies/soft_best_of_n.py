"""`soft_best_of_n`: sample N answers, then draw one with probability ∝ exp(r / λ).

λ → 0 recovers best-of-N; large λ recovers plain sampling (Verdun et al., "Soft Best-of-n").
"""

from __future__ import annotations

import random

from pydantic import Field

from aligner.rewards import RewardError

from aligner.strategies.base import Strategy, StrategyContext, StrategyResult, register
from aligner.strategies.best_of_n import CandidatesParams
from aligner.strategies.common import (
    budget_pool,
    check_candidates,
    fallback_result,
    generate_candidates,
    sampling_context,
    score_candidates,
    well_formed_first,
)
from aligner.strategies.selection import soft_sample


class SoftBestOfNParams(CandidatesParams):
    lambda_: float = Field(
        default=0.5, alias="lambda", gt=0.0, le=1000.0, description="temperature λ of the draw over rewards"
    )


@register
class SoftBestOfNStrategy(Strategy):
    name = "soft_best_of_n"
    description = (
        "Sample N candidates, score them, and draw the answer with probability proportional to "
        "exp(reward / lambda); seeded by the request's seed."
    )
    Params = SoftBestOfNParams

    def check(self, params: SoftBestOfNParams, ctx: StrategyContext) -> SoftBestOfNParams:
        return params.model_copy(update={"reward": check_candidates(params, ctx)})

    def sequences(self, params, ctx: StrategyContext) -> int:
        return params.n

    async def run(self, ctx: StrategyContext, params: SoftBestOfNParams) -> StrategyResult:
        candidates, generated = await generate_candidates(sampling_context(ctx, params.reward), params.n)
        pool = budget_pool(ctx, candidates)
        try:
            scored = await score_candidates(ctx, params.reward, pool)
        except RewardError as exc:
            return fallback_result(ctx, params, candidates, [generated], exc)
        seed = ctx.sampling.seed
        rng = random.Random(seed) if seed is not None else random.SystemRandom()
        pool, ill_formed = well_formed_first(ctx, pool)
        picked = [pool[i] for i in soft_sample([c.score for c in pool], params.lambda_, ctx.num_choices, rng)]
        return StrategyResult(
            choices=picked,
            stages=[generated, scored],
            candidates=candidates,
            info={"selected": [c.index for c in picked], "scores": [c.score for c in picked],
                  **({"ill_formed": ill_formed} if ill_formed else {})},
        )
