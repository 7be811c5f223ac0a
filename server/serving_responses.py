"""POST /v1/responses: OpenAI's Responses API on the chat serving path.

The request becomes a chat completion request (`ResponsesRequest.to_chat`), runs through
`ServingChat` unchanged (strategies, admission, tools, grammars), and its answer or its
stream of chunks is re-worded as a response or as Responses stream events. Nothing is
decided here that the chat path does not decide.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ValidationError

from server.errors import from_validation_errors, invalid_request
from server.protocol import ChatCompletionResponse, ErrorResponse
from server.protocol_responses import (
    OutputFunctionCall,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    ResponsesUsage,
)
from server.serving_chat import ServingChat

# Chat parameter names in errors, as the Responses request calls them.
_PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
           "response_format": "text.format"}


def _renamed(error: ErrorResponse) -> ErrorResponse:
    param = error.error.param
    if param:
        head, dot, rest = param.partition(".")
        head, bracket, index = head.partition("[")
        if head in _PARAMS:
            error.error.param = _PARAMS[head] + bracket + index + dot + rest
    return error


class ServingResponses:
    def __init__(self, chat: ServingChat):
        self.chat = chat

    async def create_response(
        self, request: ResponsesRequest, strategy_header: str | None = None, tenant: str | None = None,
        meter=None,
    ) -> ErrorResponse | ResponseObject | AsyncIterator[str]:
        if refused := request.refused():
            return invalid_request(f"{refused[0]}: {refused[1]}", refused[0])
        try:
            chat_request = request.to_chat()
        except ValidationError as exc:
            return _renamed(from_validation_errors(exc.errors()))
        response = ResponseObject.started(request)
        # The answer's trace is stored under the id this client gets.
        result = await self.chat.create_chat_completion(chat_request, strategy_header, response_id=response.id,
                                                        endpoint="responses", tenant=tenant, meter=meter)
        if isinstance(result, ErrorResponse):
            return _renamed(result)
        if isinstance(result, ChatCompletionResponse):
            return finished(response, result.model_dump())
        return self._events(response, result)

    async def _events(self, response: ResponseObject, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """Chat chunks (this server's own SSE lines) re-worded as Responses stream events."""
        stream = EventWriter(response)
        yield stream("response.created", response=stream.response)
        yield stream("response.in_progress", response=stream.response)
        text, calls, finish, ended = "", {}, None, {}
        try:
            async for line in chunks:
                if not line.startswith("data: ") or line.startswith("data: [DONE]"):
                    if line.startswith(":"):
                        yield line  # keep-alive comments pass through
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    yield stream("error", **chunk["error"])
                    return
                ended.update({k: chunk[k] for k in ("usage", "alignment") if chunk.get(k)})
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        if not text:
                            yield "".join(stream.open_message())
                        text += delta["content"]
                        yield stream("response.output_text.delta", item_id=stream.message_id, output_index=0,
                                     content_index=0, delta=delta["content"])
                    for call in delta.get("tool_calls") or ():
                        entry = calls.setdefault(call["index"], {"id": call.get("id"), "name": "", "arguments": ""})
                        entry["name"] += (call.get("function") or {}).get("name") or ""
                        entry["arguments"] += (call.get("function") or {}).get("arguments") or ""
                    finish = choice.get("finish_reason") or finish
        finally:
            await chunks.aclose()
        if "usage" not in ended:
            return  # the chat stream ended early (a client disconnect)
        message = {"content": text or None, "tool_calls": [
            {"id": c["id"], "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls.values()]}
        chat = {"choices": [{"message": message, "finish_reason": finish}], **ended}
        response = finished(stream.response, chat)
        for line in stream.close_items(response):
            yield line
        # As vLLM does: `response.completed` even when the response is incomplete (its status
        # says so), which is the event the SDK's stream helpers wait for.
        yield stream("response.completed", response=response)


def finished(response: ResponseObject, chat: dict[str, Any]) -> ResponseObject:
    """The response once the chat answer is in: its output items, status and usage."""
    choice = chat["choices"][0]
    message, finish = choice["message"], choice.get("finish_reason")
    output: list = []
    if message.get("content"):
        output.append(OutputMessage(content=[OutputText(text=message["content"])],
                                    status="incomplete" if finish == "length" else "completed"))
    for call in message.get("tool_calls") or ():
        output.append(OutputFunctionCall(call_id=call["id"], name=call["function"]["name"],
                                         arguments=call["function"]["arguments"]))
    usage = chat.get("usage") or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return response.model_copy(update={
        "output": output,
        "status": "incomplete" if finish == "length" else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
        "usage": ResponsesUsage(input_tokens=usage.get("prompt_tokens", 0),
                                output_tokens=usage.get("completion_tokens", 0),
                                total_tokens=usage.get("total_tokens", 0),
                                input_tokens_details={"cached_tokens": cached or 0}),
        "alignment": chat.get("alignment"),
    })


class EventWriter:
    """Numbered `event:`/`data:` lines of one Responses stream."""

    def __init__(self, response: ResponseObject):
        self.response = response
        self.sequence = 0
        self.message_id = OutputMessage(content=[]).id

    def __call__(self, kind: str, **fields: Any) -> str:
        body = {"type": kind, "sequence_number": self.sequence,
                **{k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in fields.items()}}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(body)}\n\n"

    def open_message(self) -> list[str]:
        item = OutputMessage(id=self.message_id, status="in_progress", content=[])
        return [self("response.output_item.added", output_index=0, item=item),
                self("response.content_part.added", item_id=self.message_id, output_index=0, content_index=0,
                     part=OutputText(text=""))]

    def close_items(self, response: ResponseObject) -> list[str]:
        lines = []
        for index, item in enumerate(response.output):
            if isinstance(item, OutputMessage):
                item.id = self.message_id
                text = item.content[0].text
                lines += [self("response.output_text.done", item_id=item.id, output_index=index, content_index=0,
                               text=text),
                          self("response.content_part.done", item_id=item.id, output_index=index, content_index=0,
                               part=item.content[0])]
            else:
                lines += [self("response.output_item.added", output_index=index, item=item),
                          self("response.function_call_arguments.done", item_id=item.id, output_index=index,
                               arguments=item.arguments)]
            lines.append(self("response.output_item.done", output_index=index, item=item))
        return lines
