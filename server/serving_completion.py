"""POST /v1/completions: one or more raw prompts -> engine -> OpenAI text completion."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from aligner.budget import Budget, BudgetedEngine
from decoding.engine import Generation, GenerationChunk, TokenLogprob
from server.errors import invalid_request
from server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    random_id,
    split_model,
)
from server.serving_common import ENGINE_ERRORS, SSE_DONE, ServingBase, engine_error, holding, prime, sse, usage


def completion_logprobs(items: list[TokenLogprob], start_offset: int = 0) -> CompletionLogprobs:
    offsets, offset = [], start_offset
    for lp in items:
        offsets.append(offset)
        offset += len(lp.token)
    return CompletionLogprobs(
        text_offset=offsets,
        token_logprobs=[lp.logprob for lp in items],
        tokens=[lp.token for lp in items],
        top_logprobs=[{t.token: t.logprob for t in lp.top} for lp in items],
    )


async def merge(streams: list[AsyncIterator[GenerationChunk]]) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """Interleave several engine streams as their chunks arrive, tagged with their position."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream):
        try:
            async for chunk in stream:
                await queue.put((i, chunk))
            await queue.put((i, done))
        except BaseException as exc:  # forwarded to the consumer, which re-raises it
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ServingCompletion(ServingBase):
    async def create_completion(
        self, request: CompletionRequest, meter: Callable[[int], None] | None = None, tenant: str | None = None,
    ) -> ErrorResponse | CompletionResponse | AsyncIterator[str]:
        """`meter`: counts the tokens generated for the caller's key (its quota); `tenant`: the
        key's tenant, whose line it waits in for admission."""
        # The server's caps bound plain completions too: at one, a choice ends with "length".
        budget = Budget(self.config.max_request_seconds, self.config.max_request_tokens)
        if error := self.check_common(request):
            return error
        if split_model(request.model)[1] is not None:
            return invalid_request(
                "alignment strategies need chat messages: use /v1/chat/completions", "model"
            )
        prompts = request.prompts()
        if len(prompts) > self.config.max_prompts_per_request:
            return invalid_request(
                f"at most {self.config.max_prompts_per_request} prompts per request", "prompt"
            )
        prompt_ids = await self._prompt_ids(prompts)
        if isinstance(prompt_ids, ErrorResponse):
            return prompt_ids
        budgets = self._max_tokens(request, prompt_ids)
        if isinstance(budgets, ErrorResponse):
            return budgets
        ticket = await self.admit(request.n * len(prompt_ids), max_wait_s=budget.remaining_s(), tenant=tenant)
        if isinstance(ticket, ErrorResponse):
            return ticket
        request_id = random_id("cmpl")
        engine = BudgetedEngine(self.engine, budget) if budget.limited else self.engine
        events = holding(ticket, self._events(engine, request, request_id, prompt_ids, budgets))
        if request.stream:
            events = await prime(events)
            if isinstance(events, ErrorResponse):
                return events
            return self._stream(request, request_id, events, sum(map(len, prompt_ids)), meter)
        generations = [Generation.empty(request.n, len(ids)) for ids in prompt_ids]
        try:
            async for p, chunk in events:
                generations[p].add(chunk)
        except ENGINE_ERRORS as exc:
            return engine_error(exc)
        finally:
            if meter is not None:
                meter(sum(g.completion_tokens for g in generations))
        return self._response(request, request_id, prompts, prompt_ids, generations)

    async def _prompt_ids(self, prompts: list) -> list[list[int]] | ErrorResponse:
        """Each prompt's token ids (text tokenized, token lists checked against the vocabulary)."""
        tokenizer = self.engine.tokenizer
        vocab = tokenizer.vocab_size
        prompt_ids: list[list[int]] = []
        for prompt in prompts:
            ids = prompt if isinstance(prompt, list) else await self.tokenize(tokenizer.encode, prompt)
            if not ids:
                return invalid_request("prompt must not be empty", "prompt")
            if isinstance(prompt, list) and max(ids) >= vocab:
                return invalid_request(f"token ids must be below the vocabulary size {vocab}", "prompt")
            prompt_ids.append(ids)
        return prompt_ids

    def _max_tokens(self, request: CompletionRequest, prompt_ids: list[list[int]]) -> list[int] | ErrorResponse:
        """Each prompt's max_tokens within the context; OpenAI's default for completions is 16
        tokens, not the rest of the context."""
        budgets = []
        for ids in prompt_ids:
            max_tokens = self.resolve_max_tokens(request, len(ids), "prompt")
            if isinstance(max_tokens, ErrorResponse):
                return max_tokens
            budgets.append(max_tokens if request.max_tokens is not None else min(max_tokens, 16))
        return budgets

    def _events(self, engine, request, request_id: str, prompt_ids, budgets) -> AsyncIterator[tuple[int, GenerationChunk]]:
        """Every prompt's engine stream, interleaved and tagged with the prompt's position."""
        k = request.logprobs
        return merge([
            engine.generate(f"{request_id}-{i}", ids, request.to_sampling_config(budget, k))
            for i, (ids, budget) in enumerate(zip(prompt_ids, budgets))
        ])

    def _response(self, request, request_id, prompts, prompt_ids, generations) -> CompletionResponse:
        tokenizer = self.engine.tokenizer
        choices = []
        for p, (prompt, ids, generation) in enumerate(zip(prompts, prompt_ids, generations)):
            echo = (prompt if isinstance(prompt, str) else tokenizer.decode(ids)) if request.echo else ""
            for seq in generation.sequences:
                choices.append(CompletionChoice(
                    index=p * request.n + seq.index,
                    text=echo + seq.text,
                    logprobs=completion_logprobs(seq.logprobs, len(echo)) if request.logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                ))
        return CompletionResponse(
            id=request_id,
            model=request.model,
            choices=choices,
            usage=usage(sum(map(len, prompt_ids)), sum(g.completion_tokens for g in generations)),
        )

    async def _stream(
        self, request: CompletionRequest, request_id: str, events, prompt_tokens: int,
        meter: Callable[[int], None] | None = None,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        completion_tokens = 0
        offsets: dict[int, int] = {}

        def chunk(choices, usage_info=None) -> str:
            body = CompletionResponse(
                id=request_id, created=created, model=request.model, choices=choices, usage=usage_info
            )
            exclude = None if request.include_usage_in_stream else {"usage"}
            return sse(body.model_dump_json(exclude=exclude))

        try:
            async for p, out in events:
                choices = []
                for delta in out.sequences:
                    completion_tokens += len(delta.token_ids)
                    if not delta.text and delta.finish_reason is None:
                        continue
                    index = p * request.n + delta.index
                    logprobs = None
                    if request.logprobs is not None and delta.logprobs:
                        logprobs = completion_logprobs(delta.logprobs, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + len(delta.text)
                    choices.append(
                        CompletionChoice(
                            index=index, text=delta.text, logprobs=logprobs, finish_reason=delta.finish_reason
                        )
                    )
                if choices:
                    yield chunk(choices)
            if request.include_usage_in_stream:
                yield chunk([], usage(prompt_tokens, completion_tokens))
        except ENGINE_ERRORS as exc:
            yield self.stream_error("completions", exc)
        finally:
            await events.aclose()
            if meter is not None:  # what was generated, also for a client gone mid-stream
                meter(completion_tokens)
        yield SSE_DONE
