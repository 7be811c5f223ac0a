"""What several strategies share: reward parameters and their checks, sampling N candidates
in one engine request, scoring them, and the one policy for a reward that fails."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from pydantic import Field

from aligner.budget import BudgetExhausted
from aligner.rewards import RewardError, RewardSpecError
from aligner.strategies.base import (
    Candidate,
    StageReport,
    StrategyContext,
    StrategyParamError,
    StrategyParams,
    StrategyResult,
    StrategyUnavailable,
    StreamEvent,
    Timer,
)
from decoding.engine import Generation, collect

RewardField = Field(
    default=None,
    description="reward name, or {name: weight} (weights >= 0); default: the server's default reward model",
)


def recorded_threshold(ctx: StrategyContext, name: str, threshold: float | None, where: str,
                       what: str = "classifier", field: str = "classifier") -> float:
    """`threshold`, else the one recorded with the registered classifier `name`. Errors name
    `where.field` (an unknown model) or `where.threshold` (no threshold anywhere)."""
    model = ctx.rewards.get(name)
    if model is None:
        known = ", ".join(sorted(ctx.rewards.rewards)) or "none"
        raise StrategyParamError(f"unknown {what} {name!r} (registered rewards: {known})", f"{where}.{field}")
    if threshold is not None:
        return threshold
    if model.threshold is None:
        raise StrategyParamError(f"{name!r} records no threshold: give {where}.threshold", f"{where}.threshold")
    return float(model.threshold)


def well_formed_first(ctx: StrategyContext, pool: list[Candidate]) -> tuple[list[Candidate], list[int]]:
    """The candidates to choose among, and the indices of those left out: when the request
    says what a well-formed answer is (`ctx.well_formed`) and at least as many candidates as it
    returns are, only those, so a call whose arguments follow its tool's schema beats a broken
    one before the reward or consensus compares them; otherwise the whole pool."""
    if ctx.well_formed is None or len(pool) < 2:
        return pool, []
    good = [c for c in pool if ctx.well_formed(c.text, c.finish_reason)]
    if len(good) == len(pool) or len(good) < ctx.num_choices:
        return pool, []
    return good, [c.index for c in pool if c not in good]


async def stream_plain(ctx: StrategyContext,
                       finish: Callable[[StrategyResult, Generation], None] | None = None) -> AsyncIterator[StreamEvent]:
    """Plain decoding of the request: each delta as it comes, then the result; `finish` may add
    to the result what the engine returned with the tokens. Closing it early aborts the
    engine's request."""
    generation = Generation.empty(ctx.num_choices, len(ctx.prompt_ids))
    stream = ctx.engine.generate(f"{ctx.request_id}-generate", ctx.prompt_ids, ctx.sampling)
    with Timer() as timer:
        async with contextlib.aclosing(stream) as chunks:
            async for chunk in chunks:
                generation.add(chunk)
                for delta in chunk.sequences:
                    yield delta
    result = StrategyResult(choices=candidates_of(generation, ctx.sampling.logprobs is not None),
                            stages=[stage_report("generate", timer.seconds, generation)])
    if finish is not None:
        finish(result, generation)
    yield result


def resolve_reward(params, ctx: StrategyContext) -> dict[str, float]:
    """The request's `reward` field -> {name: weight}, as a parameter error if invalid."""
    try:
        return ctx.rewards.resolve(params.reward, "reward")
    except RewardSpecError as exc:
        raise StrategyParamError(str(exc), exc.param) from exc


def check_candidates(params, ctx: StrategyContext) -> dict[str, float]:
    """Checks of the best-of-N family (`n` candidates); returns the resolved reward weights."""
    check_n(params.n, ctx)
    return resolve_reward(params, ctx)


def check_n(n: int, ctx: StrategyContext) -> None:
    """`n` candidates fit this server and the request (its choices, its temperature)."""
    if n > ctx.limits.max_candidates:
        raise StrategyParamError(f"n must be at most {ctx.limits.max_candidates} on this server", "n")
    if n < ctx.num_choices:
        raise StrategyParamError(f"n ({n}) must be at least the number of returned choices ({ctx.num_choices})", "n")
    if n > 1 and ctx.sampling.temperature == 0:
        raise StrategyParamError("sampling N candidates needs temperature > 0", "n")


# Under a deadline, the share of the time left that sampling may spend when a reward model
# must still score the samples: the rest is scoring's, so a deadline still ends in a scored pick.
SAMPLING_SHARE = 0.9


