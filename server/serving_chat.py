"""POST /v1/chat/completions: messages -> chat template -> strategy -> OpenAI response."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from aligner.alignment import AlignmentError
from aligner.compute import compute_report
from aligner.plan import RequestPlan
from aligner.profiles import ProfileStore
from aligner.rewards import RewardRegistry
from aligner.spec import AlignmentSpec
from aligner.strategies import KeepAlive, StrategyContext, StrategyLimits, StrategyResult
from decoding.engine import SequenceDelta, TokenLogprob
from server.alignment import alignment_error, alignment_report, origin_of, planner_for
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
from server.serving_experiments import ServingExperiments
from server.serving_store import ServingStore
from server.traces import build_trace
from server.tools import ChatInputs, ToolCallStream, auto_path, chat_inputs, tool_answer
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
        response_id: str | None = None, endpoint: str = "chat.completions", tenant: str | None = None,
        meter: Callable[[int], None] | None = None,
    ) -> ErrorResponse | ChatCompletionResponse | AsyncIterator[str]:
        """Check, plan, admit, run (or stream), render. `response_id`: the id the client gets
        (the Responses API's own); `endpoint` names the API in the answer's trace; `tenant`:
        the tenant of the caller's key, who owns the trace; `meter`: counts the tokens generated
        for that key (its quota)."""
        started, arrived = time.perf_counter(), time.monotonic()
        inputs = chat_inputs(request, self.tool_parser)
        if isinstance(inputs, ErrorResponse):
            return inputs
        profiles = self.profiles  # a reload swaps profiles and rewards: this request keeps the ones it started with
        ctx = await self._context(request, inputs, response_id or random_id("chatcmpl"), profiles)
        if isinstance(ctx, ErrorResponse):
            return ctx
        origin = origin_of(endpoint, user=request.user, header=strategy_header, model=request.model, arrived=arrived,
                           tenant=tenant, meter=meter)
        planner = planner_for(self.config, profiles, self.experiments, self.store)
        try:
            plan = await planner.plan(AlignmentSpec.parse(request.alignment), ctx, origin)
        except AlignmentError as exc:
            return alignment_error(exc)
        ticket = await self.admit(plan.sequences, plan.guide_slots, max_wait_s=plan.budget.remaining_s(),
                                  tenant=plan.tenant)
        if isinstance(ticket, ErrorResponse):
            return ticket
        self.metrics.candidates.labels(plan.strategy_name).observe(plan.sequences)
        if request.stream:
            events = await prime(holding(ticket, plan.stream()))
            return events if isinstance(events, ErrorResponse) else self._stream(request, plan, events, started)
        try:
            async for result in holding(ticket, once(plan.run())):
                pass
        except ENGINE_ERRORS as exc:
            return engine_error(exc)
        return self._respond(request, plan, result, started)

    async def _context(self, request: ChatCompletionRequest, inputs: ChatInputs, request_id: str,
                       profiles: ProfileStore) -> StrategyContext | ErrorResponse:
        """The request as strategies see it: checked, its templated prompt, sampling and this
        server's engines, rewards, templates and limits."""
        checked = await self.checked_prompt(request, self.engine.tokenizer.encode_chat, inputs.messages, inputs.tools)
        if isinstance(checked, ErrorResponse):
            return checked
        prompt_ids, sampling = checked
        return StrategyContext(
            engine=self.engine, rewards=self.rewards.snapshot(), request_id=request_id, messages=inputs.messages,
            prompt_ids=prompt_ids, sampling=replace(sampling, structured=inputs.grammar) if inputs.grammar else sampling,
            limits=StrategyLimits(max_candidates=self.config.max_candidates), keepalive_s=self.config.stream_keepalive_s,
            templates=profiles.templates, guides=self.guides, helpers=self.helpers, tools=inputs.tools,
            well_formed=inputs.well_formed,
        )

    def _store_trace(self, request: ChatCompletionRequest, request_plan: RequestPlan, result: StrategyResult,
                     report: dict, choices: list[ChatCompletionChoice], usage_info: UsageInfo, started: float) -> bool:
        """Queue the answer's trace (never awaited: the answer does not wait on the store)."""
        request_id, kept = request_plan.ctx.request_id, request_plan.trace
        try:
            trace = build_trace(
                response_id=request_id, endpoint=kept.endpoint, request=request,
                messages=request.template_messages(), tools=request.template_tools(), resolved=request_plan.resolved,
                result=result, report=report, choices=[c.model_dump(exclude={"logprobs"}) for c in choices],
                usage=usage_info.model_dump(), started=started, profile=kept.profile, tenant=kept.tenant,
            )
        except Exception:  # noqa: BLE001 - a trace that cannot be built must not cost the answer
            logger.exception("could not build the trace of %s", request_id)
            self.metrics.store_errors.labels("write_failed").inc()
            return False
        return self.store.record(trace)

    def _choices(self, request: ChatCompletionRequest, result: StrategyResult,
                 finish: dict[int, str | None] | None = None, logprobs: bool = True) -> list[ChatCompletionChoice]:
        """The answer's choices, tool calls parsed (the one place they are built); `finish`:
        the finish reasons a stream already sent, which win over the result's; `logprobs`:
        False for what only a trace keeps (it keeps none)."""
        return [
            ChatCompletionChoice(
                index=i,
                message=ChatResponseMessage(content=answer.content, tool_calls=answer.tool_calls),
                logprobs=chat_logprobs(choice.logprobs) if request.logprobs and logprobs else None,
                finish_reason=answer.finish_reason,
            )
            for i, choice in enumerate(result.choices)
            for answer in [tool_answer(request, choice.text, (finish or {}).get(i) or choice.finish_reason,
                                       self.tool_parser)]
        ]

    def _respond(self, request: ChatCompletionRequest, plan: RequestPlan, result: StrategyResult,
                 started: float) -> ChatCompletionResponse:
        self._record(plan, result, started)
        response = ChatCompletionResponse(
            id=plan.ctx.request_id,
            model=request.model,
            choices=self._choices(request, result),
            usage=usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens),
            alignment=self._report(request, plan, result),
        )
        if plan.trace is not None:
            response.alignment["traced"] = self._store_trace(request, plan, result, response.alignment,
                                                             response.choices, response.usage, started)
        return response

    def _report(self, request: ChatCompletionRequest, plan: RequestPlan, result: StrategyResult) -> dict:
        """The response's `alignment` object; under `auto`, how its tool calls were found."""
        report = alignment_report(plan.resolved, result)
        if (path := auto_path(request, self.tool_parser)) is not None:
            report["auto_tool_calls"] = path
        return report

    def _record(self, plan: RequestPlan, result: StrategyResult, started: float) -> None:
        strategy, budget = plan.strategy_name, plan.budget
        result.info["compute"] = compute_report(result, self.engine, self.helpers, plan.ctx.rewards)
        if budget.limited:
            result.info["budget"] = budget.public()
            if budget.ran_out:
                self.metrics.budget_exhausted.labels(strategy, budget.ran_out).inc()
        self.metrics.e2e.labels(strategy).observe(time.perf_counter() - started)
        self.metrics.generated_tokens.labels(strategy).inc(result.completion_tokens)
        if plan.meter is not None:
            plan.meter(result.completion_tokens)
        if "fallback" in result.info and not result.info["fallback"].get("cut"):  # a deadline is no fault
            self.metrics.fallbacks.labels(strategy).inc()

    async def _stream(
        self, request: ChatCompletionRequest, plan: RequestPlan, events: AsyncIterator, started: float,
    ) -> AsyncIterator[str]:
        chunk = ChunkWriter(request, plan.ctx.request_id)
        calls = ToolCallStream(request, self.tool_parser)
        first_token_seen = False
        # Finish reasons are held back until the strategy's result arrives, so that the
        # `alignment` report rides on the last finish chunk (clients index choices[0]).
        finish: dict[int, str | None] = {}
        streamed, recorded = 0, False  # tokens sent; whether the result (with every token) was counted
        try:
            for i in range(request.n):
                yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            async for event in events:
                if isinstance(event, KeepAlive):
                    yield SSE_KEEPALIVE
                elif isinstance(event, SequenceDelta):
                    streamed += len(event.token_ids or ())
                    if event.finish_reason is not None:
                        finish[event.index] = event.finish_reason
                    if event.text or event.logprobs:
                        if not first_token_seen:
                            first_token_seen = True
                            self.metrics.ttft.labels(plan.strategy_name).observe(time.perf_counter() - started)
                        logprobs = chat_logprobs(event.logprobs) if request.logprobs else None
                        if (delta := calls.delta(event.index, event.text, event.token_ids, event.finish_reason)) is not None or logprobs:
                            yield chunk([ChatCompletionStreamChoice(
                                index=event.index, delta=delta or DeltaMessage(), logprobs=logprobs)])
                elif isinstance(event, StrategyResult):
                    self._record(plan, event, started)
                    recorded = True
                    report = self._report(request, plan, event)
                    if plan.trace is not None:  # queued before the last chunks go: the report says so
                        report["traced"] = self._store_trace(
                            request, plan, event, report, self._choices(request, event, finish, logprobs=False),
                            usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens), started)
                    for line in chunk.final(event, finish, report, calls):
                        yield line
                    break
        except ENGINE_ERRORS as exc:
            yield self.stream_error("chat_completions", exc)
        finally:
            await events.aclose()
            if not recorded and plan.meter is not None:  # a client gone mid-stream: what it was sent
                plan.meter(streamed)
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
