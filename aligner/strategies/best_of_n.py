"""`best_of_n`: sample N answers in one engine request, score them, return the best."""

from __future__ import annotations

from pydantic import Field

from aligner.rewards import RewardError
from aligner.strategies.base import (
    Strategy,
    StrategyContext,
    StrategyParams,
    StrategyResult,
    register,
)
from aligner.strategies.common import (
    RewardField,
    check_candidates,
    fallback_result,
    generate_candidates,
    score_candidates,
)
from aligner.strategies.selection import top_distinct


class BestOfNParams(StrategyParams):
    n: int = Field(default=4, ge=1, description="candidates to sample (server maximum applies)")
    reward: str | dict[str, float] | None = RewardField


@register
class BestOfNStrategy(Strategy):
    name = "best_of_n"
    description = (
        "Sample N candidates (one engine request, shared prompt KV cache), score them with the "
        "reward(s), return the highest-scoring; with n > 1, the n best distinct candidates."
    )
    Params = BestOfNParams

    def check(self, params: BestOfNParams, ctx: StrategyContext) -> BestOfNParams:
        return params.model_copy(update={"reward": check_candidates(params, ctx)})

    def sequences(self, params, ctx: StrategyContext) -> int:
        return params.n

    async def run(self, ctx: StrategyContext, params: BestOfNParams) -> StrategyResult:
        candidates, generated = await generate_candidates(ctx, params.n)
        try:
            scored = await score_candidates(ctx, params.reward, candidates)
        except RewardError as exc:
            return fallback_result(ctx, params, candidates, [generated], exc)
        picked = top_distinct([c.score for c in candidates], [c.text for c in candidates], ctx.num_choices)
        return StrategyResult(
            choices=[candidates[i] for i in picked],
            stages=[generated, scored],
            candidates=candidates,
            info={"selected": picked, "scores": [candidates[i].score for i in picked]},
        )
