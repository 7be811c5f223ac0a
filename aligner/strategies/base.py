"""The strategy interface, its registry, and the values strategies exchange with the server.

A strategy is one file: a `Strategy` subclass with a pydantic `Params` model, decorated with
`@register`. It sees the engine, the rewards and the request through `StrategyContext`; it
never sees HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from aligner.budget import Budget, BudgetedEngine, BudgetedRewards
from aligner.rewards import RewardRegistry
from decoding.engine import Engine, SamplingConfig, SequenceDelta, TokenLogprob

_REGISTRY: dict[str, type[Strategy]] = {}


class StrategyParams(BaseModel):
    """Parameters every strategy accepts; subclasses add their own, with bounds."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    return_candidates: bool = False
    fallback: bool = True  # on a reward failure: plain answer (true) or a 503 error (false)


class StrategyUnavailable(RuntimeError):
    """The strategy cannot complete (e.g. its reward failed and fallback is off): 503."""


class StrategyParamError(ValueError):
    """Parameters are out of range for this server; `param` is relative to `alignment`."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class StrategyLimits:
    """Server-side maxima for what a request can push."""

    max_candidates: int = 16


@dataclass
class StrategyContext:
    engine: Engine
    rewards: RewardRegistry
    request_id: str
    messages: list[dict[str, str]]  # chat-template messages (roles normalised)
    prompt_ids: list[int]
    sampling: SamplingConfig  # the request's own sampling; `sampling.n` = choices to return
    limits: StrategyLimits = field(default_factory=StrategyLimits)
    keepalive_s: float = 2.0
    # Named prompt templates (URIAL prefixes, meta-prompts) from the profiles file.
    templates: dict[str, Any] = field(default_factory=dict)
    # Token-level guides the engine was built with (`decoding.guide_spec.GuideCatalog`), if any.
    guides: Any = None
    # Helper models registered at start (`--helper-model`): name -> Engine, for rewriters
    # and correctors other than the policy.
    helpers: dict[str, Engine] = field(default_factory=dict)
    # The tools the answer may call (OpenAI's layout), rendered into every answer prompt.
    tools: list[dict[str, Any]] | None = None
    # The request's deadline and token cap; `with_budget` puts engines and rewards under it.
    budget: Budget = field(default_factory=Budget)
    # (text, finish_reason) -> whether an answer is well formed for the request (the server's
    # rule for tools: whole calls whose arguments follow their tools' schemas); the strategies
    # that choose among candidates choose among well-formed ones first (`well_formed_first`).
    well_formed: Callable[[str, str | None], bool] | None = None

    @property
    def num_choices(self) -> int:
        """Answers the request returns (its `n`), not candidates sampled (a strategy's `n`)."""
        return self.sampling.n

    def with_budget(self, budget: Budget) -> StrategyContext:
        """The same request with its engines and rewards stopping at `budget`'s limits."""
        if not budget.limited:
            return replace(self, budget=budget)

        def bare(x):
            return x.inner if isinstance(x, (BudgetedEngine, BudgetedRewards)) else x

        return replace(
            self, budget=budget, engine=BudgetedEngine(bare(self.engine), budget),
            rewards=BudgetedRewards(bare(self.rewards), budget),
            helpers={name: BudgetedEngine(bare(e), budget) for name, e in self.helpers.items()},
        )

    def with_messages(self, messages: list[dict[str, str]], suffix: str) -> StrategyContext:
        """The same request with a rewritten conversation (a prompt stage's output).

        The answer budget shrinks if the new prompt is longer, so that it still fits the context.
        """
        prompt_ids = self.engine.tokenizer.encode_chat(messages, self.tools)
        room = self.engine.max_model_len - len(prompt_ids)
        if room < 1:
            raise StrategyUnavailable(
                f"the prompt stage made the prompt {len(prompt_ids)} tokens long, beyond the context"
            )
        sampling = replace(self.sampling, max_tokens=min(self.sampling.max_tokens, room))
        return replace(
            self, messages=messages, prompt_ids=prompt_ids, sampling=sampling,
            request_id=f"{self.request_id}-{suffix}",
        )


@dataclass
class Candidate:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    score: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    cut: bool = False  # its generation was stopped by the request's budget (a partial answer)

    def public(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "text": self.text,
            "score": self.score,
            "scores": self.scores,
            "finish_reason": self.finish_reason,
            "completion_tokens": len(self.token_ids),
        }


@dataclass
class StageReport:
    stage: str
    seconds: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the engine's prefix cache served
    model: str | None = None  # the helper model that decoded it (None: the policy, or no model)

    def public(self) -> dict[str, Any]:
        public = {
            "stage": self.stage,
            "seconds": round(self.seconds, 4),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
        }
        return public if self.model is None else {**public, "model": self.model}


@dataclass
class StrategyResult:
    """What a strategy returns: the chosen answers plus everything `alignment` reports."""

    choices: list[Candidate]
    stages: list[StageReport]
    candidates: list[Candidate] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return sum(s.prompt_tokens for s in self.stages)

    @property
    def completion_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.stages)

    @property
    def cached_tokens(self) -> int:
        return sum(s.cached_tokens for s in self.stages)


