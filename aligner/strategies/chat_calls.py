"""One-off model calls that strategies make for themselves (rewrites, critiques, revisions),
on the policy or on a helper model registered at start."""

from __future__ import annotations

from pydantic import Field

from decoding.engine import Engine, SamplingConfig, collect

from aligner.strategies.base import StageReport, StrategyContext, StrategyParamError, StrategyUnavailable, Timer
from aligner.strategies.common import stage_report

POLICY = "policy"
# A strategy parameter naming the model that makes a call (`rewriter`, `corrector`).
ModelField = Field(default=POLICY, description="'policy' or a helper model registered at start (--helper-model)")


def model_names(ctx: StrategyContext) -> list[str]:
    return [POLICY, *sorted(ctx.helpers)]


def check_model(ctx: StrategyContext, name: str, param: str) -> None:
    """A 400 naming `param` unless `name` is the policy or a registered helper model."""
    if name != POLICY and name not in ctx.helpers:
        raise StrategyParamError(f"unknown model {name!r}; this server has: {', '.join(model_names(ctx))}", param)


def model_engine(ctx: StrategyContext, name: str) -> Engine:
    return ctx.engine if name == POLICY else ctx.helpers[name]


async def chat_once(
    ctx: StrategyContext,
    messages: list[dict[str, str]],
    *,
    stage: str,
    max_tokens: int,
    temperature: float = 0.7,
    n: int = 1,
    model: str = POLICY,
) -> tuple[list[str], StageReport]:
    """Ask `model` (the policy or a helper) `messages`; its n answers and the stage's usage."""
    engine = model_engine(ctx, model)
    if not engine.ready:
        raise StrategyUnavailable(f"model {model!r} is not ready (loading, restarting or dead)")
    prompt_ids = engine.tokenizer.encode_chat(messages)
    room = engine.max_model_len - len(prompt_ids)
    if room < 1:
        raise StrategyUnavailable(f"the {stage} prompt is longer than the model's context")
    sampling = SamplingConfig(
        max_tokens=min(max_tokens, room),
        n=n,
        temperature=temperature,
        top_p=ctx.sampling.top_p,
        seed=ctx.sampling.seed,
    )
    with Timer() as timer:
        generation = await collect(engine.generate(f"{ctx.request_id}-{stage}", prompt_ids, sampling), n,
                                   len(prompt_ids))
    return [s.text.strip() for s in generation.sequences], stage_report(stage, timer.seconds, generation)


def last_user_message(messages: list[dict[str, str]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user":
            return i
    raise StrategyUnavailable("the conversation has no user message to work on")


def question_of(messages: list[dict[str, str]]) -> str:
    return messages[last_user_message(messages)]["content"]
