"""`guided`: token-level reward-guided decoding inside the engine (GenARM or ARGS).

The engine's logits processor (`decoding.guided_processor`) does the work, batched with every
other request; this strategy validates the request, asks admission for one guide slot per
sequence (`guide_slots`), checks the length against the guide's limit on the prompt it
actually decodes (after any prompt stage), streams tokens like plain decoding, and reports
how many steps the guide shaped (the engine returns what it could not guide with its last
chunk).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Literal

from pydantic import Field

from aligner.strategies.base import (
    Strategy,
    StrategyContext,
    StrategyParamError,
    StrategyParams,
    StrategyResult,
    StreamEvent,
    register,
)
from aligner.strategies.common import stream_plain
from decoding.engine import Generation
from decoding.guide_spec import EXTRA_ARGS_KEY, MAX_ALPHA, MAX_K, MAX_WEIGHT, REPORT_KEY


class GuidedParams(StrategyParams):
    guide: str | None = Field(default=None, description="a guide registered with --guide (default: the first)")
    mode: Literal["genarm", "args"] | None = Field(default=None, description="default: the guide's own mode")
    alpha: float = Field(default=1.0, ge=0.0, le=MAX_ALPHA, description="genarm: weight of the guide's log-probs")
    k: int = Field(default=10, ge=1, le=MAX_K, description="args: candidate tokens scored per step")
    weight: float = Field(default=1.0, ge=0.0, le=MAX_WEIGHT, description="args: weight of the reward")


def fit_guide(ctx: StrategyContext) -> StrategyContext:
    """The request with its answer budget cut to the guide's length limit; a prompt that
    leaves no room is a parameter error (a prompt stage may have lengthened it)."""
    limit = ctx.guides.max_len
    room = limit - len(ctx.prompt_ids)
    if room < 1:
        raise StrategyParamError(f"the prompt ({len(ctx.prompt_ids)} tokens) exceeds the guide's {limit}-token limit",
                                 "guide")
    if ctx.sampling.max_tokens <= room:
        return ctx
    return replace(ctx, sampling=replace(ctx.sampling, max_tokens=room))


def guided_steps(choices, reports: list[dict]) -> int:
    """Steps whose token the guide shaped, over all choices: every generated token, less the
    ones the engine reported unguided (a lagging step, or the rest of a row it stopped)."""
    steps = sum(len(c.token_ids) for c in choices)
    claimed: set[int] = set()
    for report in reports:
        steps -= report.get("lagged_steps", 0)
        if not report.get("stopped"):
            continue
        before = report.get("outputs_at_stop") or []
        # A row is one choice; match it by the tokens it had when guidance stopped.
        for i, choice in enumerate(choices):
            if i not in claimed and list(choice.token_ids[: len(before)]) == before:
                claimed.add(i)
                steps -= len(choice.token_ids) - len(before)
                break
    return max(steps, 0)


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
        if guides is None or not guides.specs:
            raise StrategyParamError("no guide is registered on this server (start it with --guide NAME=PATH)", "guide")
        name = params.guide or guides.default
        if name not in guides.specs:
            raise StrategyParamError(f"unknown guide {name!r}; registered: {', '.join(guides.specs)}", "guide")
        mode = params.mode or guides.modes[name]
        if mode != guides.modes[name]:
            raise StrategyParamError(f"guide {name!r} supports mode {guides.modes[name]!r}", "mode")
        if ctx.num_choices > guides.max_slots:
            raise StrategyParamError(f"n must be at most {guides.max_slots} (the server's guide slots)", "n")
        needed = len(ctx.prompt_ids) + ctx.sampling.max_tokens
        if needed > guides.max_len:
            raise StrategyParamError(
                f"prompt + max_tokens ({needed}) exceeds the guide's {guides.max_len}-token limit", "guide"
            )
        return params.model_copy(update={"guide": name, "mode": mode})

    def guide_slots(self, params: GuidedParams, ctx: StrategyContext) -> int:
        return ctx.num_choices

    async def run(self, ctx: StrategyContext, params: GuidedParams) -> StrategyResult:
        return await self.run_from_stream(ctx, params)

    async def stream(self, ctx: StrategyContext, params: GuidedParams) -> AsyncIterator[StreamEvent]:
        report = f"{ctx.request_id}-{uuid.uuid4().hex[:8]}"
        spec = {"guide": params.guide, "mode": params.mode, "alpha": params.alpha, "k": params.k,
                "weight": params.weight, REPORT_KEY: report}
        ctx = fit_guide(ctx)
        guided = replace(ctx, sampling=replace(ctx.sampling, extra_args={**(ctx.sampling.extra_args or {}),
                                                                          EXTRA_ARGS_KEY: spec}))
        def report(result: StrategyResult, generation: Generation) -> None:
            # The engine returns what it could not guide with the request's last chunk.
            reports = generation.guide_reports
            result.info = {"guide": params.guide, "mode": params.mode,
                           "guided_steps": guided_steps(result.choices, reports)}
            if reports:
                result.info["unguided_reasons"] = sorted({r["reason"] for r in reports})

        async with contextlib.aclosing(stream_plain(guided, report)) as events:
            async for event in events:
                yield event