@dataclass(frozen=True)
class KeepAlive:
    """Yielded by a stream while nothing can be sent yet (the server emits an SSE comment)."""


StreamEvent = SequenceDelta | KeepAlive | StrategyResult


class Strategy(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[StrategyParams]] = StrategyParams
    # Where it sits in a pipeline: "prompt" stages, then one "decode", then "output" stages.
    phase: ClassVar[str] = "decode"
    # Request sampling settings (`SamplingConfig` fields) this strategy cannot honour, with
    # why: a request using one is refused (400) rather than answered without it.
    refuses: ClassVar[dict[str, str]] = {}

    def check(self, params: StrategyParams, ctx: StrategyContext) -> StrategyParams:
        """Server-dependent validation (limits, reward names); may return resolved params."""
        return params

    def spec(self, params: StrategyParams) -> dict[str, Any]:
        """The alignment object that asks for this strategy with these parameters."""
        return {"strategy": self.name, **params.model_dump(by_alias=True)}

    def describe(self, params: StrategyParams) -> dict[str, Any]:
        """`alignment.params` in an answer: the parameters, and what the strategy holds inside."""
        return params.model_dump(by_alias=True)

    def sequences(self, params: StrategyParams, ctx: StrategyContext) -> int:
        """How many sequences the engine decodes at once for this request (admission weight)."""
        return ctx.num_choices

    def guide_slots(self, params: StrategyParams, ctx: StrategyContext) -> int:
        """Token-level guide slots the request holds while it runs (admission's second budget)."""
        return 0

    @abstractmethod
    async def run(self, ctx: StrategyContext, params: StrategyParams) -> StrategyResult: ...

    async def run_from_stream(self, ctx: StrategyContext, params: StrategyParams) -> StrategyResult:
        """`run` of a strategy whose stream is its primary path: the stream's final result."""
        result = None
        async with contextlib.aclosing(self.stream(ctx, params)) as events:
            async for event in events:
                if isinstance(event, StrategyResult):
                    result = event
        return result

    async def stream(self, ctx: StrategyContext, params: StrategyParams) -> AsyncIterator[StreamEvent]:
        """Default for strategies that decide at the end: keep-alives until `run` finishes,
        then each chosen answer as one delta, then the result."""
        task = asyncio.ensure_future(self.run(ctx, params))
        async with contextlib.aclosing(keepalive_until(task, ctx.keepalive_s)) as keepalives:
            async for keepalive in keepalives:
                yield keepalive
        result = task.result()
        for i, choice in enumerate(result.choices):
            yield SequenceDelta(i, choice.text, list(choice.token_ids), choice.logprobs, choice.finish_reason)
        yield result


async def keepalive_until(task: asyncio.Future, interval: float) -> AsyncIterator[KeepAlive]:
    """Yield a KeepAlive every `interval` seconds until `task` is done; if the consumer
    leaves first (a client disconnect), cancel the task so its engine requests abort."""
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=interval)
            if done:
                return
            yield KeepAlive()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


# Said by strategies that restart decoding from a partial answer.
RESTARTS = {
    "structured": "restarts decoding from the accepted part of the answer, where a structured output's grammar "
                  "cannot resume; use none, best_of_n, soft_best_of_n or guided",
    "logprobs": "assembles its answer from separate engine requests and does not return logprobs",
    "min_tokens": "decodes in pieces, so min_tokens would apply to each piece instead of the answer",
}


def sampling_conflicts(strategy: Strategy, sampling: SamplingConfig) -> list[tuple[str, str]]:
    """(request parameter, why) for each setting of `sampling` that `strategy` refuses."""
    defaults = SamplingConfig(max_tokens=1)
    conflicts = []
    for name, why in strategy.refuses.items():
        value = getattr(sampling, name)
        if value != getattr(defaults, name):
            param = value.param if name == "structured" else name
            conflicts.append((param, f"{param} is not supported by strategy {strategy.name!r}: it {why}"))
    return conflicts


def register(cls: type[Strategy]) -> type[Strategy]:
    if cls.name in _REGISTRY:
        raise ValueError(f"strategy {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_strategy(name: str) -> Strategy | None:
    cls = _REGISTRY.get(name)
    return cls() if cls else None


def strategy_names() -> list[str]:
    return sorted(_REGISTRY)


def describe_strategies() -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "phase": _REGISTRY[name].phase,
            "description": _REGISTRY[name].description,
            "parameters": _REGISTRY[name].Params.model_json_schema(by_alias=True),
        }
        for name in strategy_names()
    ]


class Timer:
    """`with Timer() as t: ...; t.seconds`."""

    def __enter__(self):
        self._start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start
        return False
