"""One-off policy calls that strategies make for themselves (rewrites, critiques, revisions)."""

from __future__ import annotations

from decoding.engine import SamplingConfig

from aligner.strategies.base import StageReport, StrategyContext, StrategyUnavailable, Timer


async def chat_once(
    ctx: StrategyContext,
    messages: list[dict[str, str]],
    *,
    stage: str,
    max_tokens: int,
    temperature: float = 0.7,
    n: int = 1,
) -> tuple[list[str], StageReport]:
    """Ask the policy `messages`, return n answers and the stage's usage."""
    prompt_ids = ctx.engine.tokenizer.encode_chat(messages)
    room = ctx.engine.max_model_len - len(prompt_ids)
    if room < 1:
        raise StrategyUnavailable(f"the {stage} prompt is longer than the model's context")
    sampling = SamplingConfig(
        max_tokens=min(max_tokens, room),
        n=n,
        temperature=temperature,
        top_p=ctx.sampling.top_p,
        seed=ctx.sampling.seed,
    )
    texts = [""] * n
    completion = cached = 0
    prompt_tokens = len(prompt_ids)
    with Timer() as timer:
        async for chunk in ctx.engine.generate(f"{ctx.request_id}-{stage}", prompt_ids, sampling):
            cached = max(cached, chunk.cached_tokens)
            for delta in chunk.sequences:
                texts[delta.index] += delta.text
                completion += len(delta.token_ids)
    return [t.strip() for t in texts], StageReport(stage, timer.seconds, prompt_tokens, completion, cached)


def last_user_message(messages: list[dict[str, str]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user":
            return i
    raise StrategyUnavailable("the conversation has no user message to work on")


def question_of(messages: list[dict[str, str]]) -> str:
    return messages[last_user_message(messages)]["content"]
