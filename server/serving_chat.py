"""POST /v1/chat/completions: messages -> chat template -> strategy -> OpenAI response."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from aligner.profiles import ProfileStore
from aligner.rewards import RewardRegistry
from aligner.strategies import KeepAlive, StrategyContext, StrategyLimits, StrategyResult
from decoding.engine import SequenceDelta, TokenLogprob
from server.alignment import ResolvedAlignment, alignment_report, resolve_alignment, split_model
from server.config import ServerConfig
from server.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    DeltaMessage,
    ErrorResponse,
    random_id,
)
from server.serving_common import ENGINE_ERRORS, SSE_DONE, ServingBase, engine_error, sse, usage

SSE_KEEPALIVE = ": keep-alive\n\n"


def chat_logprobs(items: list[TokenLogprob] | None) -> ChatChoiceLogprobs | None:
    if items is None:
        return None
    return ChatChoiceLogprobs(
        content=[
            ChatTokenLogprob(
                token=lp.token,
                logprob=lp.logprob,
                bytes=list(lp.token.encode()),
                top_logprobs=[
                    ChatTopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode()))
                    for t in lp.top
                ],
            )
            for lp in items
        ]
    )


class ServingChat(ServingBase):
    def __init__(
        self, engine, config: ServerConfig, admission, metrics, rewards: RewardRegistry, profiles: ProfileStore,
        guides=None, helpers: dict | None = None,
    ):
        super().__init__(engine, config, admission, metrics)
        self.rewards = rewards
        self.profiles = profiles
        self.guides = guides
        self.helpers = helpers or {}

    async def create_chat_completion(
        self, request: ChatCompletionRequest, strategy_header: str | None = None
    ) -> ErrorResponse | ChatCompletionResponse | AsyncIterator[str]:
        started = time.perf_counter()
        if error := self.check_common(request):
            return error
        messages = request.template_messages()
        prompt_ids = self.engine.tokenizer.encode_chat(messages)
        max_tokens = self.resolve_max_tokens(request, len(prompt_ids), "messages")
        if isinstance(max_tokens, ErrorResponse):
            return max_tokens
        request_id = random_id("chatcmpl")
        ctx = StrategyContext(
            engine=self.engine,
            rewards=self.rewards,
            request_id=request_id,
            messages=messages,
            prompt_ids=prompt_ids,
            sampling=request.to_sampling_config(max_tokens, request.logprobs_k()),
            limits=StrategyLimits(max_candidates=self.config.max_candidates),
            keepalive_s=self.config.stream_keepalive_s,
            templates=self.profiles.templates,
            guides=self.guides,
            helpers=self.helpers,
        )
        _, alias = split_model(request.model)
        resolved = resolve_alignment(request.alignment, strategy_header, alias, self.config, ctx, self.profiles)
        if isinstance(resolved, ErrorResponse):
            return resolved
        sequences = resolved.strategy.sequences(resolved.params, ctx)
        ticket = await self.admit(sequences)
        if isinstance(ticket, ErrorResponse):
            return ticket
        name = resolved.strategy.name
        self.metrics.candidates.labels(name).observe(sequences)
        if request.stream:
            events = resolved.strategy.stream(ctx, resolved.params)
            try:
                first = await self._first_event(events)
            except BaseException:  # e.g. cancelled by a client disconnect
                ticket.release()
                raise
            if isinstance(first, ErrorResponse):
                ticket.release()
                return first
            return self._stream(request, request_id, resolved, first, events, ticket, started)
        try:
            result = await resolved.strategy.run(ctx, resolved.params)
        except ENGINE_ERRORS as exc:
            return engine_error(exc)
        finally:
            ticket.release()
        self._record(name, result, started)
        return ChatCompletionResponse(
            id=request_id,
            model=request.model,
            choices=[
                ChatCompletionChoice(
                    index=i,
                    message=ChatResponseMessage(content=choice.text),
                    logprobs=chat_logprobs(choice.logprobs) if request.logprobs else None,
                    finish_reason=choice.finish_reason,
                )
                for i, choice in enumerate(result.choices)
            ],
            usage=usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens),
            alignment=alignment_report(resolved, result),
        )

    def _record(self, strategy: str, result: StrategyResult, started: float) -> None:
        self.metrics.e2e.labels(strategy).observe(time.perf_counter() - started)
        self.metrics.generated_tokens.labels(strategy).inc(result.completion_tokens)
        if "fallback" in result.info:
            self.metrics.fallbacks.labels(strategy).inc()

    @staticmethod
    async def _first_event(events):
        """Admission errors surface before the first event: answer them with a status code."""
        try:
            return await anext(events)
        except ENGINE_ERRORS as exc:
            await events.aclose()
            return engine_error(exc)

    async def _stream(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        resolved: ResolvedAlignment,
        first,
        events: AsyncIterator,
        ticket,
        started: float,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        first_token_seen = False
        include_usage = request.include_usage_in_stream

        def chunk(choices, usage_info=None, alignment=None) -> str:
            body = ChatCompletionChunk(
                id=request_id,
                created=created,
                model=request.model,
                choices=choices,
                usage=usage_info,
                alignment=alignment,
            )
            exclude = {"usage"} if not include_usage else set()
            if alignment is None:
                exclude.add("alignment")
            return sse(body.model_dump_json(exclude=exclude or None))

        # Finish reasons are held back until the strategy's result arrives, so that the
        # `alignment` report rides on the last finish chunk (clients index choices[0]).
        finish: dict[int, str | None] = {}
        try:
            for i in range(request.n):
                yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            event = first
            while True:
                if isinstance(event, KeepAlive):
                    yield SSE_KEEPALIVE
                elif isinstance(event, SequenceDelta):
                    if event.finish_reason is not None:
                        finish[event.index] = event.finish_reason
                    if event.text or event.logprobs:
                        if not first_token_seen:
                            first_token_seen = True
                            self.metrics.ttft.labels(resolved.strategy.name).observe(time.perf_counter() - started)
                        yield chunk([
                            ChatCompletionStreamChoice(
                                index=event.index,
                                delta=DeltaMessage(content=event.text),
                                logprobs=chat_logprobs(event.logprobs) if request.logprobs else None,
                            )
                        ])
                elif isinstance(event, StrategyResult):
                    self._record(resolved.strategy.name, event, started)
                    report = alignment_report(resolved, event)
                    for i in range(request.n):
                        reason = finish.get(i) or (event.choices[i].finish_reason if i < len(event.choices) else None)
                        last = i == request.n - 1
                        yield chunk(
                            [ChatCompletionStreamChoice(index=i, delta=DeltaMessage(), finish_reason=reason)],
                            alignment=report if last and not include_usage else None,
                        )
                    if include_usage:
                        yield chunk([], usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens), alignment=report)
                    break
                event = await anext(events)
        except ENGINE_ERRORS as exc:
            yield sse(engine_error(exc).model_dump_json())
        except StopAsyncIteration:
            pass
        finally:
            ticket.release()
            await events.aclose()
        yield SSE_DONE
