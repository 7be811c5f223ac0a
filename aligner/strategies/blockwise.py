"""`blockwise`: reward-guided search over blocks (controlled decoding, Mudgal et al. 2024;
CARDS-style acceptance, Li et al. 2024).

From the answer so far, sample k continuations of up to `block_tokens` tokens in one engine
request (the shared prefix comes from vLLM's prefix cache), score prefix + block with the
reward, keep the best block, repeat until the answer ends or `max_tokens`. Each accepted
block streams to the client as soon as it is chosen. Works with any sequence reward model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from typing import Literal

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
from aligner.strategies.selection import rank
from aligner.strategies.stops import StopStrings
from decoding.engine import SequenceDelta

MAX_BLOCK_TOKENS = 256
MAX_RETRIES = 8
ENTROPY_TOP_K = 20  # alternatives per position used to estimate next-token entropy


class BlockwiseParams(StrategyParams):
    k: int = Field(default=4, ge=1, description="candidate blocks per step (server maximum applies)")
    block_tokens: int = Field(default=16, ge=1, le=MAX_BLOCK_TOKENS)
    reward: str | dict[str, float] | None = RewardField
    segment: Literal["fixed", "entropy"] = Field(
        default="fixed", description="end a block after block_tokens, or earlier where next-token entropy is high"
    )
    entropy_threshold: float = Field(default=2.0, gt=0.0, le=20.0, description="nats, for segment=entropy")
    min_block_tokens: int = Field(default=4, ge=1, le=MAX_BLOCK_TOKENS)
    accept_threshold: float | None = Field(
        default=None, description="CARDS: accept the first block whose reward clears this, rising along the answer"
    )
    threshold_growth: float = Field(default=0.0, ge=-1000.0, le=1000.0, description="added to the threshold over a full answer")
    max_retries: int = Field(default=2, ge=0, le=MAX_RETRIES, description="resamples when no block clears the threshold")


def entropy_cut(candidate: Candidate, threshold: float, minimum: int) -> int:
    """Tokens to keep: stop before the first position (after `minimum`) where the model's
    next-token distribution, estimated from its top alternatives, has entropy > threshold."""
    for i, lp in enumerate(candidate.logprobs or ()):
        if i < minimum or not lp.top:
            continue
        probs = [math.exp(t.logprob) for t in lp.top]
        tail = max(0.0, 1.0 - sum(probs))
        entropy = -sum(p * math.log(p) for p in probs if p > 0) + (-tail * math.log(tail) if tail > 1e-9 else 0.0)
        if entropy > threshold:
            return i
    return len(candidate.token_ids)


class BlockSearch:
    """One request's search: the answer accepted so far and what each step decided."""

    def __init__(self, ctx: StrategyContext, params: BlockwiseParams):
        self.ctx, self.params = ctx, params
        self.accepted: list[int] = []
        self.text = ""  # the accepted tokens' text; the answer is it cut at a stop string
        self.stops = StopStrings.of(ctx.sampling)
        self.sent = 0  # characters of the answer streamed
        self.unsent_ids: list[int] = []  # accepted tokens not yet in a delta (their text held back)
        self.stages: list[StageReport] = []
        self.steps: list[dict] = []
        self.fallback: dict | None = None
        self.finish = "length"
        self.limit = min(ctx.sampling.max_tokens, ctx.engine.max_model_len - len(ctx.prompt_ids))

    def threshold(self) -> float | None:
        p = self.params
        if p.accept_threshold is None:
            return None
        return p.accept_threshold + p.threshold_growth * len(self.accepted) / self.ctx.sampling.max_tokens

    async def sample(self, step: int, attempt: int) -> list[Candidate]:
        """k blocks continuing the answer, cut at high entropy if asked, as text after it."""
        ctx, p = self.ctx, self.params
        seed = None if ctx.sampling.seed is None else ctx.sampling.seed + 1009 * step + attempt
        candidates, generated = await generate_candidates(
            ctx, p.k, stage=f"block-{step}" + (f"-retry{attempt}" if attempt else ""),
            prompt_ids=ctx.prompt_ids + self.accepted, seed=seed,
            max_tokens=min(p.block_tokens, self.limit - len(self.accepted)),
            logprobs=ENTROPY_TOP_K if p.segment == "entropy" else None,
        )
        self.stages.append(generated)
        for c in candidates:
            if p.segment == "entropy":
                keep = entropy_cut(c, p.entropy_threshold, p.min_block_tokens)
                if keep < len(c.token_ids):
                    c.token_ids, c.finish_reason = c.token_ids[:keep], None
            c.text = ctx.engine.tokenizer.decode(self.accepted + c.token_ids)[len(self.text):]
            if self.stops.cut(self.text + c.text)[1]:
                c.finish_reason = "stop"
        return candidates

    async def step(self, step: int) -> Candidate | None:
        """Sample, score and pick this step's block (resampling while none clears the threshold);
        None when the request's budget ran out before a block could be chosen."""
        threshold = self.threshold()
        for attempt in range(self.params.max_retries + 1):
            candidates = await self.sample(step, attempt)
            if any(c.cut for c in candidates) or self.ctx.budget.spent():  # blocks may be cut short: the answer is the accepted prefix
                self.ctx.budget.skip(f"blockwise blocks from step {step}")
                return None
            try:
                self.stages.append(await score_candidates(
                    self.ctx, self.params.reward, candidates,
                    [self.stops.cut(self.text + c.text)[0] for c in candidates],
                    stage=f"score-{step}"))
            except BudgetExhausted:  # no time to choose among them: the answer is the accepted prefix
                self.ctx.budget.skip(f"blockwise blocks from step {step}")
                return None
            except RewardError as exc:
                self.fallback = reward_failed(self.params, exc, f"score-{step}")
                pick = 0  # no scores: keep a plain sample
                break
            order = rank([c.score for c in candidates])
            pick = order[0]
            if threshold is None:
                break
            clearing = [i for i, c in enumerate(candidates) if c.score >= threshold]
            if clearing:
                pick = clearing[0]
                break
            # Nothing cleared: resample, or settle for the best after the last retry.
        self.steps.append({
            "step": step, "selected": pick, "threshold": threshold, "retries": attempt,
            "candidates": [c.public() for c in candidates] if self.params.return_candidates else None,
        })
        return candidates[pick]

    def accept(self, tokens: list[int], text: str) -> None:
        self.accepted += tokens
        self.text += text

    @property
    def answer(self) -> str:
        return self.stops.cut(self.text)[0]

    def unsent(self, tokens: list[int], finished: bool) -> SequenceDelta | None:
        """A delta with the answer's text not streamed yet that can go now (a tail that may still
        begin a stop string waits until the answer ends), carrying `tokens` and any held before."""
        self.unsent_ids += tokens
        ready = self.stops.streamable(self.answer, finished)
        text, self.sent = ready[self.sent:], max(self.sent, len(ready))
        if not text and not (finished and self.unsent_ids):
            return None
        delta, self.unsent_ids = SequenceDelta(0, text, self.unsent_ids, None, None), []
        return delta

    async def blocks(self) -> AsyncIterator[SequenceDelta]:
        step = 0
        while len(self.accepted) < self.limit:
            if self.ctx.budget.spent():
                self.ctx.budget.skip(f"blockwise blocks from step {step}")
                return
            chosen = await self.step(step)
            if chosen is None:
                return
            self.accept(chosen.token_ids, chosen.text)
            ended = chosen.finish_reason == "stop" or not chosen.token_ids
            if delta := self.unsent(list(chosen.token_ids), ended):
                yield delta
            step += 1
            if ended:
                self.finish = "stop"
                return
            if self.fallback:
                return

    async def finish_plainly(self) -> AsyncIterator[SequenceDelta]:
        """The reward failed mid-answer: finish the answer with plain decoding."""
        tail, generated = await generate_candidates(
            self.ctx, 1, stage="fallback", prompt_ids=self.ctx.prompt_ids + self.accepted,
            max_tokens=max(1, self.limit - len(self.accepted)),
        )
        self.stages.append(generated)
        rest = self.ctx.engine.tokenizer.decode(self.accepted + tail[0].token_ids)[len(self.text):]
        self.accept(tail[0].token_ids, rest)
        self.finish = "stop" if self.stops.cut(self.text)[1] else tail[0].finish_reason or "length"
        if delta := self.unsent(list(tail[0].token_ids), True):
            yield delta

    def result(self) -> StrategyResult:
        generated = [s for s in self.stages if s.stage.startswith("block-")]
        prompt = sum(s.prompt_tokens for s in generated)
        info = {
            "steps": self.steps,
            "blocks": len(self.steps),
            # Share of block prompts (chat prompt + answer so far) served from the prefix cache.
            "prefix_cache_hit_rate": round(sum(s.cached_tokens for s in generated) / prompt, 4) if prompt else 0.0,
        }
        if self.fallback:
            info["fallback"] = self.fallback
        return StrategyResult(choices=[Candidate(0, self.answer, self.accepted, self.finish)], stages=self.stages,
                              info=info)


