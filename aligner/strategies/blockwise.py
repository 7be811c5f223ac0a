"""`blockwise`: reward-guided search over blocks (controlled decoding, Mudgal et al. 2024;
CARDS-style acceptance, Li et al. 2024).

From the answer so far, sample k continuations of up to `block_tokens` tokens in one engine
request (the shared prefix comes from vLLM's prefix cache), score prefix + block with the
reward, keep the best block, repeat until the answer ends or `max_tokens`. Each accepted
block streams to the client as soon as it is chosen. Works with any sequence reward model.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Literal

from pydantic import Field

from aligner.rewards import RewardError
from aligner.strategies.base import (
    Candidate,
    StageReport,
    Strategy,
    StrategyContext,
    StrategyParamError,
    StrategyParams,
    StrategyResult,
    StrategyUnavailable,
    StreamEvent,
    register,
)
from aligner.strategies.best_of_n import RewardField, resolve_reward
from aligner.strategies.candidates import generate_candidates, score_candidates
from aligner.strategies.selection import rank
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


@register
class BlockwiseStrategy(Strategy):
    name = "blockwise"
    description = (
        "Sample k blocks from the answer so far, keep the one the reward scores best (or the first "
        "that clears a rising threshold), repeat; streams each accepted block."
    )
    Params = BlockwiseParams

    def check(self, params: BlockwiseParams, ctx: StrategyContext) -> BlockwiseParams:
        if params.k > ctx.limits.max_candidates:
            raise StrategyParamError(f"k must be at most {ctx.limits.max_candidates} on this server", "k")
        if ctx.n != 1:
            raise StrategyParamError("blockwise search returns one answer: use n=1", "n")
        if params.k > 1 and ctx.sampling.temperature == 0:
            raise StrategyParamError("sampling k blocks needs temperature > 0", "k")
        return params.model_copy(update={"reward": resolve_reward(params, ctx)})

    def sequences(self, params: BlockwiseParams, ctx: StrategyContext) -> int:
        return params.k

    async def run(self, ctx: StrategyContext, params: BlockwiseParams) -> StrategyResult:
        result = None
        async for event in self.stream(ctx, params):
            if isinstance(event, StrategyResult):
                result = event
        return result

    async def stream(self, ctx: StrategyContext, params: BlockwiseParams) -> AsyncIterator[StreamEvent]:
        tokenizer = ctx.engine.tokenizer
        accepted: list[int] = []
        text = ""
        stages: list[StageReport] = []
        steps: list[dict] = []
        budget = ctx.sampling.max_tokens
        room = ctx.engine.max_model_len - len(ctx.prompt_ids)
        finish = "length"
        fallback = None
        step = 0
        while len(accepted) < budget and len(accepted) < room:
            limit = min(params.block_tokens, budget - len(accepted), room - len(accepted))
            threshold = None
            if params.accept_threshold is not None:
                threshold = params.accept_threshold + params.threshold_growth * len(accepted) / budget
            for attempt in range(params.max_retries + 1):
                seed = None if ctx.sampling.seed is None else ctx.sampling.seed + 1009 * step + attempt
                candidates, generated = await generate_candidates(
                    ctx, params.k, stage=f"block-{step}" + (f"-retry{attempt}" if attempt else ""),
                    prompt_ids=ctx.prompt_ids + accepted, max_tokens=limit, seed=seed,
                    logprobs=ENTROPY_TOP_K if params.segment == "entropy" else None,
                )
                stages.append(generated)
                if params.segment == "entropy":
                    for c in candidates:
                        keep = entropy_cut(c, params.entropy_threshold, params.min_block_tokens)
                        if keep < len(c.token_ids):
                            c.token_ids, c.finish_reason = c.token_ids[:keep], None
                for c in candidates:
                    c.text = tokenizer.decode(accepted + c.token_ids)[len(text):]
                try:
                    stages.append(await score_candidates(
                        ctx, params.reward, candidates, [text + c.text for c in candidates], stage=f"score-{step}"))
                except RewardError as exc:
                    # No scores: keep a plain sample (or fail when fallback is off).
                    if not params.fallback:
                        raise StrategyUnavailable(f"{exc}; the request set fallback=false") from exc
                    fallback = {"reason": str(exc), "reward": exc.name}
                    pick = 0
                    break
                order = rank([c.score for c in candidates])
                clearing = [i for i in range(len(candidates)) if threshold is None or candidates[i].score >= threshold]
                if threshold is None:
                    pick = order[0]
                    break
                if clearing:
                    pick = clearing[0]
                    break
                pick = order[0]  # nothing cleared: resample, or settle for the best
            chosen = candidates[pick]
            steps.append({
                "step": step,
                "selected": pick,
                "threshold": threshold,
                "retries": attempt,
                "candidates": [c.public() for c in candidates] if params.return_candidates else None,
            })
            accepted += chosen.token_ids
            if chosen.text:
                text += chosen.text
                yield SequenceDelta(0, chosen.text, list(chosen.token_ids), None, None)
            step += 1
            if chosen.finish_reason == "stop" or not chosen.token_ids:
                finish = "stop"
                break
            if fallback:
                break
        if fallback and finish != "stop":
            # The reward failed mid-answer: finish the answer with plain decoding.
            tail, generated = await generate_candidates(
                ctx, 1, stage="fallback", prompt_ids=ctx.prompt_ids + accepted,
                max_tokens=max(1, min(budget, room) - len(accepted)),
            )
            stages.append(generated)
            rest = tokenizer.decode(accepted + tail[0].token_ids)[len(text):]
            accepted += tail[0].token_ids
            text += rest
            finish = tail[0].finish_reason or "length"
            if rest:
                yield SequenceDelta(0, rest, list(tail[0].token_ids), None, None)
        yield SequenceDelta(0, "", [], None, finish)
        generated = [s for s in stages if s.stage.startswith("block-")]
        prompt = sum(s.prompt_tokens for s in generated)
        info = {
            "steps": steps,
            "blocks": len(steps),
            # Share of block prompts (chat prompt + answer so far) served from the prefix cache.
            "prefix_cache_hit_rate": round(sum(s.cached_tokens for s in generated) / prompt, 4) if prompt else 0.0,
        }
        if fallback:
            info["fallback"] = fallback
        final = Candidate(0, text, accepted, finish)
        yield StrategyResult(choices=[final], stages=stages, info=info)
