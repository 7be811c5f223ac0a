"""POST /v1/chat/completions: messages -> chat template -> engine -> OpenAI response."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from decoding.engine import TokenLogprob
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
from server.serving_common import (
    ENGINE_ERRORS,
    SSE_DONE,
    ServingBase,
    collect,
    engine_error,
    prime,
    sse,
    usage,
)


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
    async def create_chat_completion(
        self, request: ChatCompletionRequest
    ) -> ErrorResponse | ChatCompletionResponse | AsyncIterator[str]:
        if error := self.check_common(request):
            return error
        prompt_ids = self.engine.tokenizer.encode_chat(request.template_messages())
        max_tokens = self.resolve_max_tokens(request, len(prompt_ids), "messages")
        if isinstance(max_tokens, ErrorResponse):
            return max_tokens
        sampling = request.to_sampling_config(max_tokens, request.logprobs_k())
        request_id = random_id("chatcmpl")
        stream = self.engine.generate(request_id, prompt_ids, sampling)
        if request.stream:
            stream, error = await prime(stream)
            return error or self._stream(request, request_id, stream)
        try:
            result = await collect(stream, request.n)
        except ENGINE_ERRORS as exc:
            return engine_error(exc)
        want_logprobs = request.logprobs
        return ChatCompletionResponse(
            id=request_id,
            model=request.model,
            choices=[
                ChatCompletionChoice(
                    index=seq.index,
                    message=ChatResponseMessage(content=seq.text),
                    logprobs=chat_logprobs(seq.logprobs) if want_logprobs else None,
                    finish_reason=seq.finish_reason,
                )
                for seq in result.sequences
            ],
            usage=usage(result.prompt_tokens or len(prompt_ids), result.completion_tokens),
        )

    async def _stream(
        self, request: ChatCompletionRequest, request_id: str, stream
    ) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage = request.include_usage_in_stream

        def chunk(choices, usage_info=None) -> str:
            body = ChatCompletionChunk(
                id=request_id, created=created, model=request.model, choices=choices, usage=usage_info
            )
            exclude = None if include_usage else {"usage"}
            return sse(body.model_dump_json(exclude=exclude))

        prompt_tokens = 0
        completion_tokens = 0
        try:
            for i in range(request.n):
                yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            async for out in stream:
                prompt_tokens = out.prompt_tokens
                choices = []
                for delta in out.sequences:
                    completion_tokens += len(delta.token_ids)
                    if not delta.text and delta.finish_reason is None and not delta.logprobs:
                        continue
                    choices.append(
                        ChatCompletionStreamChoice(
                            index=delta.index,
                            delta=DeltaMessage(content=delta.text),
                            logprobs=chat_logprobs(delta.logprobs) if request.logprobs else None,
                            finish_reason=delta.finish_reason,
                        )
                    )
                if choices:
                    yield chunk(choices)
            if include_usage:
                yield chunk([], usage(prompt_tokens, completion_tokens))
        except ENGINE_ERRORS as exc:
            yield sse(engine_error(exc).model_dump_json())
        yield SSE_DONE
