"""Generate N candidates in one engine request and score them: shared by the best-of-N family."""

from __future__ import annotations

from dataclasses import replace

from aligner.rewards import RewardError
from aligner.strategies.base import (
    Candidate,
    StageReport,
    StrategyContext,
    StrategyParams,
    StrategyResult,
    StrategyUnavailable,
    Timer,
)


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
    texts = [""] * count
    tokens: list[list[int]] = [[] for _ in range(count)]
    logprobs: list[list] = [[] for _ in range(count)]
    finish: list[str | None] = [None] * count
    prompt_tokens = len(prompt_ids)
    cached = 0
    with Timer() as timer:
        async for chunk in ctx.engine.generate(f"{ctx.request_id}-{stage}", prompt_ids, sampling):
            prompt_tokens = chunk.prompt_tokens or prompt_tokens
            cached = max(cached, chunk.cached_tokens)
            for delta in chunk.sequences:
                texts[delta.index] += delta.text
                tokens[delta.index].extend(delta.token_ids)
                if delta.logprobs:
                    logprobs[delta.index].extend(delta.logprobs)
                if delta.finish_reason is not None:
                    finish[delta.index] = delta.finish_reason
    want_logprobs = sampling.logprobs is not None
    candidates = [
        Candidate(i, texts[i], tokens[i], finish[i], logprobs[i] if want_logprobs else None)
        for i in range(count)
    ]
    report = StageReport(stage, timer.seconds, prompt_tokens, sum(len(t) for t in tokens), cached)
    return candidates, report


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


def fallback_result(
    ctx: StrategyContext,
    params: StrategyParams,
    candidates: list[Candidate],
    stages: list[StageReport],
    error: RewardError,
) -> StrategyResult:
    """The reward failed: answer with plain samples (already generated), and say why."""
    if not params.fallback:
        raise StrategyUnavailable(f"{error}; the request set fallback=false") from error
    picked = list(range(min(ctx.n, len(candidates))))
    return StrategyResult(
        choices=[candidates[i] for i in picked],
        stages=stages,
        candidates=candidates,
        info={"selected": picked, "scores": None, "fallback": {"reason": str(error), "reward": error.name}},
    )
