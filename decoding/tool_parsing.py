"""vLLM's own tool-call parsers, for `tool_choice: auto` (`aligner serve --tool-call-parser NAME`).

Under `auto` the model decides whether to call a tool, in its own format (Hermes'
`<tool_call>{...}</tool_call>`, Llama's JSON, Mistral's `[TOOL_CALLS]`, ...); the parser
vLLM ships for that format splits a finished answer into content and calls. vLLM is
imported only when a parser is built.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


logger = logging.getLogger(__name__)

@dataclass
class ParsedAnswer:
    """An answer split by the parser: text for the user, and (name, JSON arguments) calls."""

    content: str | None
    calls: list[tuple[str, str]] = field(default_factory=list)


def parser_names() -> list[str]:
    from vllm.tool_parsers import ToolParserManager

    return sorted({*ToolParserManager.tool_parsers, *ToolParserManager.lazy_parsers})


class ToolCallParser:
    """One of vLLM's tool parsers, by its `--tool-call-parser` name, over the model's tokenizer."""

    def __init__(self, name: str, model_path: str):
        from transformers import AutoTokenizer
        from vllm.tool_parsers import ToolParserManager

        known = parser_names()
        if name not in known:
            raise ValueError(f"unknown tool-call parser {name!r}; vLLM's parsers are: {', '.join(known)}")
        self.name = name
        self._cls = ToolParserManager.get_tool_parser(name)
        self._tokenizer = AutoTokenizer.from_pretrained(model_path)

    def parse(self, text: str, model: str, messages: Sequence[dict[str, Any]],
              tools: Sequence[dict[str, Any]]) -> ParsedAnswer:
        """Split a finished answer; `tools` in OpenAI's layout, as the request sent them."""
        request = _vllm_request(model, messages, tools)
        parser = self._cls(self._tokenizer, request.tools)
        info = parser.extract_tool_calls(text, request)
        if not info.tools_called:
            return ParsedAnswer(text)
        return ParsedAnswer(info.content or None, [(c.function.name, c.function.arguments) for c in info.tool_calls])

    def streaming(self, model: str, messages: Sequence[dict[str, Any]],
                  tools: Sequence[dict[str, Any]]) -> StreamingParse:
        """A reader of one answer as it decodes, through the parser's streaming mode."""
        request = _vllm_request(model, messages, tools)
        return StreamingParse(self._cls(self._tokenizer, request.tools), request)


def _vllm_request(model: str, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]]):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest.model_validate(
        {"model": model, "messages": list(messages), "tools": list(tools), "tool_choice": "auto"})


@dataclass
class CallPiece:
    """A piece of one call, as the parser streams it: the call's id and name on its first."""

    index: int
    id: str | None
    name: str | None
    arguments: str


class StreamingParse:
    """One answer through vLLM's `extract_tool_calls_streaming` (a parser instance per answer:
    parsers keep what they have sent). `feed` takes each decoded piece and its token ids."""

    def __init__(self, parser, request):
        self._parser, self._request = parser, request
        self._text, self._ids = "", []

    def feed(self, text: str, token_ids: Sequence[int] = ()) -> tuple[str | None, list[CallPiece]]:
        """The content and call pieces the parser can send after this piece."""
        previous_text, previous_ids = self._text, self._ids
        self._text, self._ids = previous_text + text, [*previous_ids, *token_ids]
        try:
            delta = self._parser.extract_tool_calls_streaming(
                previous_text, self._text, text, previous_ids, self._ids, list(token_ids), self._request)
        except Exception:  # noqa: BLE001 - a parser's bug must not break the stream: the finished parse still runs
            logger.exception("tool parser %s failed on a streamed piece", type(self._parser).__name__)
            return None, []
        if delta is None:
            return None, []
        pieces = [CallPiece(call.index, call.id, getattr(call.function, "name", None),
                            getattr(call.function, "arguments", None) or "") for call in delta.tool_calls or []]
        return delta.content or None, pieces
