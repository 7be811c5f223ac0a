"""`correct` (Aligner-style): a corrector reads (question, answer) and writes an improved
answer, accepted only if the reward scores it higher. The corrector is the policy with a
correction prompt, or a helper model registered at start (`--helper-model NAME=PATH`)."""

from __future__ import annotations

from aligner.rewards import RewardError
from aligner.strategies.base import Candidate, StrategyContext, StrategyParams, StrategyResult, register
from aligner.strategies.chat_calls import ModelField, chat_once, check_model, check_vocabulary, question_of
from aligner.strategies.common import RewardField, resolve_reward
from aligner.strategies.pipeline import OutputStrategy, gate_failed
from aligner.strategies.templates import CORRECT_PROMPT


class CorrectParams(StrategyParams):
    reward: str | dict[str, float] | None = RewardField
    corrector: str = ModelField


@register
class CorrectStrategy(OutputStrategy):
    name = "correct"
    description = "Rewrite the answer with a correction prompt; keep the correction only if it scores higher."
    Params = CorrectParams
    # A kept revision is a new answer from a separate call, without the original's logprobs.
    refuses = {"logprobs": "replaces answers with revisions that carry no logprobs"}

    def check(self, params: CorrectParams, ctx: StrategyContext) -> CorrectParams:
        check_model(ctx, params.corrector, "corrector")
        check_vocabulary(ctx, params.corrector, "corrector")
        return params.model_copy(update={"reward": resolve_reward(params, ctx)})

    async def refine(self, ctx: StrategyContext, params: CorrectParams, result: StrategyResult) -> StrategyResult:
        question = question_of(ctx.messages)
        report = []
        for c, choice in enumerate(result.choices):
            if ctx.budget.spent():
                ctx.budget.skip(f"correct: choices {c}-{len(result.choices) - 1}")
                break
            ask = [{"role": "user", "content": CORRECT_PROMPT.format(question=question, answer=choice.text)}]
            (corrected,), stage = await chat_once(
                ctx, ask, stage=f"correct-{c}", max_tokens=ctx.sampling.max_tokens, temperature=0.0,
                model=params.corrector, answer=True,
            )
            result.stages.append(stage)
            if ctx.budget.spent():  # the correction may have been cut short: keep the answer
                ctx.budget.skip(f"correct: choice {c} (cut before it was scored)")
                break
            try:
                before, after = (await ctx.rewards.score(params.reward, ctx.messages, [choice.text, corrected])).total
            except RewardError as exc:
                # Corrections accepted so far stay; the report says how far it got.
                result.info = {**result.info, self.name: report}
                return gate_failed(result, params, exc, self.name)
            accepted = after > before
            report.append({"original_score": before, "corrected_score": after, "accepted": accepted,
                           "correction": corrected if params.return_candidates else None})
            if accepted:
                result.choices[c] = Candidate(choice.index, corrected, [], "stop", score=after)
        result.info = {**result.info, self.name: report}
        return result
