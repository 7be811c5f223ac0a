"""A request's answer as OpenAI tool calls.

With `tool_choice` naming a function or `required`, the engine decodes the answer under a
JSON grammar (`ChatCompletionRequest.structured`): the named function's arguments, or a list
of `{"name", "parameters"}` calls (vLLM's layout). Here that text becomes `tool_calls`, whole
or as streamed deltas. `auto` needs a tool-call parser, which this server does not run yet:
it is refused before anything runs (`auto_refusal`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from server.protocol import (
    ChatCompletionRequest,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    tool_call_id,
)

AUTO_REFUSAL = (
    "tool_choice 'auto' (OpenAI's default when tools are given) lets the model decide whether to call a tool, "
    "which needs a tool-call parser for the model's own call format; this server has none. Send tool_choice "
    "'required' or {'type': 'function', 'function': {'name': ...}} (enforced by a JSON grammar, any model), "
    "or 'none'"
)


@dataclass
class ToolAnswer:
    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str | None


def tool_answer(request: ChatCompletionRequest, text: str, finish_reason: str | None) -> ToolAnswer:
    """One choice's final text as a message. As OpenAI does, a named call finishes with
    `stop` and `required` calls with `tool_calls`; a call cut short by max_tokens keeps its
    partial text (`length`), as arguments when named and as content when a list."""
    kind = request.tool_kind
    if kind == "named":
        call = ToolCall(function=FunctionCall(name=request.tool_choice.function.name, arguments=text))
        return ToolAnswer(None, [call], finish_reason)
    if kind == "required":
        calls = _parse_calls(text)
        if calls is None:
            return ToolAnswer(text, [], finish_reason)
        return ToolAnswer(None, calls, "tool_calls" if finish_reason == "stop" else finish_reason)
    return ToolAnswer(text, [], finish_reason)


def _parse_calls(text: str) -> list[ToolCall] | None:
    try:
        items = json.loads(text)
        return [ToolCall(function=FunctionCall(name=item["name"], arguments=json.dumps(item["parameters"])))
                for item in items]
    except (ValueError, TypeError, KeyError):
        return None


@dataclass
class ToolCallStream:
    """One streamed request's content deltas as tool-call deltas: a named call's arguments
    stream as they are decoded; `required` calls are sent whole when the choice ends (a list
    cannot be split into calls before it parses)."""

    request: ChatCompletionRequest
    _opened: dict[int, str] = field(default_factory=dict)
    _texts: dict[int, str] = field(default_factory=dict)

    def delta(self, index: int, text: str) -> DeltaMessage | None:
        kind = self.request.tool_kind
        if kind == "named":
            if index not in self._opened:
                self._opened[index] = call_id = tool_call_id()
                return DeltaMessage(tool_calls=[DeltaToolCall(
                    index=0, id=call_id, type="function",
                    function=DeltaFunctionCall(name=self.request.tool_choice.function.name, arguments=text))])
            return DeltaMessage(tool_calls=[DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))])
        if kind == "required":
            self._texts[index] = self._texts.get(index, "") + text
            return None
        return DeltaMessage(content=text)

    def finish(self, index: int, finish_reason: str | None) -> tuple[DeltaMessage | None, str | None]:
        """What is still to send for a finished choice, and its finish reason."""
        if self.request.tool_kind != "required":
            return None, finish_reason
        answer = tool_answer(self.request, self._texts.get(index, ""), finish_reason)
        if not answer.tool_calls:
            return DeltaMessage(content=answer.content), answer.finish_reason
        calls = [DeltaToolCall(index=i, id=call.id, type="function",
                               function=DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments))
                 for i, call in enumerate(answer.tool_calls)]
        return DeltaMessage(tool_calls=calls), answer.finish_reason
