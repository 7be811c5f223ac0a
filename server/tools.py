"""A request's answer as OpenAI tool calls.

With `tool_choice` naming a function or `required`, the engine decodes the answer under a
JSON grammar (`ChatCompletionRequest.structured`): the named function's arguments, or a list
of `{"name", "parameters"}` calls (vLLM's layout). Here that text becomes `tool_calls`, whole
or as streamed deltas (`CallListReader` splits a list as it decodes). Under `auto` the model decides: with `--tool-call-parser`, in its own
call format, which vLLM's parser for that format splits (streamed, through its streaming
mode: `ParsedStream`); without
one, under a grammar that allows a plain message or a list of `{"name", "arguments"}` calls
(`decoding.tool_grammar`), which works on any model. `auto_path` says which.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from decoding.chat_format import fold_tools
from decoding.engine import StructuredOutput
from decoding.tool_grammar import CALL_FORMAT, call_or_message_grammar, parse_calls
from server.errors import invalid_request
from server.protocol import ChatCompletionRequest, DeltaMessage, ErrorResponse
from server.protocol_tools import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall, tool_call_id

if TYPE_CHECKING:
    from decoding.tool_parsing import StreamingParse, ToolCallParser

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class ChatInputs:
    """What a chat request gives the engine, worked out once: the messages and tools its chat
    template gets (under `auto` without a parser, the tools folded into the prompt instead),
    the call-or-message grammar that `auto` then decodes under, and the check of a candidate
    answer's form (`well_formed`)."""

    messages: list[dict]
    tools: list[dict] | None
    grammar: StructuredOutput | None
    well_formed: Callable[[str, str | None], bool] | None


def chat_inputs(request: ChatCompletionRequest, parser: ToolCallParser | None) -> ChatInputs | ErrorResponse:
    """The request's `ChatInputs`, or its 400 when `auto` is held to a grammar (no parser) and
    the request names another grammar beside it."""
    messages, tools = request.template_messages(), request.template_tools()
    grammar = None
    if auto_path(request, parser) == "grammar":
        if (fixed := request.structured()) is not None:
            return invalid_request(AUTO_BESIDE_A_FORMAT.format(param=fixed.param), fixed.param,
                                   "unsupported_combination")
        grammar = StructuredOutput(grammar=call_or_message_grammar(tools, request.parallel_tool_calls is not False),
                                   param="tool_choice")
        messages, tools = fold_tools(messages, tools, CALL_FORMAT), None
    return ChatInputs(messages, tools, grammar, well_formed(request, parser))


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


def well_formed(request: ChatCompletionRequest, parser: ToolCallParser | None = None) -> Callable[[str, str | None], bool] | None:
    """Whether one candidate answer is well formed for the request. With tools: its calls
    whole (not cut by max_tokens) and each call's arguments valid under its tool's parameters
    schema; under `auto` a message is well formed too, but a list of calls cut short is not.
    With a JSON `response_format` (or vLLM's `structured_outputs.json` / `json_object`): whole
    JSON, an object, valid under the schema if one is given. The strategies that choose among
    candidates choose among well-formed ones first. None when there is nothing to check."""
    kind = request.tool_kind
    if kind is None:
        return _json_check(request.structured())
    schemas = {tool.function.name: tool.function.schema_or_empty() for tool in request.tools}
    messages = request.model_dump(exclude_none=True)["messages"] if parser is not None else None

    def check(text: str, finish_reason: str | None) -> bool:
        answer = tool_answer(request, text, finish_reason, parser)
        if not answer.tool_calls:
            if kind != "auto":
                return False
            if parser is None:
                return not text.startswith("[")  # a list of calls cut short is not a message
            # A message, unless the parser's streaming mode saw a call begin that never parsed.
            reader = parser.streaming(request.model, messages, request.template_tools())
            return not reader.feed(text)[1]
        return all(_fits(call.function.arguments, schemas.get(call.function.name)) for call in answer.tool_calls)

    return check


