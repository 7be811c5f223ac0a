"""Step-level search over blocks with a reward scoring partial answers: `particle_filter`
(sequential Monte Carlo: Puri et al. 2025, "A Probabilistic Inference Approach to
Inference-Time Scaling of LLMs using Particle-Based Monte Carlo") and `beam_search`.

Both keep a population of partial answers ("particles", "beams") and grow every unfinished
one by a block of up to `block_tokens` tokens each step:

- `particle_filter`: each particle grows by one sampled block; the reward scores every
  particle's answer so far; `n` particles are drawn again, with replacement, with probability
  softmax(reward / `resample_temperature`) (systematic resampling), so particles that score
  well multiply and the rest die out. Finished particles stay in the population with their
  last score.
- `beam_search`: each beam grows by `k` sampled blocks; the `n` best-scoring distinct partial
  answers (finished ones included) are kept.

Particles that share an answer so far continue in one engine request (n = their count),
which vLLM's prefix cache serves. The search ends when every kept particle has finished,
the answer reaches `max_tokens`, or the request's budget runs out; the answer is the
best-scoring kept particle.

Streaming: every kept particle descends from those kept before it, so the tokens all kept
particles share can no longer change. The stream sends that common prefix as it grows and
the chosen particle's rest at the end, so a streamed answer is the same as a whole one.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

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
    StreamEvent,
    register,
)
from aligner.strategies.common import RewardField, generate_candidates, resolve_reward, reward_failed, score_candidates
from aligner.strategies.selection import rank, softmax, top_distinct
from aligner.strategies.stops import StopStrings
from decoding.engine import SequenceDelta

MAX_BLOCK_TOKENS = 256
REPLACEMENT = "\ufffd"  # a decoded prefix that ends inside a multi-byte character


class ParticleFilterParams(StrategyParams):
    n: int = Field(default=4, ge=1, description="particles (server maximum applies)")
    block_tokens: int = Field(default=16, ge=1, le=MAX_BLOCK_TOKENS)
    reward: str | dict[str, float] | None = RewardField
    resample_temperature: float = Field(
        default=1.0, gt=0.0, le=100.0,
        description="particles are redrawn with probability softmax(reward / resample_temperature)",
    )


class BeamSearchParams(StrategyParams):
    n: int = Field(default=2, ge=1, description="beams kept each step")
    k: int = Field(default=2, ge=1, description="blocks sampled from each beam each step (n * k: server maximum applies)")
    block_tokens: int = Field(default=16, ge=1, le=MAX_BLOCK_TOKENS)
    reward: str | dict[str, float] | None = RewardField


@dataclass
class Particle:
    """A partial answer: its tokens, their text, its last score, and how it ended (if it did)."""

    token_ids: list[int]
    text: str
    score: float | None = None
    finish: str | None = None
    parent: int | None = None  # its index in the previous step's kept particles

    def public(self) -> dict:
        return {"text": self.text, "score": self.score, "finish_reason": self.finish,
                "completion_tokens": len(self.token_ids), "parent": self.parent}


def systematic_resample(weights: list[float], count: int, rng: random.Random) -> list[int]:
    """`count` indices drawn in proportion to `weights` (summing to 1) with one uniform draw:
    index i appears floor or ceil of count * weights[i] times (lower variance than
    independent draws).

    >>> systematic_resample([0.5, 0.25, 0.25], 4, random.Random(0))
    [0, 0, 1, 2]
    >>> systematic_resample([1.0, 0.0], 3, random.Random(1))
    [0, 0, 0]
    """
    total = sum(weights)
    cumulative = list(itertools.accumulate(weights))
    start = rng.random()
    return [min(bisect.bisect_right(cumulative, (start + j) / count * total), len(weights) - 1)
            for j in range(count)]


def common_prefix(sequences: list[list[int]]) -> list[int]:
    """The tokens every sequence starts with.

    >>> common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]])
    [1, 2]
    """
    first = sequences[0]
    end = len(first)
    for seq in sequences[1:]:
        end = min(end, len(seq))
        for i in range(end):
            if seq[i] != first[i]:
                end = i
                break
    return list(first[:end])


class StepSearch:
    """One request's population search; `select` is what differs between the strategies."""

    def __init__(self, ctx: StrategyContext, params, children: int):
        self.ctx, self.params, self.children = ctx, params, children
        self.kept = [Particle([], "") for _ in range(params.n)]
        self.stages: list[StageReport] = []
        self.steps: list[dict] = []
        self.fallback: dict | None = None
        self.limit = min(ctx.sampling.max_tokens, ctx.engine.max_model_len - len(ctx.prompt_ids))
        self.rng = random.Random(ctx.sampling.seed)
        self.sent: list[int] = []  # tokens streamed so far
        self.sent_text = ""
        self.stops = StopStrings.of(ctx.sampling)

    def text_of(self, ids: list[int]) -> tuple[str, bool]:
        """The answer these tokens spell, cut at a stop string, and whether one ended it (the
        engine saw only this block: a string may start in an earlier one)."""
        return self.stops.cut(self.ctx.engine.tokenizer.decode(ids))

    def select(self, pool: list[Particle]) -> tuple[list[int], dict]:
        raise NotImplementedError

    def done(self) -> bool:
        return all(p.finish for p in self.kept)

    async def grow(self, step: int) -> list[Particle] | None:
        """The unfinished particles' children (finished ones are carried over by `run`), one
        engine request per distinct answer so far; None when the budget cut the step short."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(self.kept):
            if not p.finish:
                groups.setdefault(tuple(p.token_ids), []).append(i)
        seed = self.ctx.sampling.seed
        requests = []
        for g, (prefix, members) in enumerate(groups.items()):
            requests.append(generate_candidates(
                self.ctx, len(members) * self.children, stage=f"step-{step}-{g}",
                prompt_ids=self.ctx.prompt_ids + list(prefix),
                seed=None if seed is None else seed + 1009 * step + 31 * g,
                max_tokens=min(self.params.block_tokens, self.limit - len(prefix)),
            ))
        try:
            results = await asyncio.gather(*requests)
        except BudgetExhausted:
            return None
        children, cut = [], False
        for (prefix, members), (candidates, report) in zip(groups.items(), results):
            self.stages.append(report)
            cut = cut or any(c.cut for c in candidates)
            for j, c in enumerate(candidates):
                parent = members[j // self.children]
                ids = list(prefix) + list(c.token_ids)
                text, stopped = self.text_of(ids)
                finish = "stop" if stopped or c.finish_reason == "stop" or not c.token_ids else None
                if finish is None and len(ids) >= self.limit:
                    finish = "length"
                children.append(Particle(ids, text, None, finish, parent))
        return None if cut else children

    async def run(self) -> AsyncIterator[SequenceDelta]:
        """Grow, score and select until every kept particle has finished; stream the prefix
        every kept particle shares as it grows."""
        step = 0
        while not self.done():
            if self.ctx.budget.spent():
                self.ctx.budget.skip(f"{self.name} steps from {step}")
                return
            children = await self.grow(step)
            if children is None:
                self.ctx.budget.skip(f"{self.name} steps from {step}")
                return
            carried = [Particle(p.token_ids, p.text, p.score, p.finish, i)
                       for i, p in enumerate(self.kept) if p.finish]
            pool = carried + children
            scored = [Candidate(i, p.text, p.token_ids, p.finish) for i, p in enumerate(children)]
            try:
                self.stages.append(await score_candidates(self.ctx, self.params.reward, scored, stage=f"score-{step}"))
            except BudgetExhausted:
                self.ctx.budget.skip(f"{self.name} steps from {step}")
                return
            except RewardError as exc:
                self.fallback = reward_failed(self.params, exc, f"score-{step}")
                self.kept = [children[0]]
                return
            for p, c in zip(children, scored):
                p.score = c.score
            picks, detail = self.select(pool)
            self.kept = [Particle(pool[i].token_ids, pool[i].text, pool[i].score, pool[i].finish, pool[i].parent)
                         for i in picks]
            self.steps.append({
                "step": step, "grown": len(children), "carried": len(carried),
                "scores": [round(p.score, 4) for p in pool], "kept": picks, **detail,
                "candidates": [p.public() for p in pool] if self.params.return_candidates else None,
            })
            step += 1
            if delta := self.advance(common_prefix([p.token_ids for p in self.kept])):
                yield delta

    def advance(self, tokens: list[int], finished: bool = False) -> SequenceDelta | None:
        """A delta for the streamed answer grown to `tokens` (held back while its text would
        end inside a character, or, unless `finished`, in what may begin a stop string), or None."""
        if len(tokens) < len(self.sent):
            return None
        text, stopped = self.text_of(tokens)
        text = self.stops.streamable(text, finished or stopped)
        if text.endswith(REPLACEMENT) or not text.startswith(self.sent_text):
            return None
        delta = SequenceDelta(0, text[len(self.sent_text):], tokens[len(self.sent):], None, None)
        self.sent, self.sent_text = list(tokens), text
        return delta if delta.text or delta.token_ids else None

    async def finish_plainly(self, particle: Particle) -> Particle:
        """The reward failed: finish `particle` with plain decoding."""
        tail, report = await generate_candidates(
            self.ctx, 1, stage="fallback", prompt_ids=self.ctx.prompt_ids + particle.token_ids,
            max_tokens=max(1, self.limit - len(particle.token_ids)),
        )
        self.stages.append(report)
        ids = particle.token_ids + tail[0].token_ids
        text, stopped = self.text_of(ids)
        return Particle(ids, text, None, "stop" if stopped else tail[0].finish_reason or "length")

    def best(self) -> int:
        return rank([p.score if p.score is not None else float("-inf") for p in self.kept])[0]

    def result(self, chosen: Particle, streamed_early: int) -> StrategyResult:
        generated = [s for s in self.stages if s.stage.startswith("step-")]
        prompt = sum(s.prompt_tokens for s in generated)
        info = {
            "steps": self.steps,
            "particles": [p.public() for p in self.kept],
            "selected": self.kept.index(chosen) if chosen in self.kept else None,
            "scores": [chosen.score],
            "streamed_early_tokens": streamed_early,
            "prefix_cache_hit_rate": round(sum(s.cached_tokens for s in generated) / prompt, 4) if prompt else 0.0,
        }
        if self.fallback:
            info["fallback"] = self.fallback
        finish = chosen.finish or "length"
        return StrategyResult(choices=[Candidate(0, chosen.text, chosen.token_ids, finish, score=chosen.score)],
                              stages=self.stages, info=info)

    async def stream(self) -> AsyncIterator[StreamEvent]:
        async with contextlib.aclosing(self.run()) as deltas:
            async for delta in deltas:
                yield delta
        streamed_early = len(self.sent)  # tokens every kept particle agreed on before the end
        chosen = self.kept[self.best()]
        if self.fallback and not chosen.finish and not self.ctx.budget.spent():
            chosen = await self.finish_plainly(chosen)
            self.kept = [chosen]
        if delta := self.advance(chosen.token_ids, finished=True):
            yield delta
        if self.sent_text != chosen.text:  # its text ends inside a character: send the rest as it is
            yield SequenceDelta(0, chosen.text[len(self.sent_text):], chosen.token_ids[len(self.sent):], None, None)
        yield SequenceDelta(0, "", [], None, chosen.finish or "length")
        yield self.result(chosen, streamed_early)


class ParticleFilter(StepSearch):
    name = "particle_filter"

    def select(self, pool: list[Particle]) -> tuple[list[int], dict]:
        weights = softmax([p.score for p in pool], self.params.resample_temperature)
        ess = 1.0 / sum(w * w for w in weights)
        return systematic_resample(weights, self.params.n, self.rng), {
            "weights": [round(w, 4) for w in weights], "effective_particles": round(ess, 3)}


class BeamSearch(StepSearch):
    name = "beam_search"

    def select(self, pool: list[Particle]) -> tuple[list[int], dict]:
        return top_distinct([p.score for p in pool], [p.text for p in pool], self.params.n), {}


class _PopulationStrategy(Strategy):
    Search: type[StepSearch]
    refuses = RESTARTS

    def children(self, params) -> int:
        return 1

    def check(self, params, ctx: StrategyContext):
        if self.sequences(params, ctx) > ctx.limits.max_candidates:
            param = "k" if self.children(params) > 1 else "n"
            raise StrategyParamError(
                f"{self.sequences(params, ctx)} sequences per step exceeds this server's maximum of "
                f"{ctx.limits.max_candidates}", param)
        if ctx.num_choices != 1:
            raise StrategyParamError(f"{self.name} returns one answer: use n=1 in the request", "n")
        if self.sequences(params, ctx) > 1 and ctx.sampling.temperature == 0:
            raise StrategyParamError("sampling several blocks needs temperature > 0", "n")
        return params.model_copy(update={"reward": resolve_reward(params, ctx)})

    def sequences(self, params, ctx: StrategyContext) -> int:
        return params.n * self.children(params)

    async def run(self, ctx: StrategyContext, params) -> StrategyResult:
        return await self.run_from_stream(ctx, params)

    async def stream(self, ctx: StrategyContext, params) -> AsyncIterator[StreamEvent]:
        search = self.Search(ctx, params, self.children(params))
        async with contextlib.aclosing(search.stream()) as events:
            async for event in events:
                yield event


@register
class ParticleFilterStrategy(_PopulationStrategy):
    name = "particle_filter"
    description = (
        "Particle filtering over blocks: n partial answers grow a block each step, the reward scores "
        "them, and they are redrawn in proportion to softmax(reward / resample_temperature); streams "
        "the prefix every particle shares."
    )
    Params = ParticleFilterParams
    Search = ParticleFilter


@register
class BeamSearchStrategy(_PopulationStrategy):
    name = "beam_search"
    description = (
        "Beam search over blocks: each of n beams grows k sampled blocks, the reward scores the partial "
        "answers, the n best distinct ones are kept; streams the prefix every beam shares."
    )
    Params = BeamSearchParams
    Search = BeamSearch

    def children(self, params) -> int:
        return params.k
