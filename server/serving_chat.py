"""POST /v1/chat/completions: messages -> chat template -> strategy -> OpenAI response."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aligner.budget import Budget
from aligner.experiments import Assignment
from aligner.profiles import ProfileStore
from aligner.rewards import RewardRegistry
from aligner.strategies import KeepAlive, StrategyContext, StrategyLimits, StrategyResult
from decoding.engine import SequenceDelta, TokenLogprob
from server.alignment import ResolvedAlignment, alignment_report, resolve_alignment, reward_versions, split_model
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
    UsageInfo,
    random_id,
)
from server.errors import invalid_request
from server.serving_experiments import ServingExperiments
from server.serving_store import ServingStore
from server.traces import build_trace, profile_of, take_trace_option
from server.tools import AUTO_REFUSAL, ToolCallStream, tool_answer
from server.serving_common import ENGINE_ERRORS, SSE_DONE, ServingBase, engine_error, holding, once, prime, sse, usage

SSE_KEEPALIVE = ": keep-alive\n\n"
logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class TracePlan:
    """An answer to be traced: the API it came through, the profile (name, version) it used."""

    endpoint: str
    profile: tuple[str | None, str | None]


class ServingChat(ServingBase):
    def __init__(
        self, engine, config: ServerConfig, admission, metrics, rewards: RewardRegistry, profiles: ProfileStore,
        guides=None, helpers: dict | None = None, tool_parser=None, store: ServingStore | None = None,
        experiments: ServingExperiments | None = None,
    ):
        super().__init__(engine, config, admission, metrics)
        self.rewards = rewards
        self.profiles = profiles
        self.guides = guides
        self.helpers = helpers or {}
        self.tool_parser = tool_parser  # decoding.tool_parsing.ToolCallParser: enables tool_choice auto
        self.store = store  # traces of answers (`--store-traces`, `alignment.trace`); None: none kept
        # `alignment.experiment`: arms sticky by user, kept in the store when there is one.
        self.experiments = experiments or (ServingExperiments(store, metrics) if store is not None else None)

    async def create_chat_completion(
        self, request: ChatCompletionRequest, strategy_header: str | None = None, *,
        response_id: str | None = None, endpoint: str = "chat.completions",
    ) -> ErrorResponse | ChatCompletionResponse | AsyncIterator[str]:
        """`response_id`: the id the client gets (the Responses API's own); `endpoint` names
        the API in the answer's trace."""
        started, arrived = time.perf_counter(), time.monotonic()
        if error := self.check_common(request):
            return error
        if request.tool_kind == "auto" and self.tool_parser is None:
            return invalid_request(AUTO_REFUSAL, "tool_choice")
        # A reload swaps rewards and profiles; this request keeps the ones it started with.
        profiles = self.profiles
        planned = await self._trace_plan(request, endpoint, profiles)
        if isinstance(planned, ErrorResponse):
            return planned
        alignment, trace, assignment = planned
        messages = request.template_messages()
        tools = request.template_tools()
        prompt_ids = await self.tokenize(self.engine.tokenizer.encode_chat, messages, tools)
        max_tokens = self.resolve_max_tokens(request, len(prompt_ids), "messages")
        if isinstance(max_tokens, ErrorResponse):
            return max_tokens
        request_id = response_id or random_id("chatcmpl")
        ctx = StrategyContext(
            engine=self.engine,
            rewards=self.rewards.snapshot(),
            request_id=request_id,
            messages=messages,
            prompt_ids=prompt_ids,
            sampling=request.to_sampling_config(max_tokens, request.logprobs_k()),
            limits=StrategyLimits(max_candidates=self.config.max_candidates),
            keepalive_s=self.config.stream_keepalive_s,
            templates=profiles.templates,
            guides=self.guides,
            helpers=self.helpers,
            tools=tools,
        )
        _, alias = split_model(request.model)
        resolved = resolve_alignment(alignment, strategy_header, alias, self.config, ctx, profiles)
        if isinstance(resolved, ErrorResponse):
            return resolved
        resolved.reward_versions = reward_versions(resolved, ctx.rewards)
        resolved.experiment = assignment.public() if assignment is not None else None
        strategy, params = resolved.strategy, resolved.params
        budget = Budget.capped(resolved.limits, self.config.max_request_seconds, self.config.max_request_tokens,
                               started=arrived)
        ctx = ctx.with_budget(budget)
        sequences = strategy.sequences(params, ctx)
        ticket = await self.admit(sequences, strategy.guide_slots(params, ctx), max_wait_s=budget.remaining_s())
        if isinstance(ticket, ErrorResponse):
            return ticket
        self.metrics.candidates.labels(strategy.name).observe(sequences)
        if request.stream:
            events = await prime(holding(ticket, resolved.stream(ctx)))
            if isinstance(events, ErrorResponse):
                return events
            return self._stream(request, request_id, resolved, events, started, budget, trace)
        try:
            async for result in holding(ticket, once(resolved.run(ctx))):
                pass
        except ENGINE_ERRORS as exc:
            return engine_error(exc)
        self._record(strategy.name, result, started, budget)
        response = self._response(request, request_id, resolved, result)
        if trace is not None:
            # Queued only (never awaited): the answer does not wait on the store.
            response.alignment["traced"] = self._store_trace(
                trace, request, request_id, resolved, result, response.alignment,
                [c.model_dump(exclude={"logprobs"}) for c in response.choices], response.usage, started)
        return response

    async def _trace_plan(
        self, request: ChatCompletionRequest, endpoint: str, profiles: ProfileStore,
    ) -> tuple[dict | None, TracePlan | None, Assignment | None] | ErrorResponse:
        """(the alignment object without its `trace` switch and with an experiment's arm as its
        profile, how the answer will be traced or None, the experiment's assignment or None),
        or why the request is refused."""
        taken = take_trace_option(request.alignment)
        if isinstance(taken, ErrorResponse):
            return taken
        alignment, asked = taken
        assignment = None
        if self.experiments is not None:
            applied = await self.experiments.apply(alignment, request.user or None, profiles.experiments)
            if isinstance(applied, ErrorResponse):
                return applied
            alignment, assignment = applied
        if self.store is None:
            if asked:
                return invalid_request("this server does not store traces", "alignment.trace", "unsupported_value")
            return alignment, None, assignment
        wanted = self.store.trace_wanted(asked, request.user or None, experiment=assignment is not None)
        if isinstance(wanted, ErrorResponse):
            return wanted
        return alignment, TracePlan(endpoint, profile_of(alignment, profiles)) if wanted else None, assignment

    def _store_trace(self, plan: TracePlan, request: ChatCompletionRequest, request_id: str,
                     resolved: ResolvedAlignment, result: StrategyResult, report: dict, choices: list[dict],
                     usage_info: UsageInfo, started: float) -> bool:
        try:
            trace = build_trace(
                response_id=request_id, endpoint=plan.endpoint, request=request,
                messages=request.template_messages(), tools=request.template_tools(), resolved=resolved,
                result=result, report=report, choices=choices, usage=usage_info.model_dump(), started=started,
                profile=plan.profile,
            )
        except Exception:  # noqa: BLE001 - a trace that cannot be built must not cost the answer
            logger.exception("could not build the trace of %s", request_id)
            self.metrics.store_errors.labels("write_failed").inc()
            return False
        return self.store.record(trace)

    def _response(self, request, request_id: str, resolved: ResolvedAlignment, result: StrategyResult) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=request_id,
            model=request.model,
            choices=[
                ChatCompletionChoice(
                    index=i,
                    message=ChatResponseMessage(content=answer.content, tool_calls=answer.tool_calls),
                    logprobs=chat_logprobs(choice.logprobs) if request.logprobs else None,
                    finish_reason=answer.finish_reason,
                )
                for i, choice in enumerate(result.choices)
                for answer in [tool_answer(request, choice.text, choice.finish_reason, self.tool_parser)]
            ],
            usage=usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens),
            alignment=alignment_report(resolved, result),
        )

    def _record(self, strategy: str, result: StrategyResult, started: float, budget: Budget) -> None:
        if budget.limited:
            result.info["budget"] = budget.public()
            if budget.ran_out:
                self.metrics.budget_exhausted.labels(strategy, budget.ran_out).inc()
        self.metrics.e2e.labels(strategy).observe(time.perf_counter() - started)
        self.metrics.generated_tokens.labels(strategy).inc(result.completion_tokens)
        if "fallback" in result.info and not result.info["fallback"].get("cut"):  # a deadline is no fault
            self.metrics.fallbacks.labels(strategy).inc()

    async def _stream(
        self, request: ChatCompletionRequest, request_id: str, resolved: ResolvedAlignment, events: AsyncIterator,
        started: float, budget: Budget, trace: TracePlan | None = None,
    ) -> AsyncIterator[str]:
        chunk = ChunkWriter(request, request_id)
        calls = ToolCallStream(request, self.tool_parser)
        first_token_seen = False
        # Finish reasons are held back until the strategy's result arrives, so that the
        # `alignment` report rides on the last finish chunk (clients index choices[0]).
        finish: dict[int, str | None] = {}
        try:
            for i in range(request.n):
                yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            async for event in events:
                if isinstance(event, KeepAlive):
                    yield SSE_KEEPALIVE
                elif isinstance(event, SequenceDelta):
                    if event.finish_reason is not None:
                        finish[event.index] = event.finish_reason
                    if event.text or event.logprobs:
                        if not first_token_seen:
                            first_token_seen = True
                            self.metrics.ttft.labels(resolved.strategy.name).observe(time.perf_counter() - started)
                        logprobs = chat_logprobs(event.logprobs) if request.logprobs else None
                        if (delta := calls.delta(event.index, event.text)) is not None or logprobs:
                            yield chunk([ChatCompletionStreamChoice(
                                index=event.index, delta=delta or DeltaMessage(), logprobs=logprobs)])
                elif isinstance(event, StrategyResult):
                    self._record(resolved.strategy.name, event, started, budget)
                    report = alignment_report(resolved, event)
                    if trace is not None:  # queued before the last chunks go: the report says so
                        choices = [ChatCompletionChoice(
                            index=i, message=ChatResponseMessage(content=answer.content, tool_calls=answer.tool_calls),
                            finish_reason=answer.finish_reason).model_dump(exclude={"logprobs"})
                            for i, choice in enumerate(event.choices)
                            for answer in [tool_answer(request, choice.text, finish.get(i) or choice.finish_reason,
                                                       self.tool_parser)]]
                        report["traced"] = self._store_trace(
                            trace, request, request_id, resolved, event, report, choices,
                            usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens), started)
                    for line in chunk.final(event, finish, report, calls):
                        yield line
                    break
        except ENGINE_ERRORS as exc:
            yield self.stream_error("chat_completions", exc)
        finally:
            await events.aclose()
        yield SSE_DONE