def _json_check(fixed: StructuredOutput | None) -> Callable[[str, str | None], bool] | None:
    if fixed is None or (fixed.json is None and not fixed.json_object):
        return None  # no grammar, or one that is not JSON (a regex, a choice, EBNF)
    schema = fixed.json if fixed.json is not None else {"type": "object"}
    return lambda text, finish_reason: _fits(text, schema)


def _fits(text: str, schema: dict | None) -> bool:
    """Whether JSON text (a call's arguments, an answer) is whole and valid under `schema`."""
    import jsonschema

    if schema is None:
        return False  # a call of a function the request did not offer
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return False
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    except Exception:  # noqa: BLE001 - the client's schema cannot be checked (not a schema, a $ref to nowhere, ...)
        logger.info("a tools or response schema could not be checked; the answer counts as well formed", exc_info=True)
    return True


def _parse_calls(text: str) -> list[ToolCall] | None:
    try:
        items = json.loads(text)
        return [ToolCall(function=FunctionCall(name=item["name"], arguments=json.dumps(item["parameters"])))
                for item in items]
    except (ValueError, TypeError, KeyError):
        return None


class CallListReader:
    """Reads a JSON list of calls, `[{"name": ..., "<arguments key>": {...}}, ...]`, as it is
    decoded, and says what a stream can send so far: each call's id and name once its name has
    ended, then its arguments' text as it arrives (OpenAI's deltas). Strings, escapes and nested
    values are followed, so a `}` inside an argument's string does not end the call; any
    whitespace between tokens is allowed (`required`'s grammar is vLLM's, which allows it)."""

    def __init__(self, arguments_key: str):
        self.arguments_key = arguments_key
        self.calls: list[dict] = []  # {"id", "name", "arguments", "sent"}: sent = arguments already sent, or None
        self._depth = 0
        self._string = self._escape = False
        self._token = ""  # the string being read at a call's level: a key or the name
        self._key: str | None = None  # the key whose value comes next, at a call's level
        self._awaiting_value = False
        self._in_arguments = False

    def feed(self, text: str) -> list[DeltaToolCall]:
        for ch in text:
            self._read(ch)
        return self.pending()

    @property
    def announced(self) -> bool:
        """Whether any call has gone out (its id and name)."""
        return any(call["sent"] is not None for call in self.calls)

    def pending(self) -> list[DeltaToolCall]:
        out = []
        for index, call in enumerate(self.calls):
            if call["name"] is None:
                continue  # a call is announced by its name; its arguments wait for it
            if call["sent"] is None:
                out.append(DeltaToolCall(index=index, id=call["id"], type="function",
                                         function=DeltaFunctionCall(name=call["name"], arguments=call["arguments"])))
            elif len(call["arguments"]) > call["sent"]:
                out.append(DeltaToolCall(index=index,
                                         function=DeltaFunctionCall(arguments=call["arguments"][call["sent"]:])))
            call["sent"] = len(call["arguments"])
        return out

    def _read(self, ch: str) -> None:
        if self._in_arguments:
            self._read_arguments(ch)
            return
        if self._string:
            if self._string_char(ch):
                self._string_ended()
            else:
                self._token += ch
            return
        if self._depth == 2 and self._awaiting_value and not ch.isspace():
            self._awaiting_value = False
            if self._key == self.arguments_key:
                self._in_arguments = True
                self._read_arguments(ch)
                return
        if ch == '"':
            self._string, self._token = True, ""
        elif ch in "[{":
            self._depth += 1
            if self._depth == 2:  # a call opens
                self.calls.append({"id": tool_call_id(), "name": None, "arguments": "", "sent": None})
                self._key = None
        elif ch in "]}":
            self._depth -= 1
        elif self._depth == 2 and ch == ":":
            self._awaiting_value = True
        elif self._depth == 2 and ch == ",":
            self._key = None

    def _string_char(self, ch: str) -> bool:
        """One character inside a string, escapes followed; True when it closes the string."""
        if self._escape:
            self._escape = False
        elif ch == "\\":
            self._escape = True
        elif ch == '"':
            self._string = False
            return True
        return False

    def _string_ended(self) -> None:
        if self._depth != 2:
            return
        try:
            value = json.loads(f'"{self._token}"')
        except ValueError:
            value = self._token
        if self._key is None:
            self._key = value
        elif self._key == "name" and self.calls and self.calls[-1]["name"] is None:
            self.calls[-1]["name"] = value

    def _read_arguments(self, ch: str) -> None:
        """One character of a call's arguments value; it ends when its brackets close (or, were
        it a bare scalar, at the `,` or `}` after it, which is not part of it)."""
        if not self._string and self._depth == 2 and ch in ",}":
            self._in_arguments = False
            self._read(ch)
            return
        self.calls[-1]["arguments"] += ch
        if self._string:
            self._string_char(ch)
        elif ch == '"':
            self._string = True
        elif ch in "[{":
            self._depth += 1
        elif ch in "]}":
            self._depth -= 1
            if self._depth == 2:
                self._in_arguments = False


