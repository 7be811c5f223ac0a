"""`guided`: token-level reward-guided decoding inside the engine (GenARM or ARGS).

The engine's logits processor (`decoding.guided_processor`) does the work, batched with every
other request; this strategy validates the request, holds one guide slot per sequence for
the request's lifetime, and streams tokens like plain decoding.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Literal

from pydantic import Field

from aligner.strategies.base import (
    Strategy,
    StrategyContext,
    StrategyParamError,
    StrategyParams,
    StrategyResult,
    StrategyUnavailable,
    StreamEvent,
    register,
)
from aligner.strategies.none import NoneStrategy
from decoding.guide_spec import EXTRA_ARGS_KEY, MAX_ALPHA, MAX_K, MAX_WEIGHT


@dataclass
class GuideRegistry:
    """Guides the engine was built with, and a server-wide count of the slots in use."""

    modes: dict[str, str] = field(default_factory=dict)  # name -> "genarm" | "args"
    max_slots: int = 16
    max_len: int = 2048
    in_use: int = 0

    @property
    def default(self) -> str | None:
        return next(iter(self.modes), None)


class GuidedParams(StrategyParams):
    guide: str | None = Field(default=None, description="a guide registered with --guide (default: the first)")
    mode: Literal["genarm", "args"] | None = Field(default=None, description="default: the guide's own mode")
    alpha: float = Field(default=1.0, ge=0.0, le=MAX_ALPHA, description="genarm: weight of the guide's log-probs")
    k: int = Field(default=10, ge=1, le=MAX_K, description="args: candidate tokens scored per step")
    weight: float = Field(default=1.0, ge=0.0, le=MAX_WEIGHT, description="args: weight of the reward")


@register
class GuidedStrategy(Strategy):
    name = "guided"
    description = (
        "Token-level guidance inside the engine: genarm adds alpha x the log-probs of an "
        "autoregressive reward model; args rescores the top-k tokens with a reward model."
    )
    Params = GuidedParams

    def check(self, params: GuidedParams, ctx: StrategyContext) -> GuidedParams:
        guides = ctx.guides
        if guides is None or not guides.modes:
            raise StrategyParamError("no guide is registered on this server (start it with --guide NAME=PATH)", "guide")
        name = params.guide or guides.default
        if name not in guides.modes:
            raise StrategyParamError(f"unknown guide {name!r}; registered: {', '.join(guides.modes)}", "guide")
        mode = params.mode or guides.modes[name]
        if mode != guides.modes[name]:
            raise StrategyParamError(f"guide {name!r} supports mode {guides.modes[name]!r}", "mode")
        needed = len(ctx.prompt_ids) + ctx.sampling.max_tokens
        if needed > guides.max_len:
            raise StrategyParamError(
                f"prompt + max_tokens ({needed}) exceeds the guide's {guides.max_len}-token limit", "guide"
            )
        return params.model_copy(update={"guide": name, "mode": mode})

    def _guided_ctx(self, ctx: StrategyContext, params: GuidedParams) -> StrategyContext:
        spec = {"guide": params.guide, "mode": params.mode, "alpha": params.alpha, "k": params.k, "weight": params.weight}
        extra = {**(ctx.sampling.extra_args or {}), EXTRA_ARGS_KEY: spec}
        return replace(ctx, sampling=replace(ctx.sampling, extra_args=extra))

    async def run(self, ctx: StrategyContext, params: GuidedParams) -> StrategyResult:
        result = None
        async for event in self.stream(ctx, params):
            if isinstance(event, StrategyResult):
                result = event
        return result

    async def stream(self, ctx: StrategyContext, params: GuidedParams) -> AsyncIterator[StreamEvent]:
        guides = ctx.guides
        if guides.in_use + ctx.n > guides.max_slots:
            raise StrategyUnavailable(
                f"all {guides.max_slots} guide slots are busy ({guides.in_use} in use); retry shortly"
            )
        guides.in_use += ctx.n
        try:
            async for event in NoneStrategy().stream(self._guided_ctx(ctx, params), StrategyParams()):
                if isinstance(event, StrategyResult):
                    event.info = {"guide": params.guide, "mode": params.mode}
                yield event
        finally:
            guides.in_use -= ctx.n
