"""`urial`: in-context alignment (Lin et al., ICLR 2024) - a constant prefix of a system
prompt and worked examples teaches style and safety without changing the weights.

The prefix comes first and never varies, so vLLM's prefix cache serves it after the first
request (`usage.prompt_tokens_details.cached_tokens` shows the hit).
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
        messages = prefix + list(ctx.messages)
        return PromptOutcome(messages, [StageReport("urial", 0.0)], {"template": params.template, "prefix_messages": len(prefix)})