@dataclass
class ParsedStream:
    """One choice read by vLLM's parser as it decodes, and what has been sent of it: the
    parser streams content and calls; the finished answer's parse sends what it held back."""

    reader: StreamingParse
    content: str = ""
    calls: dict[int, list[str]] = field(default_factory=dict)  # call index -> [id, name, arguments sent]

    def delta(self, text: str, token_ids: Sequence[int], one_call: bool) -> DeltaMessage | None:
        content, pieces = self.reader.feed(text, token_ids)
        deltas = []
        for piece in pieces:
            if one_call and piece.index > 0:
                continue  # parallel_tool_calls false: the first call only, as the finished answer keeps
            if piece.index not in self.calls:
                if not piece.name:
                    continue
                self.calls[piece.index] = [piece.id or tool_call_id(), piece.name, piece.arguments]
                deltas.append(DeltaToolCall(index=piece.index, id=self.calls[piece.index][0], type="function",
                                            function=DeltaFunctionCall(name=piece.name, arguments=piece.arguments)))
            elif piece.arguments:
                self.calls[piece.index][2] += piece.arguments
                deltas.append(DeltaToolCall(index=piece.index, function=DeltaFunctionCall(arguments=piece.arguments)))
        self.content += content or ""
        return DeltaMessage(content=content, tool_calls=deltas or None) if content or deltas else None

    def finish(self, answer: ToolAnswer) -> DeltaMessage | None:
        """What the finished answer's parse has that the stream has not sent: content held back
        (a suffix that could have begun a call tag), arguments not yet streamed, calls. Calls
        the stream announced that the finished answer does not parse (cut, or malformed) are
        not followed by their text as content."""
        if self.calls and not answer.tool_calls:
            return None
        content = _rest(answer.content or "", self.content)
        deltas = []
        for i, call in enumerate(answer.tool_calls):
            if i not in self.calls:
                deltas.append(DeltaToolCall(index=i, id=call.id, type="function", function=DeltaFunctionCall(
                    name=call.function.name, arguments=call.function.arguments)))
            elif rest := _rest(call.function.arguments, self.calls[i][2]):
                deltas.append(DeltaToolCall(index=i, function=DeltaFunctionCall(arguments=rest)))
        return DeltaMessage(content=content or None, tool_calls=deltas or None) if content or deltas else None


def _rest(whole: str, sent: str) -> str:
    """What of `whole` is still to send after `sent` (nothing when the stream sent it in
    another spelling, e.g. the same JSON spaced otherwise)."""
    return whole[len(sent):] if whole.startswith(sent) else ""


