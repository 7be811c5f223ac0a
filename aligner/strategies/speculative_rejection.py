"""`speculative_rejection` (Sun et al., NeurIPS 2024): best-of-N that stops the unpromising.

N candidates start together; after every `chunk_tokens` tokens the unfinished answers are
scored and the lowest-scoring `rejection_rate` fraction stop generating (never fewer than
`min_survivors` remain). Once only `min_survivors` are left they run to the end in one
request (their prefixes come from vLLM's prefix cache), and the best *finished* answer - by
the same reward, scored in full - is returned. As in the paper, candidates that finish early
are kept for the final choice rather than ending the search: stopping at the first finished
answer favours short answers and, in our measurements, gives up about half of best-of-N's gain.
"""

from __future__ import annotations

import asyncio
import math

from pydantic import Field

from aligner.budget import BudgetExhausted
from aligner.rewards import RewardError
from aligner.strategies.base import (
    RESTARTS,
    Candidate,
    StageReport,
    Strategy,
    StrategyContext,
    StrategyParamError,
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
from aligner.strategies.selection import rank
from aligner.strategies.stops import StopStrings


class SpeculativeRejectionParams(StrategyParams):
    n: int = Field(default=8, ge=1, description="candidates to start (server maximum applies)")
    chunk_tokens: int = Field(default=16, ge=1, le=256, description="tokens between scoring rounds")
    rejection_rate: float = Field(default=0.5, ge=0.0, lt=1.0, description="fraction of the unfinished stopped at each round")
    min_survivors: int = Field(default=2, ge=1, description="rejection stops at this many; they run to the end")
    reward: str | dict[str, float] | None = RewardField


@register
class SpeculativeRejectionStrategy(Strategy):
    name = "speculative_rejection"
    description = (
        "Start N candidates, score them every chunk_tokens tokens and stop the lowest-scoring fraction "
        "until min_survivors remain; those run to the end; return the best finished answer."
    )
    Params = SpeculativeRejectionParams
    refuses = RESTARTS

    def check(self, params: SpeculativeRejectionParams, ctx: StrategyContext) -> SpeculativeRejectionParams:
        if ctx.num_choices != 1:
            raise StrategyParamError("speculative rejection returns one answer: use n=1", "n")
        if params.min_survivors > params.n:
            raise StrategyParamError(f"min_survivors ({params.min_survivors}) cannot exceed n ({params.n})", "min_survivors")
        return params.model_copy(update={"reward": check_candidates(params, ctx)})

    def sequences(self, params: SpeculativeRejectionParams, ctx: StrategyContext) -> int:
        return params.n

    async def run(self, ctx: StrategyContext, params: SpeculativeRejectionParams) -> StrategyResult:
        budget = min(ctx.sampling.max_tokens, ctx.engine.max_model_len - len(ctx.prompt_ids))
        stalled: set[int] = set()
        done = lambda c: c.finish_reason == "stop" or len(c.token_ids) >= budget or c.index in stalled  # noqa: E731
        # The first chunk is one request with n=N, sharing the prompt's KV cache.
        alive, first = await generate_candidates(ctx, params.n, stage="chunk-0", max_tokens=min(params.chunk_tokens, budget))
        stages: list[StageReport] = [first]
        rounds = []
        everyone = list(alive)
        finished: list[Candidate] = []
        step = 0
        while alive:
            # Unfinished answers are scored as they stand; finished ones get their final score.
            try:
                stages.append(await score_candidates(ctx, params.reward, alive, stage=f"score-{step}"))
            except BudgetExhausted as exc:
                if step == 0:  # nothing scored yet
                    return fallback_result(ctx, params, everyone, stages, exc)
                # Out of time to score this round: the best as of the last one.
                return self._best_so_far(ctx, params, finished, alive, stages, everyone, rounds, step)
            except RewardError as exc:
                return fallback_result(ctx, params, everyone, stages, exc)
            ended = {c.index for c in alive if done(c)}
            record = {"round": step, "alive": len(alive), "candidates": [c.index for c in alive],
                      "scores": [c.score for c in alive], "finished": sorted(ended)}
            finished += [c for c in alive if c.index in ended]
            alive = [c for c in alive if c.index not in ended]
            alive = self._thin(alive, params)
            record["kept"] = [c.index for c in alive]
            rounds.append(record)
            if not alive:
                break
            if ctx.budget.spent():
                return self._best_so_far(ctx, params, finished, alive, stages, everyone, rounds, step)
            step += 1
            # Survivors that rejection can no longer thin out run to the end in one request.
            final = len(alive) <= params.min_survivors
            stages += await asyncio.gather(*(self._extend(ctx, params, c, step, i, budget, final, stalled)
                                             for i, c in enumerate(alive)))
        best = finished[rank([c.score for c in finished])[0]]
        return StrategyResult(
            choices=[best],
            stages=stages,
            candidates=everyone,
            info={"selected": [best.index], "scores": [best.score], "rounds": rounds,
                  "stopped_early": params.n - len(finished)},
        )

    @staticmethod
    def _thin(alive: list[Candidate], params: SpeculativeRejectionParams) -> list[Candidate]:
        """The best-scoring survivors of a round, in their order (at least `min_survivors`)."""
        if len(alive) <= params.min_survivors:
            return alive
        order = rank([c.score for c in alive])
        keep = max(params.min_survivors, len(alive) - math.floor(params.rejection_rate * len(alive)))
        return [alive[i] for i in sorted(order[:keep])]

    @staticmethod
    async def _extend(ctx: StrategyContext, params: SpeculativeRejectionParams, c: Candidate, step: int,
                      seed_offset: int, budget: int, final: bool, stalled: set[int]) -> StageReport:
        """Decode candidate `c` one more chunk (to the end when `final`), in place."""
        seed = None if ctx.sampling.seed is None else ctx.sampling.seed + 7919 * step + seed_offset
        room = budget - len(c.token_ids)
        (more,), report = await generate_candidates(
            ctx, 1, stage=f"chunk-{step}-{c.index}", prompt_ids=ctx.prompt_ids + c.token_ids,
            max_tokens=room if final else min(params.chunk_tokens, room), seed=seed,
        )
        # The engine saw only this chunk: a stop string may start in an earlier one.
        c.text, stopped = StopStrings.of(ctx.sampling).cut(ctx.engine.tokenizer.decode(c.token_ids + more.token_ids))
        c.token_ids = c.token_ids + more.token_ids
        c.finish_reason = "stop" if stopped else more.finish_reason
        c.cut = c.cut or more.cut
        if not more.token_ids:
            stalled.add(c.index)  # an extension that produced nothing ends its candidate
        return report

    @staticmethod
    def _best_so_far(ctx, params, finished, alive, stages, everyone, rounds, step) -> StrategyResult:
        """Out of budget: the best-scoring answer as it stands, a whole finished one if any.
        Every candidate here has a score from a completed round."""
        ctx.budget.skip(f"speculative_rejection from round {step} ({len(alive)} unfinished)")
        complete = [c for c in finished if not c.cut and c.finish_reason != "length"]
        pool = complete or [c for c in finished + alive if c.score is not None]
        best = pool[rank([c.score for c in pool])[0]]
        if not complete:
            best.finish_reason = "length"
        return StrategyResult(choices=[best], stages=stages, candidates=everyone,
                              info={"selected": [best.index], "scores": [best.score], "rounds": rounds,
                                    "stopped_early": params.n - len(finished)})
