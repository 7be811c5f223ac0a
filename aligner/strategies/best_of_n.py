"""`best_of_n`: sample N answers, score them, return the best.

By default the N candidates are one engine request (vLLM shares the prompt's KV cache across
them). With `batch`, they come in waves of that many, and sampling stops early when another
wave is not worth it: the best answers already lead the rest by `stop_margin`, or the
request's budget (`alignment.deadline_s`, `alignment.max_total_tokens`) cannot pay for
another wave at the rate the previous ones cost.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from aligner.budget import DEADLINE, TOKENS, BudgetExhausted
from aligner.rewards import RewardError
from aligner.strategies.base import (
    Candidate,
    StageReport,
    Strategy,
    StrategyContext,
    StrategyParams,
    StrategyResult,
    register,
)
from aligner.strategies.common import (
    RewardField,
    budget_pool,
    check_candidates,
    fallback_result,
    generate_candidates,
    sampling_context,
    score_candidates,
    well_formed_first,
)
from aligner.strategies.selection import clear_lead, top_distinct


class CandidatesParams(StrategyParams):
    """N candidates and the reward(s) that choose among them (the best-of-N family)."""

    n: int = Field(default=4, ge=1, description="candidates to sample at most (server maximum applies)")
    reward: str | dict[str, float] | None = RewardField


class BestOfNParams(CandidatesParams):
    batch: int | None = Field(
        default=None, ge=1,
        description="sample in waves of this many and stop early (stop_margin, budget); default: all at once",
    )
    stop_margin: float | None = Field(
        default=None, gt=0,
        description="with batch: stop once the best answers lead every other candidate by this many reward units",
    )

    @model_validator(mode="after")
    def _margin_needs_waves(self):
        if self.stop_margin is not None and self.batch is None:
            raise ValueError("stop_margin needs batch (candidates sampled in waves)")
        return self


@register
class BestOfNStrategy(Strategy):
    name = "best_of_n"
    description = (
        "Sample N candidates (one engine request, shared prompt KV cache), score them with the "
        "reward(s), return the highest-scoring; with n > 1, the n best distinct candidates. "
        "With batch, sample in waves and stop early at a clear lead (stop_margin) or when the "
        "request's budget cannot pay for another wave."
    )
    Params = BestOfNParams

    def check(self, params: BestOfNParams, ctx: StrategyContext) -> BestOfNParams:
        return params.model_copy(update={"reward": check_candidates(params, ctx)})

    def sequences(self, params, ctx: StrategyContext) -> int:
        return params.n

    async def run(self, ctx: StrategyContext, params: BestOfNParams) -> StrategyResult:
        if params.batch is None or params.batch >= params.n:
            candidates, generated = await generate_candidates(sampling_context(ctx, params.reward), params.n)
            return await self._select(ctx, params, candidates, [generated], {})
        return await self._waves(ctx, params)

    async def _waves(self, ctx: StrategyContext, params: BestOfNParams) -> StrategyResult:
        """Candidates in rounds (`_round_size`) until `params.n`, or until `_why_stop` says
        another round is not worth it; `trail` is what the rounds saw, for the report."""
        candidates: list[Candidate] = []
        stages: list[StageReport] = []
        trail: list[dict] = []
        stopped = None
        wave = 0
        while len(candidates) < params.n:
            size = min(self._round_size(ctx, params, candidates), params.n - len(candidates))
            if candidates and (why := await self._why_stop(ctx, params, candidates, size, stages, trail)):
                stopped = why
                if why in (DEADLINE, TOKENS):
                    ctx.budget.skip(f"{params.n - len(candidates)} of {params.n} candidates")
                break
            seed = None if ctx.sampling.seed is None else ctx.sampling.seed + 7919 * wave
            more, generated = await generate_candidates(sampling_context(ctx, params.reward), size,
                                                        stage=f"generate-{wave}", seed=seed)
            for c in more:
                c.index += len(candidates)
            stages.append(generated)
            try:
                stages.append(await score_candidates(ctx, params.reward, more, stage=f"score-{wave}"))
            except BudgetExhausted as exc:
                if not candidates:  # nothing scored yet: the first whole sample, unscored
                    return fallback_result(ctx, params, more, stages, exc)
                stopped = "deadline"  # the wave was never scored: it cannot be picked
                ctx.budget.skip(f"{params.n - len(candidates)} of {params.n} candidates")
                break
            except RewardError as exc:
                result = fallback_result(ctx, params, candidates + more, stages, exc)
                # What the rounds before the failure saw stays in the report.
                result.info.update({"candidates_used": len(candidates) + len(more), "waves": wave + 1,
                                    **self._trail_info(trail)})
                return result
            candidates += more
            wave += 1
        info = {"candidates_used": len(candidates), "waves": wave, "stopped": stopped, **self._trail_info(trail)}
        return self._pick(ctx, candidates, stages, info)

    def _round_size(self, ctx: StrategyContext, params: BestOfNParams, candidates: list[Candidate]) -> int:
        return params.batch

    async def _why_stop(self, ctx: StrategyContext, params: BestOfNParams, candidates: list[Candidate], size: int,
                  stages: list[StageReport], trail: list[dict]) -> str | None:
        """Why another round of `size` should not start, or None: the documented stopping rule."""
        if params.stop_margin is not None and clear_lead([c.score for c in candidates], ctx.num_choices,
                                                         params.stop_margin):
            return "stop_margin"
        return budget_stop(ctx, candidates, size, stages)

    def _trail_info(self, trail: list[dict]) -> dict:
        return {}

    async def _select(self, ctx, params, candidates, stages, info) -> StrategyResult:
        pool = budget_pool(ctx, candidates)
        try:
            stages = stages + [await score_candidates(ctx, params.reward, pool)]
        except RewardError as exc:
            return fallback_result(ctx, params, candidates, stages, exc)
        return self._pick(ctx, candidates, stages, info, pool)

    def _pick(self, ctx, candidates, stages, info, pool=None) -> StrategyResult:
        pool = budget_pool(ctx, candidates) if pool is None else pool
        pool, ill_formed = well_formed_first(ctx, pool)
        if ill_formed:
            info = {**info, "ill_formed": ill_formed}
        picked = [pool[i] for i in top_distinct([c.score for c in pool], [c.text for c in pool], ctx.num_choices)]
        return StrategyResult(
            choices=picked,
            stages=stages,
            candidates=candidates,
            info={"selected": [c.index for c in picked], "scores": [c.score for c in picked], **info},
        )


def budget_stop(ctx: StrategyContext, candidates: list[Candidate], size: int, stages: list[StageReport]) -> str | None:
    """The limit that another round of `size` candidates cannot be paid for under, at the rate
    the rounds so far cost (each a generation and a scoring stage), or None."""
    budget = ctx.budget
    if limit := budget.exhausted():
        return limit
    per_candidate = sum(len(c.token_ids) for c in candidates) / len(candidates)
    tokens = budget.remaining_tokens()
    if tokens is not None and tokens < size * per_candidate:
        budget.note("max_total_tokens")
        return "max_total_tokens"
    seconds = budget.remaining_s()
    waves = len(stages) / 2  # each a generation and a scoring stage
    # What a round of `size` costs at the rate the earlier rounds cost per candidate (rounds
    # of different sizes: auto doubles its pool).
    round_seconds = sum(s.seconds for s in stages) / waves * size / (len(candidates) / waves)
    if seconds is not None and seconds < round_seconds:
        budget.note("deadline")
        return "deadline"
    return None
