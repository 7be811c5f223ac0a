"""`self_refine`: the policy critiques its own answer against principles and revises it, up
to `rounds` times. A revision is kept only if the reward scores it higher than the current
answer (reward-gated); otherwise refinement stops."""

from __future__ import annotations

from pydantic import Field

from aligner.rewards import RewardError
from aligner.strategies.base import (
    Candidate,
    StrategyContext,
    StrategyParams,
    StrategyResult,
    StrategyUnavailable,
    register,
)
from aligner.strategies.best_of_n import RewardField, resolve_reward
from aligner.strategies.chat_calls import chat_once, question_of
from aligner.strategies.pipeline import OutputStrategy
from aligner.strategies.templates import CRITIQUE_PROMPT, DEFAULT_PRINCIPLES, REVISE_PROMPT

MAX_ROUNDS = 4


class SelfRefineParams(StrategyParams):
    rounds: int = Field(default=1, ge=1, le=MAX_ROUNDS)
    reward: str | dict[str, float] | None = RewardField
    principles: list[str] | None = Field(default=None, max_length=12, description="what the critique checks")
    max_critique_tokens: int = Field(default=128, ge=8, le=512)


@register
class SelfRefineStrategy(OutputStrategy):
    name = "self_refine"
    description = "Critique and revise the answer up to `rounds` times, keeping a revision only if it scores higher."
    Params = SelfRefineParams

    def check(self, params: SelfRefineParams, ctx: StrategyContext) -> SelfRefineParams:
        return params.model_copy(update={"reward": resolve_reward(params, ctx)})

    async def refine(self, ctx: StrategyContext, params: SelfRefineParams, result: StrategyResult) -> StrategyResult:
        question = question_of(ctx.messages)
        principles = "\n".join(f"- {p}" for p in (params.principles or DEFAULT_PRINCIPLES))
        history = []
        for c, choice in enumerate(result.choices):
            try:
                current = (await ctx.rewards.score(params.reward, ctx.messages, [choice.text])).total[0]
            except RewardError as exc:
                return gate_failed(result, params, exc, self.name)
            rounds = [{"round": 0, "answer": choice.text, "score": current, "accepted": True}]
            for r in range(1, params.rounds + 1):
                ask = [{"role": "user", "content": CRITIQUE_PROMPT.format(question=question, answer=choice.text, principles=principles)}]
                (critique,), critiqued = await chat_once(ctx, ask, stage=f"critique-{c}-{r}", max_tokens=params.max_critique_tokens, temperature=0.0)
                ask = [{"role": "user", "content": REVISE_PROMPT.format(question=question, answer=choice.text, critique=critique)}]
                (revision,), revised = await chat_once(ctx, ask, stage=f"revise-{c}-{r}", max_tokens=ctx.sampling.max_tokens, temperature=ctx.sampling.temperature)
                result.stages += [critiqued, revised]
                try:
                    score = (await ctx.rewards.score(params.reward, ctx.messages, [revision])).total[0]
                except RewardError as exc:
                    return gate_failed(result, params, exc, self.name)
                accepted = score > current
                rounds.append({"round": r, "critique": critique, "answer": revision, "score": score, "accepted": accepted})
                if not accepted:
                    break
                choice = Candidate(choice.index, revision, [], "stop", score=score)
                current = score
            result.choices[c] = choice
            history.append({"final_score": current, "rounds": rounds if params.return_candidates else None})
        result.info = {**result.info, self.name: history}
        return result


def gate_failed(result: StrategyResult, params: StrategyParams, exc: RewardError, stage: str) -> StrategyResult:
    """The gate's reward failed: keep the answers as they are (or fail if fallback is off)."""
    if not params.fallback:
        raise StrategyUnavailable(f"{exc}; the request set fallback=false") from exc
    result.info = {**result.info, "fallback": {"reason": str(exc), "reward": exc.name, "stage": stage}}
    return result
