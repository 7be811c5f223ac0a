"""One-off model calls that strategies make for themselves (rewrites, critiques, revisions),
on the policy or on a helper model registered at start."""

from __future__ import annotations

from dataclasses import replace

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


def check_vocabulary(ctx: StrategyContext, name: str, param: str) -> None:
    """Token ids in the request (logit_bias, stop_token_ids) are the policy's: a helper model
    with its own vocabulary cannot honour them when it writes the answer."""
    if name != POLICY and (ctx.sampling.logit_bias or ctx.sampling.stop_token_ids):
        raise StrategyParamError(
            f"logit_bias and stop_token_ids name the policy's token ids; helper model {name!r} writes this answer "
            "with its own vocabulary. Use the policy or drop them", param)


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
    answer: bool = False,
) -> tuple[list[str], StageReport]:
    """Ask `model` (the policy or a helper) `messages`; its n answers and the stage's usage.

    `answer`: the call writes an answer to the request (a revision, a correction), so the
    request's own settings that shape an answer (structured output, stops, biases, penalties)
    apply to it too; otherwise (a critique, a rewrite) only its temperature, top_p and seed."""
    engine = model_engine(ctx, model)
    if not engine.ready:
        raise StrategyUnavailable(f"model {model!r} is not ready (loading, restarting or dead)")
    prompt_ids = engine.tokenizer.encode_chat(messages, ctx.tools if answer else None)
    room = engine.max_model_len - len(prompt_ids)
    if room < 1:
        raise StrategyUnavailable(f"the {stage} prompt is longer than the model's context")
    if answer:
        sampling = replace(ctx.sampling, max_tokens=min(max_tokens, room), n=n, temperature=temperature,
                           logprobs=None, extra_args=None)
    else:
        sampling = SamplingConfig(max_tokens=min(max_tokens, room), n=n, temperature=temperature,
                                  top_p=ctx.sampling.top_p, seed=ctx.sampling.seed)
    with Timer() as timer:
        generation = await collect(engine.generate(f"{ctx.request_id}-{stage}", prompt_ids, sampling), n,
                                   len(prompt_ids))
    # A grammar may own the surrounding whitespace; free text loses it.
    texts = [s.text if sampling.structured else s.text.strip() for s in generation.sequences]
    return texts, stage_report(stage, timer.seconds, generation, None if model == POLICY else model)


def last_user_message(messages: list[dict[str, str]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user":
            return i
    raise StrategyUnavailable("the conversation has no user message to work on")


def question_of(messages: list[dict[str, str]]) -> str:
    return messages[last_user_message(messages)]["content"]
