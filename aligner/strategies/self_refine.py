"""`self_refine`: the policy critiques its own answer against principles and revises it, up
to `rounds` times. A revision is kept only if the reward scores it higher than the current
answer (reward-gated); otherwise refinement stops."""

from __future__ import annotations

from pydantic import Field

from aligner.rewards import RewardError
from aligner.strategies.base import Candidate, StrategyContext, StrategyParams, StrategyResult, register
from aligner.strategies.chat_calls import chat_once, question_of
from aligner.strategies.common import RewardField, resolve_reward
from aligner.strategies.pipeline import OutputStrategy, gate_failed
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
    # A kept revision is a new answer from a separate call, without the original's logprobs.
    refuses = {"logprobs": "replaces answers with revisions that carry no logprobs"}

    def check(self, params: SelfRefineParams, ctx: StrategyContext) -> SelfRefineParams:
        return params.model_copy(update={"reward": resolve_reward(params, ctx)})

    async def refine(self, ctx: StrategyContext, params: SelfRefineParams, result: StrategyResult) -> StrategyResult:
        history: list[dict] = []
        try:
            for c, choice in enumerate(result.choices):
                entry = {"final_score": None, "rounds": []}
                history.append(entry)
                result.choices[c] = await self._refine_one(ctx, params, result, c, choice, entry)
        except RewardError as exc:
            # The answers keep every revision accepted so far; the report says how far it got.
            return gate_failed(self._report(result, params, history), params, exc, self.name)
        return self._report(result, params, history)

    def _report(self, result: StrategyResult, params: SelfRefineParams, history: list[dict]) -> StrategyResult:
        if not params.return_candidates:
            history = [{**entry, "rounds": None} for entry in history]
        result.info = {**result.info, self.name: history}
        return result

    async def _refine_one(self, ctx, params: SelfRefineParams, result: StrategyResult, c: int, choice: Candidate,
                          entry: dict) -> Candidate:
        """Critique and revise one answer; `entry` records each round as it happens."""
        question = question_of(ctx.messages)
        principles = "\n".join(f"- {p}" for p in (params.principles or DEFAULT_PRINCIPLES))
        current = (await ctx.rewards.score(params.reward, ctx.messages, [choice.text])).total[0]
        entry["final_score"] = current
        entry["rounds"].append({"round": 0, "answer": choice.text, "score": current, "accepted": True})
        for r in range(1, params.rounds + 1):
            if ctx.budget.spent():
                ctx.budget.skip(f"self_refine rounds {r}-{params.rounds} of choice {c}")
                break
            ask = [{"role": "user", "content": CRITIQUE_PROMPT.format(question=question, answer=choice.text, principles=principles)}]
            (critique,), critiqued = await chat_once(ctx, ask, stage=f"critique-{c}-{r}", max_tokens=params.max_critique_tokens, temperature=0.0)
            if ctx.budget.spent():  # the critique may be cut short: no revision from it
                result.stages.append(critiqued)
                ctx.budget.skip(f"self_refine rounds {r}-{params.rounds} of choice {c}")
                break
            ask = [{"role": "user", "content": REVISE_PROMPT.format(question=question, answer=choice.text, critique=critique)}]
            (revision,), revised = await chat_once(ctx, ask, stage=f"revise-{c}-{r}", max_tokens=ctx.sampling.max_tokens, temperature=ctx.sampling.temperature, answer=True)
            result.stages += [critiqued, revised]
            if ctx.budget.spent():  # the revision may have been cut short: keep the last accepted one
                ctx.budget.skip(f"self_refine round {r} of choice {c} (cut before it was scored)")
                break
            try:
                score = (await ctx.rewards.score(params.reward, ctx.messages, [revision])).total[0]
            except RewardError:
                result.choices[c] = choice  # keep what was accepted before the gate failed
                raise
            accepted = score > current
            entry["rounds"].append({"round": r, "critique": critique, "answer": revision, "score": score, "accepted": accepted})
            if not accepted:
                break
            choice = Candidate(choice.index, revision, [], "stop", score=score)
            current = entry["final_score"] = score
        return choice
