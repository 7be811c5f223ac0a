"""A request's answer as OpenAI tool calls.

With `tool_choice` naming a function or `required`, the engine decodes the answer under a
JSON grammar (`ChatCompletionRequest.structured`): the named function's arguments, or a list
of `{"name", "parameters"}` calls (vLLM's layout). Here that text becomes `tool_calls`, whole
or as streamed deltas. Under `auto` the model decides: with `--tool-call-parser`, in its own
call format, which vLLM's parser for that format splits from the finished answer; without
one, under a grammar that allows a plain message or a list of `{"name", "arguments"}` calls
(`decoding.tool_grammar`), which works on any model. `auto_path` says which.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from decoding.tool_grammar import parse_calls
from server.protocol import ChatCompletionRequest, DeltaMessage
from server.protocol_tools import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall, tool_call_id

if TYPE_CHECKING:
    from decoding.tool_parsing import ToolCallParser

AUTO_BESIDE_A_FORMAT = (
    "tool_choice 'auto' (OpenAI's default when tools are given) is held to a grammar on this server (a message "
    "or a list of calls; it has no --tool-call-parser), and {param} is another grammar: give one, or send "
    "tool_choice 'none'")


def auto_path(request: ChatCompletionRequest, parser: ToolCallParser | None) -> str | None:
    """How an `auto` answer's calls are found: "parser" (vLLM's, for the model's own format)
    or "grammar" (`decoding.tool_grammar`); None when the request is not `auto`."""
    if request.tool_kind != "auto":
        return None
    return "parser" if parser is not None else "grammar"


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
    if kind == "auto" and parser is None:
        found = parse_calls(text, request.template_tools())
        if found:
            calls = [ToolCall(function=FunctionCall(name=name, arguments=arguments)) for name, arguments in found]
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
    stream as they are decoded; `required` answers and `auto` answers read by a parser are
    sent whole when the choice ends (a list cannot be split into calls before it parses, and
    the parser reads a finished answer). Under `auto` held to the grammar, a choice whose first
    character opens a list of calls is sent whole at its end, any other streams as content."""

    request: ChatCompletionRequest
    parser: ToolCallParser | None = None
    _opened: dict[int, str] = field(default_factory=dict)
    _texts: dict[int, str] = field(default_factory=dict)
    _streaming: set[int] = field(default_factory=set)  # grammar `auto` choices found to be messages

    def delta(self, index: int, text: str) -> DeltaMessage | None:
        kind = self.request.tool_kind
        if kind == "named":
            if index not in self._opened:
                self._opened[index] = call_id = tool_call_id()
                return DeltaMessage(tool_calls=[DeltaToolCall(
                    index=0, id=call_id, type="function",
                    function=DeltaFunctionCall(name=self.request.tool_choice.function.name, arguments=text))])
            return DeltaMessage(tool_calls=[DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))])
        if self._buffered(index, text):
            self._texts[index] = self._texts.get(index, "") + text
            return None
        return DeltaMessage(content=text)

    def _buffered(self, index: int, text: str = "") -> bool:
        kind = self.request.tool_kind
        if kind == "required" or (kind == "auto" and self.parser is not None):
            return True
        if kind != "auto" or index in self._streaming:
            return False
        so_far = self._texts.get(index, "") + text
        if not so_far or so_far.startswith("["):
            return True  # nothing yet, or a list of calls
        self._texts.pop(index, None)  # only ever empty here: nothing held back
        self._streaming.add(index)
        return False

    def finish(self, index: int, finish_reason: str | None) -> tuple[DeltaMessage | None, str | None]:
        """What is still to send for a finished choice, and its finish reason."""
        if not self._buffered(index):
            return None, finish_reason
        answer = tool_answer(self.request, self._texts.get(index, ""), finish_reason, self.parser)
        if not answer.tool_calls:
            return DeltaMessage(content=answer.content), answer.finish_reason
        calls = [DeltaToolCall(index=i, id=call.id, type="function",
                               function=DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments))
                 for i, call in enumerate(answer.tool_calls)]
        return DeltaMessage(content=answer.content, tool_calls=calls), answer.finish_reason