@dataclass
class ToolCallStream:
    """One streamed request's content deltas as tool-call deltas. A named call's arguments,
    and each call of a list (`required`, or `auto` held to the grammar), stream as they are
    decoded: a call's id and name when its name has ended, then its arguments' text. Under `auto`
    held to the grammar, a choice whose first character opens a list is calls, any other a
    message that streams as content. `auto` answers read by vLLM's parser stream through the
    parser's streaming mode, and the finished answer's parse sends what it held back."""

    request: ChatCompletionRequest
    parser: ToolCallParser | None = None
    _opened: dict[int, str] = field(default_factory=dict)
    _texts: dict[int, str] = field(default_factory=dict)
    _streaming: set[int] = field(default_factory=set)  # grammar `auto` choices found to be messages
    _lists: dict[int, CallListReader] = field(default_factory=dict)  # choices read as lists of calls
    _parsed: dict[int, ParsedStream] = field(default_factory=dict)  # `auto` choices read by the parser
    _closed: set[int] = field(default_factory=set)  # choices the output rail stopped mid-call

    def _calls_sent(self, index: int) -> bool:
        reader, parsed = self._lists.get(index), self._parsed.get(index)
        return (index in self._opened or (reader is not None and reader.announced)
                or (parsed is not None and bool(parsed.calls)))

    def delta(self, index: int, text: str, token_ids: Sequence[int] = (),
              finish_reason: str | None = None) -> DeltaMessage | None:
        if finish_reason == "content_filter" and self._calls_sent(index):
            # The output rail stopped a choice whose calls were already streaming: its refusal
            # is content, not more arguments, and nothing more follows.
            self._closed.add(index)
            return DeltaMessage(content=text)
        kind = self.request.tool_kind
        if kind == "auto" and self.parser is not None:
            self._texts[index] = self._texts.get(index, "") + text
            if index not in self._parsed:
                self._parsed[index] = ParsedStream(self.parser.streaming(
                    self.request.model, self.request.model_dump(exclude_none=True)["messages"],
                    self.request.template_tools()))
            return self._parsed[index].delta(text, token_ids, self.request.parallel_tool_calls is False)
        if kind == "named":
            if index not in self._opened:
                self._opened[index] = call_id = tool_call_id()
                return DeltaMessage(tool_calls=[DeltaToolCall(
                    index=0, id=call_id, type="function",
                    function=DeltaFunctionCall(name=self.request.tool_choice.function.name, arguments=text))])
            return DeltaMessage(tool_calls=[DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))])
        if self._buffered(index, text):
            self._texts[index] = self._texts.get(index, "") + text
            calls = self._read_calls(index, text)
            return DeltaMessage(tool_calls=calls) if calls else None
        return DeltaMessage(content=text)

    def _read_calls(self, index: int, text: str) -> list[DeltaToolCall]:
        """What a choice's calls can send after `text`: its reader is made when the list opens
        (its first character that is not whitespace) and reads it from its start."""
        if (reader := self._lists.get(index)) is not None:
            return reader.feed(text)
        so_far = self._texts[index]
        if not so_far.lstrip().startswith("["):
            return []
        self._lists[index] = CallListReader("parameters" if self.request.tool_kind == "required" else "arguments")
        return self._lists[index].feed(so_far)

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
        if index in self._closed:
            return None, finish_reason
        if not self._buffered(index):
            return None, finish_reason
        text = self._texts.get(index, "")
        answer = tool_answer(self.request, text, finish_reason, self.parser)
        if (parsed := self._parsed.get(index)) is not None:
            return parsed.finish(answer), answer.finish_reason
        if (reader := self._lists.get(index)) is not None and reader.announced:
            # Calls already went out as they decoded: a whole list finishes as `tool_calls`;
            # one cut by max_tokens keeps what was sent, with `length` (as OpenAI's do).
            rest = reader.pending()
            return (DeltaMessage(tool_calls=rest) if rest else None), answer.finish_reason
        if not answer.tool_calls:
            return DeltaMessage(content=answer.content), answer.finish_reason
        calls = [DeltaToolCall(index=i, id=call.id, type="function",
                               function=DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments))
                 for i, call in enumerate(answer.tool_calls)]
        return DeltaMessage(content=answer.content, tool_calls=calls), answer.finish_reason
