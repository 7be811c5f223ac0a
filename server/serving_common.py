"""Logic shared by the chat and text completion serving classes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from aligner.strategies import StrategyParamError, StrategyUnavailable
from decoding.engine import Engine, EngineDeadError, EngineError, InvalidRequestError, SamplingConfig
from server.admission import AdmissionController, Overloaded, Ticket
from server.config import ServerConfig
from server.metrics import ServerMetrics
from server.errors import engine_unavailable, invalid_request, make_error, overloaded
from server.protocol import ChatCompletionRequest, ErrorResponse, PromptTokensDetails, SamplingFields, UsageInfo, split_model


class ServingBase:
    def __init__(self, engine: Engine, config: ServerConfig, admission: AdmissionController, metrics: ServerMetrics):
        self.engine = engine
        self.config = config
        self.admission = admission
        self.metrics = metrics
        self._tokenizer_thread: ThreadPoolExecutor | None = None

    async def admit(self, weight: int, guide_slots: int = 0, max_wait_s: float | None = None,
                    tenant: str | None = None) -> Ticket | ErrorResponse:
        """A ticket, or a 429; `max_wait_s` (what is left of the request's deadline) shortens
        the queue wait; `tenant` is the line it waits in (the queue is shared fairly)."""
        try:
            return await self.admission.acquire(weight, guide_slots, max_wait_s, tenant)
        except Overloaded as exc:
            self.metrics.admission_rejections.labels("capacity").inc()
            return overloaded(exc.reason, exc.retry_after_s)

    async def tokenize(self, encode: Callable[..., T], *args) -> T:
        """Run `encode` off the event loop (a long prompt would stall every other request), on
        this serving object's one thread, so that long prompts queue there rather than piling
        threads onto the tokenizer."""
        if self._tokenizer_thread is None:
            self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, encode, *args)

    def stream_error(self, endpoint: str, exc: Exception) -> str:
        """An error met after a stream began (its status, 200, already sent): an event, counted."""
        error = engine_error(exc)
        self.metrics.errors.labels(error.error.type).inc()
        self.metrics.stream_errors.labels(endpoint, error.error.type).inc()
        return sse(error.model_dump_json())

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
        vocab = self.engine.tokenizer.vocab_size
        for param, ids in request.token_ids_in().items():
            if outside := sorted({t for t in ids if t >= vocab}):
                return invalid_request(f"token ids {outside[:5]} are outside this model's vocabulary (0..{vocab - 1})",
                                       param)
        return None

    async def checked_prompt(self, request: ChatCompletionRequest, encode: Callable[..., list[int]], *args,
                             param: str = "messages") -> tuple[list[int], SamplingConfig] | ErrorResponse:
        """The request checked (`check_common`), its prompt tokenized off the loop
        (`encode(*args)`), its `max_tokens` fitted into the context (`param` names the prompt
        in a context-length error) and its sampling settings; or the first error."""
        if error := self.check_common(request):
            return error
        prompt_ids = await self.tokenize(encode, *args)
        max_tokens = self.resolve_max_tokens(request, len(prompt_ids), param)
        if isinstance(max_tokens, ErrorResponse):
            return max_tokens
        return prompt_ids, request.to_sampling_config(max_tokens, request.logprobs_k())

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
    if isinstance(exc, StrategyParamError):  # found only once the request ran (after a prompt stage)
        return invalid_request(str(exc), f"alignment.{exc.param}")
    if isinstance(exc, StrategyUnavailable):
        return make_error(str(exc), 503, code="strategy_unavailable")
    # An engine's exception text is internal (paths, device state): it goes to the log, the
    # client gets the kind of failure.
    if isinstance(exc, EngineDeadError):
        logger.error("the engine died: %s", exc)
        return engine_unavailable("the engine stopped; the readiness probe says when it serves again")
    logger.error("the engine failed: %s", exc)
    return engine_unavailable("the engine failed on this request")


# Failures a request can meet after admission that map to an error envelope, not a 500.
ENGINE_ERRORS = (EngineError, InvalidRequestError, StrategyUnavailable, StrategyParamError)

T = TypeVar("T")
logger = logging.getLogger(__name__)


async def holding(ticket: Ticket, events: AsyncGenerator[T, None]) -> AsyncIterator[T]:
    """`events`, with the request's admission ticket held until they end, fail or are closed:
    the one place a request gives its admission back."""
    try:
        async for event in events:
            yield event
    finally:
        ticket.release()
        await events.aclose()


async def once(result: Awaitable[T]) -> AsyncIterator[T]:
    """A one-event stream of an awaited result (a strategy's `run`)."""
    yield await result


async def replay(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    async with contextlib.aclosing(rest):
        yield first
        async for event in rest:
            yield event


async def prime(events: AsyncIterator[T]) -> AsyncIterator[T] | ErrorResponse:
    """Wait for the first event, so that failures at the start (the engine refusing the
    request, a strategy unavailable) are still answered with a status code, not inside a
    200 stream. Returns the events with the first one replayed, or the error (the events
    closed, which gives the admission back)."""
    try:
        first = await anext(events)
    except StopAsyncIteration:
        return _empty()
    except ENGINE_ERRORS as exc:
        await events.aclose()
        return engine_error(exc)
    except BaseException:  # e.g. cancelled by a client disconnect
        await events.aclose()
        raise
    return replay(first, events)


async def _empty() -> AsyncIterator:
    return
    yield


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
