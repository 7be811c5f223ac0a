"""`mbr`: minimum Bayes risk selection - sample N answers, return the one the others agree with.

Each candidate's score is its mean chrF++ (sacrebleu's, as in MBR decoding for translation)
against the other candidates, used as pseudo-references: the answer closest to what the policy
says most often, which drops the samples that wander off. No reward model takes part, so
nothing here can be gamed by a reward model's quirks, and the strategy works on a server with
none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from aligner.strategies.base import Candidate, StageReport, Strategy, StrategyContext, StrategyParams, StrategyResult, Timer, register
from aligner.strategies.common import budget_pool, check_n, generate_candidates, well_formed_first
from aligner.strategies.selection import top_distinct

UTILITIES = {"chrf++": 2, "chrf": 0}  # sacrebleu's CHRF word_order


class MBRParams(StrategyParams):
    n: int = Field(default=8, ge=2, description="candidates to sample (server maximum applies)")
    utility: Literal["chrf++", "chrf"] = Field(default="chrf++", description="similarity between candidates")


def consensus(texts: Sequence[str], utility: str = "chrf++") -> list[float]:
    """Each text's mean similarity (0-100) to the others.

    >>> scores = consensus(["the cat sat on the mat", "a cat sat on the mat", "stock prices fell"])
    >>> scores.index(max(scores)), scores.index(min(scores))
    (0, 2)
    """
    from sacrebleu.metrics import CHRF

    metric = CHRF(word_order=UTILITIES[utility])
    if len(texts) < 2:
        return [0.0] * len(texts)
    return [
        sum(metric.sentence_score(text, [other]).score for j, other in enumerate(texts) if j != i) / (len(texts) - 1)
        for i, text in enumerate(texts)
    ]


@register
class MBRStrategy(Strategy):
    name = "mbr"
    description = (
        "Sample N candidates (one engine request) and return the one most similar to the others "
        "(mean chrF++): minimum Bayes risk selection, no reward model."
    )
    Params = MBRParams

    def check(self, params: MBRParams, ctx: StrategyContext) -> MBRParams:
        check_n(params.n, ctx)
        return params

    def sequences(self, params, ctx: StrategyContext) -> int:
        return params.n

    async def run(self, ctx: StrategyContext, params: MBRParams) -> StrategyResult:
        candidates, generated = await generate_candidates(ctx, params.n)
        pool, ill_formed = well_formed_first(ctx, budget_pool(ctx, candidates))
        with Timer() as timer:
            # chrF over N^2 pairs is pure Python: off the event loop.
            scores = await asyncio.to_thread(consensus, [c.text for c in pool], params.utility)
        for candidate, score in zip(pool, scores):
            candidate.score = round(score, 4)
            candidate.scores = {params.utility: candidate.score}
        picked: list[Candidate] = [pool[i] for i in top_distinct(scores, [c.text for c in pool], ctx.num_choices)]
        return StrategyResult(
            choices=picked,
            stages=[generated, StageReport("mbr", timer.seconds)],
            candidates=candidates,
            info={"selected": [c.index for c in picked], "scores": [c.score for c in picked], "utility": params.utility,
                  **({"ill_formed": ill_formed} if ill_formed else {})},
        )