@register
class BlockwiseStrategy(Strategy):
    name = "blockwise"
    description = (
        "Sample k blocks from the answer so far, keep the one the reward scores best (or the first "
        "that clears a rising threshold), repeat; streams each accepted block."
    )
    Params = BlockwiseParams
    refuses = RESTARTS

    def check(self, params: BlockwiseParams, ctx: StrategyContext) -> BlockwiseParams:
        if params.k > ctx.limits.max_candidates:
            raise StrategyParamError(f"k must be at most {ctx.limits.max_candidates} on this server", "k")
        if ctx.num_choices != 1:
            raise StrategyParamError("blockwise search returns one answer: use n=1", "n")
        if params.k > 1 and ctx.sampling.temperature == 0:
            raise StrategyParamError("sampling k blocks needs temperature > 0", "k")
        return params.model_copy(update={"reward": resolve_reward(params, ctx)})

    def sequences(self, params: BlockwiseParams, ctx: StrategyContext) -> int:
        return params.k

    async def run(self, ctx: StrategyContext, params: BlockwiseParams) -> StrategyResult:
        return await self.run_from_stream(ctx, params)

    async def stream(self, ctx: StrategyContext, params: BlockwiseParams) -> AsyncIterator[StreamEvent]:
        search = BlockSearch(ctx, params)
        async with contextlib.aclosing(search.blocks()) as blocks:
            async for delta in blocks:
                yield delta
        if search.fallback and search.finish != "stop" and not ctx.budget.spent():
            async with contextlib.aclosing(search.finish_plainly()) as rest:
                async for delta in rest:
                    yield delta
        if delta := search.unsent([], True):  # a tail held back in case it began a stop string
            yield delta
        yield SequenceDelta(0, "", [], None, search.finish)
        yield search.result()