def sampling_context(ctx: StrategyContext, weights: dict[str, float]) -> StrategyContext:
    """`ctx` for sampling what `weights` will score: under a deadline, with a reward model among
    them, sampling stops early enough to leave scoring its time (rules score for free)."""
    if ctx.budget.remaining_s() is None or all(ctx.rewards.get(name).kind == "rule" for name in weights):
        return ctx
    return ctx.with_budget(ctx.budget.share(SAMPLING_SHARE, tokens_fraction=1.0))


def reward_failed(params: StrategyParams, error: RewardError, stage: str) -> dict[str, Any]:
    """The one policy for a reward that fails: with `fallback` on, the strategy carries on
    without scores and reports this value as `info["fallback"]` (the server counts it);
    with `fallback` off, the request fails with 503 -- unless the request's own deadline cut
    the scoring, where the best answer so far is what the request asked for."""
    if isinstance(error, BudgetExhausted):  # not a failure: the request's deadline came first
        return {"reason": str(error), "reward": error.name, "stage": stage, "cut": "deadline"}
    if not params.fallback:
        raise StrategyUnavailable(f"{error}; the request set fallback=false") from error
    return {"reason": str(error), "reward": error.name, "stage": stage}


async def generate_candidates(
    ctx: StrategyContext,
    count: int,
    *,
    stage: str = "generate",
    prompt_ids: list[int] | None = None,
    **sampling_overrides,
) -> tuple[list[Candidate], StageReport]:
    """One engine request with n=count: vLLM shares the prompt's KV cache across samples.

    `prompt_ids` continues from a partial answer (the chat prompt plus accepted tokens);
    `sampling_overrides` replace fields of the request's sampling (max_tokens, seed, ...).
    """
    sampling = replace(ctx.sampling, n=count, **sampling_overrides)
    prompt_ids = ctx.prompt_ids if prompt_ids is None else prompt_ids
    with Timer() as timer:
        generation = await collect(ctx.engine.generate(f"{ctx.request_id}-{stage}", prompt_ids, sampling),
                                   count, len(prompt_ids))
    return candidates_of(generation, sampling.logprobs is not None), stage_report(stage, timer.seconds, generation)


def candidates_of(generation, with_logprobs: bool) -> list[Candidate]:
    return [
        Candidate(s.index, s.text, s.token_ids, s.finish_reason, s.logprobs if with_logprobs else None, cut=s.cut)
        for s in generation.sequences
    ]


def stage_report(stage: str, seconds: float, generation, model: str | None = None) -> StageReport:
    """An engine request's report; `model`: the helper that decoded it (None: the policy)."""
    return StageReport(stage, seconds, generation.prompt_tokens, generation.completion_tokens,
                       generation.cached_tokens, model)


async def score_candidates(
    ctx: StrategyContext, weights: dict[str, float], candidates: list[Candidate], texts: list[str] | None = None,
    stage: str = "score",
) -> StageReport:
    """Fill each candidate's combined `score` and per-reward `scores` (of `texts` if given,
    e.g. the answer so far plus the candidate block)."""
    texts = [c.text for c in candidates] if texts is None else texts
    report = await ctx.rewards.score(weights, ctx.messages, texts)
    for i, candidate in enumerate(candidates):
        candidate.score = report.total[i]
        candidate.scores = {name: values[i] for name, values in report.per_reward.items()}
    return StageReport(stage, report.seconds)


def budget_pool(ctx: StrategyContext, candidates: list[Candidate]) -> list[Candidate]:
    """The candidates a selection picks from: all but those the request's budget cut short
    (all of them if too few others are left)."""
    whole = [c for c in candidates if not c.cut]
    if len(whole) < ctx.num_choices:
        return candidates
    if len(whole) < len(candidates):
        ctx.budget.skip(f"{len(candidates) - len(whole)} unfinished candidates")
    return whole


def fallback_result(
    ctx: StrategyContext,
    params: StrategyParams,
    candidates: list[Candidate],
    stages: list[StageReport],
    error: RewardError,
    stage: str = "score",
) -> StrategyResult:
    """The reward failed: answer with plain samples (already generated; well-formed ones first,
    then whole ones before any the budget cut short), and say why."""
    fallback = reward_failed(params, error, stage)
    good = ctx.well_formed or (lambda text, finish_reason: True)
    order = sorted(range(len(candidates)),
                   key=lambda i: (not good(candidates[i].text, candidates[i].finish_reason), candidates[i].cut))
    picked = [candidates[i].index for i in order[:ctx.num_choices]]
    return StrategyResult(
        choices=[candidates[i] for i in order[:ctx.num_choices]],
        stages=stages,
        candidates=candidates,
        info={"selected": picked, "scores": None, "fallback": fallback},
    )
