"""`auto`: sample more only where it pays.

Best-of-N spends N samples on every request, on "What is 2+2?" as on a hard question. `auto`
starts with `start` candidates (one engine request), scores them with the reward, and asks for
another round (as many candidates again: 2, 4, 8, ...) only while that round is expected to
be worth it, up to `n` candidates in all:

- **expected gain**: if the candidates' rewards are roughly normal with the spread seen so far
  (their standard deviation s), the best of n + m draws beats the best of n by
  s x (E[max of n + m] - E[max of n]) for standard normals (`expected_max`): what the next
  round is expected to add to the chosen answer's reward. At or below `min_gain` reward units,
  stop (`stopped: "gain"`). Candidates that all score alike stop here at once.
- **agreement**: the candidates' mean pairwise chrF++ (0-100, as `mbr` measures it). At or above
  `agree` the samples say the same thing, and more of them would too (`stopped: "agreement"`).
- **the budget**: as best-of-N's waves, a round the request's deadline or token cap cannot pay
  for at the rate the earlier rounds cost is not started.

The answer's `alignment.auto` gives the path: each decision's signals (candidates so far,
reward spread, expected gain, agreement) and whether it escalated; `stopped` is why it
stopped (null: it used all `n`). `candidates_used` and `usage` say what it cost. With `n`
equal to `start`, it is best-of-`start`; with `start` 1, the second round always runs (one
score says nothing of the spread).
"""

from __future__ import annotations

import asyncio
import functools
import math
import statistics

from pydantic import Field, model_validator

from aligner.strategies.base import Candidate, StageReport, StrategyContext, StrategyResult, register
from aligner.strategies.best_of_n import BestOfNStrategy, CandidatesParams, budget_stop
from aligner.strategies.mbr import consensus


class AutoParams(CandidatesParams):
    n: int = Field(default=8, ge=1, description="candidates to sample at most (server maximum applies)")
    start: int = Field(default=2, ge=1, description="candidates in the first round (at least the request's n); each "
                                                   "further round doubles the pool; default 2, or n when n is 1")
    min_gain: float | None = Field(
        default=0.0, ge=0,
        description="ask for another round only while its expected gain in the chosen answer's reward is above this; "
                    "null: never stop on the gain",
    )
    agree: float | None = Field(
        default=40.0, ge=0, le=100,
        description="stop once the candidates' mean pairwise chrF++ reaches this (they say the same thing); "
                    "null: never stop on agreement",
    )

    @model_validator(mode="after")
    def _start_within_n(self):
        if "start" not in self.model_fields_set:
            self.start = min(self.start, self.n)
        if self.start > self.n:
            raise ValueError(f"start ({self.start}) must be at most n ({self.n})")
        return self


def round_sizes(n: int, first: int) -> list[int]:
    """The candidates each round samples when none stops early: `first`, then as many as the
    pool holds, up to `n`.

    >>> round_sizes(8, 2), round_sizes(8, 3), round_sizes(2, 2)
    ([2, 2, 4], [3, 3, 2], [2])
    """
    sizes, pool = [], 0
    while pool < n:
        size = min(pool or first, n - pool)
        sizes.append(size)
        pool += size
    return sizes


@functools.lru_cache(maxsize=256)
def expected_max(k: int) -> float:
    """E[max of k independent standard normals], by numerical integration.

    >>> expected_max(1)
    0.0
    >>> round(expected_max(2), 4)  # 1 / sqrt(pi)
    0.5642
    >>> round(expected_max(8), 3)
    1.424
    """
    if k <= 1:
        return 0.0
    step, total = 0.001, 0.0
    for i in range(-9000, 9001):
        x = i * step
        pdf = math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + math.erf(x / math.sqrt(2)))
        total += x * k * pdf * cdf ** (k - 1) * step
    return total


def expected_gain(scores: list[float], more: int) -> float:
    """What `more` candidates are expected to add to the best reward of `scores`.

    >>> expected_gain([1.0, 1.0, 1.0], 3)  # no spread: nothing to gain
    0.0
    >>> round(expected_gain([0.0, 2.0], 2), 3)  # s = 1.414, E[max of 4] - E[max of 2] = 0.465
    0.658
    """
    if len(scores) < 2 or more < 1:
        return 0.0
    return statistics.stdev(scores) * (expected_max(len(scores) + more) - expected_max(len(scores)))


@register
class AutoStrategy(BestOfNStrategy):
    name = "auto"
    description = (
        "Start with a few candidates (start), score them, and sample another round (doubling the "
        "pool, up to n) only while its expected gain in reward is above min_gain and the "
        "candidates disagree (mean chrF++ below agree); reports each decision's signals."
    )
    Params = AutoParams  # checked as best-of-N's (`n` candidates, the reward)

    def sequences(self, params: AutoParams, ctx: StrategyContext) -> int:
        """Its largest round: the most it decodes at once (admission weight)."""
        return max(round_sizes(params.n, self._first(params, ctx)))

    async def run(self, ctx: StrategyContext, params: AutoParams) -> StrategyResult:
        return await self._waves(ctx, params)

    @staticmethod
    def _first(params: AutoParams, ctx: StrategyContext) -> int:
        """The first round: `start`, and never fewer than the answers the request returns."""
        return min(max(params.start, ctx.num_choices), params.n)

    def _round_size(self, ctx: StrategyContext, params: AutoParams, candidates: list[Candidate]) -> int:
        return len(candidates) or self._first(params, ctx)

    async def _why_stop(self, ctx: StrategyContext, params: AutoParams, candidates: list[Candidate], size: int,
                        stages: list[StageReport], trail: list[dict]) -> str | None:
        scores = [c.score for c in candidates if c.score is not None]
        if len(scores) < 2:  # one answer says nothing of the spread: look at one more round
            seen = {"candidates": len(candidates)}
            why = budget_stop(ctx, candidates, size, stages)
        else:
            gain = expected_gain(scores, size)
            # chrF over the pairs is pure Python: off the event loop, as `mbr` does.
            agreement = statistics.mean(await asyncio.to_thread(consensus, [c.text for c in candidates]))
            seen = {
                "candidates": len(candidates),
                "spread": round(statistics.stdev(scores), 4),
                "expected_gain": round(gain, 4),
                "agreement": round(agreement, 2),
            }
            if params.agree is not None and agreement >= params.agree:
                why = "agreement"
            elif params.min_gain is not None and gain <= params.min_gain:
                why = "gain"
            else:
                why = budget_stop(ctx, candidates, size, stages)
        trail.append({**seen, "escalated": why is None, **({"stopped": why} if why else {})})
        return why

    def _trail_info(self, trail: list[dict]) -> dict:
        return {"auto": trail}
