"""`urial`: in-context alignment (Lin et al., ICLR 2024) - a constant prefix of a system
prompt and worked examples teaches style and safety without changing the weights.

The prefix comes first and never varies, so vLLM's prefix cache serves it after the first
request (`usage.prompt_tokens_details.cached_tokens` shows the hit). A client's own system
message is merged into the template's (`with_prefix`), so requests that share one share the
cache too.
"""

from __future__ import annotations

from pydantic import Field

from aligner.strategies.base import StageReport, StrategyContext, StrategyParamError, StrategyParams, register
from aligner.strategies.pipeline import PromptOutcome, PromptStrategy
from aligner.strategies.templates import BUILTIN_TEMPLATES


class UrialParams(StrategyParams):
    template: str = Field(default="default", description="name of an in-context template (built-in or from profiles)")


@register
class UrialStrategy(PromptStrategy):
    name = "urial"
    description = "Prepend a constant system prompt and worked question-answer examples (URIAL-style)."
    Params = UrialParams

    def check(self, params: UrialParams, ctx: StrategyContext) -> UrialParams:
        if self._template(params, ctx) is None:
            known = ", ".join(sorted({**BUILTIN_TEMPLATES, **ctx.templates}))
            raise StrategyParamError(f"unknown template {params.template!r}; known: {known}", "template")
        return params

    @staticmethod
    def _template(params: UrialParams, ctx: StrategyContext):
        return ctx.templates.get(params.template) or BUILTIN_TEMPLATES.get(params.template)

    async def transform(self, ctx: StrategyContext, params: UrialParams) -> PromptOutcome:
        prefix = self._template(params, ctx).prefix()
        return PromptOutcome(with_prefix(prefix, ctx.messages), [StageReport("urial", 0.0)],
                             {"template": params.template, "prefix_messages": len(prefix)})


def with_prefix(prefix: list[dict[str, str]], messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The template's system message and examples, then the conversation.

    A client's own leading system messages join the template's system message (theirs first)
    instead of following the examples: a second system message between the examples and the
    request undid them. With "You are a helpful assistant." placed there, `harmless` declined
    0.04 of the held-out harmful requests in the opening; merged, 0.77, as without one.

    >>> with_prefix([{"role": "system", "content": "Decline harm."}, {"role": "user", "content": "q"},
    ...              {"role": "assistant", "content": "a"}],
    ...             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])[0]
    {'role': 'system', 'content': 'Be brief.\\n\\nDecline harm.'}
    """
    own = 0
    while own < len(messages) and messages[own]["role"] == "system":
        own += 1
    if not own:
        return prefix + list(messages)
    system = "\n\n".join([*(m["content"] for m in messages[:own]), prefix[0]["content"]])
    return [{"role": "system", "content": system}, *prefix[1:], *messages[own:]]
