"""`rewrite`: black-box prompt optimisation (BPO-style). A rewriter, given a meta-prompt,
rewrites the user's last message to be clearer and safer before the answer is generated. The
rewriter is the policy, or a helper model registered at start (`--helper-model NAME=PATH`).

With `candidates: m > 1`, m rewrites are drafted, each answered once, the answers scored by
the reward against the *original* question, and the rewrite whose answer scored best is kept.
"""

from __future__ import annotations

from pydantic import Field

from aligner.rewards import RewardError
from aligner.strategies.base import StrategyContext, StrategyParamError, StrategyParams, register
from aligner.strategies.chat_calls import ModelField, chat_once, check_model, last_user_message
from aligner.strategies.common import resolve_reward, reward_failed
from aligner.strategies.pipeline import PromptOutcome, PromptStrategy
from aligner.strategies.templates import REWRITE_PROMPT

MAX_REWRITE_CANDIDATES = 8


class RewriteParams(StrategyParams):
    candidates: int = Field(default=1, ge=1, le=MAX_REWRITE_CANDIDATES, description="rewrites to draft")
    max_rewrite_tokens: int = Field(default=128, ge=8, le=512)
    reward: str | dict[str, float] | None = Field(default=None, description="scores answers when candidates > 1")
    rewriter: str = ModelField


@register
class RewriteStrategy(PromptStrategy):
    name = "rewrite"
    description = "Rewrite the user's last message to be clearer and safer (BPO-style) before answering."
    Params = RewriteParams

    def check(self, params: RewriteParams, ctx: StrategyContext) -> RewriteParams:
        check_model(ctx, params.rewriter, "rewriter")
        if params.candidates > ctx.limits.max_candidates:
            raise StrategyParamError(f"candidates must be at most {ctx.limits.max_candidates} on this server",
                                     "candidates")
        if params.candidates > 1:
            return params.model_copy(update={"reward": resolve_reward(params, ctx)})
        return params

    def sequences(self, params: RewriteParams, ctx: StrategyContext) -> int:
        return max(params.candidates, ctx.num_choices)

    async def transform(self, ctx: StrategyContext, params: RewriteParams) -> PromptOutcome:
        i = last_user_message(ctx.messages)
        original = ctx.messages[i]["content"]
        ask = [{"role": "user", "content": REWRITE_PROMPT.format(question=original)}]
        rewrites, report = await chat_once(
            ctx, ask, stage="rewrite", max_tokens=params.max_rewrite_tokens, n=params.candidates,
            temperature=0.7 if params.candidates > 1 else 0.0, model=params.rewriter,
        )
        rewrites = [r or original for r in rewrites]
        stages = [report]
        info = {"original": original, "rewrites": rewrites, "selected": 0}
        if params.candidates > 1:
            answers = []
            for k, rewrite in enumerate(rewrites):
                asked = _replace(ctx.messages, i, rewrite)
                (answer,), answered = await chat_once(
                    ctx, asked, stage=f"rewrite-answer-{k}", max_tokens=ctx.sampling.max_tokens,
                    temperature=ctx.sampling.temperature, answer=True,
                )
                answers.append(answer)
                stages.append(answered)
            try:
                scored = await ctx.rewards.score(params.reward, ctx.messages, answers)
                info["scores"] = scored.total
                info["selected"] = max(range(len(answers)), key=lambda k: (scored.total[k], -k))
            except RewardError as exc:
                info["fallback"] = reward_failed(params, exc, self.name)
        info["rewrite"] = rewrites[info["selected"]]
        return PromptOutcome(_replace(ctx.messages, i, info["rewrite"]), stages, info)


def _replace(messages, index: int, content: str) -> list[dict[str, str]]:
    out = [dict(m) for m in messages]
    out[index]["content"] = content
    return out
