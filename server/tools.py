"""A request's answer as OpenAI tool calls.

With `tool_choice` naming a function or `required`, the engine decodes the answer under a
JSON grammar (`ChatCompletionRequest.structured`): the named function's arguments, or a list
of `{"name", "parameters"}` calls (vLLM's layout). Here that text becomes `tool_calls`, whole
or as streamed deltas. Under `auto` the model writes calls in its own format and vLLM's
parser for that format (`--tool-call-parser`) splits the finished answer; without one,
`auto` is refused before anything runs (`AUTO_REFUSAL`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.protocol import ChatCompletionRequest, DeltaMessage
from server.protocol_tools import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall, tool_call_id

if TYPE_CHECKING:
    from decoding.tool_parsing import ToolCallParser

AUTO_REFUSAL = (
    "tool_choice 'auto' (OpenAI's default when tools are given) lets the model decide whether to call a tool, "
    "which needs a parser for the model's own call format: this server was started without --tool-call-parser. "
    "Send tool_choice 'required' or {'type': 'function', 'function': {'name': ...}} (enforced by a JSON grammar, "
    "any model), or 'none'"
)


@dataclass
class ToolAnswer:
    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str | None


def tool_answer(request: ChatCompletionRequest, text: str, finish_reason: str | None,
                parser: ToolCallParser | None = None) -> ToolAnswer:
    """One choice's final text as a message. As OpenAI does, a named call finishes with
    `stop`, `required` and `auto` calls with `tool_calls`; a call cut short by max_tokens
    keeps its partial text (`length`), as arguments when named and as content otherwise."""
    kind = request.tool_kind
    if kind == "named":
        call = ToolCall(function=FunctionCall(name=request.tool_choice.function.name, arguments=text))
        return ToolAnswer(None, [call], finish_reason)
    if kind == "required":
        calls = _parse_calls(text)
        if calls is None:
            return ToolAnswer(text, [], finish_reason)
        return ToolAnswer(None, calls, "tool_calls" if finish_reason == "stop" else finish_reason)
    if kind == "auto" and parser is not None:
        parsed = parser.parse(text, request.model, request.model_dump(exclude_none=True)["messages"],
                              request.template_tools())
        if parsed.calls:
            wanted = parsed.calls[:1] if request.parallel_tool_calls is False else parsed.calls
            calls = [ToolCall(function=FunctionCall(name=name, arguments=arguments)) for name, arguments in wanted]
            return ToolAnswer(parsed.content, calls, "tool_calls" if finish_reason == "stop" else finish_reason)
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
    stream as they are decoded; `required` and `auto` answers are sent whole when the choice
    ends (a list cannot be split into calls before it parses, and the parser reads a
    finished answer)."""

    request: ChatCompletionRequest
    parser: ToolCallParser | None = None
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
        if self._buffered:
            self._texts[index] = self._texts.get(index, "") + text
            return None
        return DeltaMessage(content=text)

    @property
    def _buffered(self) -> bool:
        kind = self.request.tool_kind
        return kind == "required" or (kind == "auto" and self.parser is not None)

    def finish(self, index: int, finish_reason: str | None) -> tuple[DeltaMessage | None, str | None]:
        """What is still to send for a finished choice, and its finish reason."""
        if not self._buffered:
            return None, finish_reason
        answer = tool_answer(self.request, self._texts.get(index, ""), finish_reason, self.parser)
        if not answer.tool_calls:
            return DeltaMessage(content=answer.content), answer.finish_reason
        calls = [DeltaToolCall(index=i, id=call.id, type="function",
                               function=DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments))
                 for i, call in enumerate(answer.tool_calls)]
        return DeltaMessage(content=answer.content, tool_calls=calls), answer.finish_reason