class ChunkWriter:
    """One request's `chat.completion.chunk` lines."""

    def __init__(self, request: ChatCompletionRequest, request_id: str):
        self.request, self.request_id, self.created = request, request_id, int(time.time())

    def __call__(self, choices, usage_info=None, alignment=None) -> str:
        body = ChatCompletionChunk(id=self.request_id, created=self.created, model=self.request.model,
                                   choices=choices, usage=usage_info, alignment=alignment)
        exclude = {"usage"} if not self.request.include_usage_in_stream else set()
        if alignment is None:
            exclude.add("alignment")
        return sse(body.model_dump_json(exclude=exclude or None))

    def final(self, result: StrategyResult, finish: dict[int, str | None], report: dict,
              calls: ToolCallStream) -> list[str]:
        """The finish chunk of every choice (with what its tool calls still had to send), the
        report on the last one (or on the usage chunk)."""
        n, include_usage = self.request.n, self.request.include_usage_in_stream
        lines = []
        for i in range(n):
            reason = finish.get(i) or (result.choices[i].finish_reason if i < len(result.choices) else None)
            delta, reason = calls.finish(i, reason)
            lines.append(self(
                [ChatCompletionStreamChoice(index=i, delta=delta or DeltaMessage(), finish_reason=reason)],
                alignment=report if i == n - 1 and not include_usage else None,
            ))
        if include_usage:
            lines.append(self([], usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens),
                              alignment=report))
        return lines
