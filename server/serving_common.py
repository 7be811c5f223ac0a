"""Logic shared by the chat and text completion serving classes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aligner.strategies import StrategyUnavailable
from decoding.engine import (
    Engine,
    EngineDeadError,
    EngineError,
    GenerationChunk,
    InvalidRequestError,
    TokenLogprob,
)
from server.alignment import split_model
from server.admission import AdmissionController, Overloaded, Ticket
from server.config import ServerConfig
from server.metrics import ServerMetrics
from server.errors import engine_unavailable, invalid_request, make_error, overloaded
from server.protocol import ErrorResponse, PromptTokensDetails, SamplingFields, UsageInfo


@dataclass
class SequenceResult:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class GenerationResult:
    prompt_tokens: int
    sequences: list[SequenceResult]

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)


class ServingBase:
    def __init__(self, engine: Engine, config: ServerConfig, admission: AdmissionController, metrics: ServerMetrics):
        self.engine = engine
        self.config = config
        self.admission = admission
        self.metrics = metrics

    async def admit(self, weight: int) -> Ticket | ErrorResponse:
        try:
            return await self.admission.acquire(weight)
        except Overloaded as exc:
            self.metrics.admission_rejections.labels("capacity").inc()
            return overloaded(exc.reason, exc.retry_after_s)

    def check_common(self, request: SamplingFields) -> ErrorResponse | None:
        base, _ = split_model(request.model)
        if base != self.config.served_model_name:
            return invalid_request(
                f"model {request.model!r} is not served here; available: "
                f"{self.config.served_model_name!r} (or '<model>@<strategy>' on chat completions)",
                "model",
                "model_not_found",
            )
        if request.n > self.config.max_n:
            return invalid_request(f"n must be at most {self.config.max_n}", "n")
        if request.n > 1 and request.temperature == 0:
            return invalid_request(
                "n > 1 needs sampling: greedy decoding (temperature 0) gives n identical answers",
                "n",
            )
        if not self.engine.ready:
            return engine_unavailable(
                "the engine is dead and must be restarted" if self.engine.dead else "the engine is still loading"
            )
        return None

    def resolve_max_tokens(
        self, request: SamplingFields, prompt_tokens: int, param: str = "messages"
    ) -> int | ErrorResponse:
        limit = self.engine.max_model_len
        requested = request.requested_max_tokens()
        if prompt_tokens >= limit:
            return invalid_request(
                f"this model's maximum context length is {limit} tokens, but the prompt has "
                f"{prompt_tokens} tokens; shorten it",
                param,
                "context_length_exceeded",
            )
        if requested is None:
            return limit - prompt_tokens
        if prompt_tokens + requested > limit:
            return invalid_request(
                f"this model's maximum context length is {limit} tokens, but you requested "
                f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} "
                "for the completion); reduce the prompt or max_tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        return requested


def engine_error(exc: Exception) -> ErrorResponse:
    if isinstance(exc, InvalidRequestError):
        return invalid_request(str(exc), exc.param)
    if isinstance(exc, StrategyUnavailable):
        return make_error(str(exc), 503, code="strategy_unavailable")
    if isinstance(exc, EngineDeadError):
        return engine_unavailable(f"the engine died: {exc}")
    return engine_unavailable(f"the engine failed: {exc}")


# Failures a request can meet after admission that map to an error envelope, not a 500.
ENGINE_ERRORS = (EngineError, InvalidRequestError, StrategyUnavailable)


async def collect(stream: AsyncIterator[GenerationChunk], n: int) -> GenerationResult:
    """Drain an engine stream into one result per sample."""
    sequences = [SequenceResult(index=i) for i in range(n)]
    prompt_tokens = 0
    async for chunk in stream:
        prompt_tokens = chunk.prompt_tokens
        for delta in chunk.sequences:
            seq = sequences[delta.index]
            seq.text += delta.text
            seq.token_ids.extend(delta.token_ids)
            if delta.logprobs:
                seq.logprobs.extend(delta.logprobs)
            if delta.finish_reason is not None:
                seq.finish_reason = delta.finish_reason
    return GenerationResult(prompt_tokens=prompt_tokens, sequences=sequences)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=None if cached_tokens is None else PromptTokensDetails(cached_tokens=cached_tokens),
    )


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


SSE_DONE = sse("[DONE]")


async def prime(
    stream: AsyncIterator[GenerationChunk],
) -> tuple[AsyncIterator[GenerationChunk] | None, ErrorResponse | None]:
    """Wait for the first chunk so that admission errors still become HTTP errors.

    Returns an iterator that replays the first chunk, or the error to send instead.
    """
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        first = None
    except ENGINE_ERRORS as exc:
        return None, engine_error(exc)

    async def replay() -> AsyncIterator[GenerationChunk]:
        try:
            if first is not None:
                yield first
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()

    return replay(), None
