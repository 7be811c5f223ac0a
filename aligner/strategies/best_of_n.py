"""`best_of_n`: sample N answers in one engine request, score them, return the best."""

from __future__ import annotations

from pydantic import Field

from aligner.rewards import RewardError, RewardSpecError
from aligner.strategies.base import (
    Strategy,
    StrategyContext,
    StrategyParamError,
    StrategyParams,
    StrategyResult,
    register,
)
from aligner.strategies.candidates import fallback_result, generate_candidates, score_candidates
from aligner.strategies.selection import top_distinct

RewardField = Field(
    default=None,
    description="reward name, or {name: weight} (weights >= 0); default: the server's default reward model",
)


class BestOfNParams(StrategyParams):
    n: int = Field(default=4, ge=1, description="candidates to sample (server maximum applies)")
    reward: str | dict[str, float] | None = RewardField


def resolve_reward(params, ctx: StrategyContext) -> dict[str, float]:
    """The request's `reward` field -> {name: weight}, as a parameter error if invalid."""
    try:
        return ctx.rewards.resolve(params.reward, "reward")
    except RewardSpecError as exc:
        raise StrategyParamError(str(exc), exc.param) from exc


def check_candidates(params, ctx: StrategyContext) -> dict[str, float]:
    """Shared checks of the best-of-N family; returns the resolved reward weights."""
    if params.n > ctx.limits.max_candidates:
        raise StrategyParamError(f"n must be at most {ctx.limits.max_candidates} on this server", "n")
    if params.n < ctx.n:
        raise StrategyParamError(f"n ({params.n}) must be at least the number of returned choices ({ctx.n})", "n")
    if params.n > 1 and ctx.sampling.temperature == 0:
        raise StrategyParamError("sampling N candidates needs temperature > 0", "n")
    return resolve_reward(params, ctx)


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
        picked = top_distinct([c.score for c in candidates], [c.text for c in candidates], ctx.n)
        return StrategyResult(
            choices=[candidates[i] for i in picked],
            stages=[generated, scored],
            candidates=candidates,
            info={"selected": picked, "scores": [candidates[i].score for i in picked]},
        )
