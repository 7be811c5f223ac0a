"""`tool_choice: auto` on any model: a grammar that lets the answer be a plain message or a
list of calls to the given tools, in one fixed JSON envelope.

A model either writes text that does not start with `[`, or a JSON list
`[{"name": "<tool>", "arguments": {...}}]` whose arguments follow that tool's schema, the
layout `decoding.chat_format.fold_tools` writes earlier calls in. The engine holds the answer
to the grammar token by token (vLLM's structured outputs, xgrammar's EBNF), so whichever the
model chooses is well formed; `parse_calls` reads it back. This is the path when the server
has no `--tool-call-parser` for the model's own call format.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

CALL_FORMAT = ('To call one of these functions, answer with only a JSON list of calls, '
               '[{"name": "<function name>", "arguments": {<its arguments>}}], and nothing else. '
               'Otherwise answer in plain text.')
# A message: at least one character, the first not `[` (which starts a list of calls).
_MESSAGE = 'root ::= [^\\[] [^]*'


def calls_schema(tools: Sequence[dict[str, Any]], parallel: bool = True) -> dict[str, Any]:
    """The JSON schema of a list of calls, each to one of `tools` (OpenAI's `{"type":
    "function", "function": {...}}`) with its arguments; one call when not `parallel`."""
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": [
        {"type": "object", "properties": {"name": {"const": tool["function"]["name"]},
                                          "arguments": tool["function"].get("parameters") or {"type": "object"}},
         "required": ["name", "arguments"], "additionalProperties": False}
        for tool in tools]}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def call_or_message_grammar(tools: Sequence[dict[str, Any]], parallel: bool = True) -> str:
    """xgrammar EBNF of "a message, or a list of calls" (compact JSON, as the engine's JSON).

    >>> tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    >>> grammar = call_or_message_grammar([tool])
    >>> grammar.startswith("root ::=") and '"\\\\"f\\\\""' in grammar
    True
    >>> grammar.index('"\\\\"name\\\\""') < grammar.index('"\\\\"arguments\\\\""')  # name first
    True
    """
    # Not sorted: xgrammar writes properties in the schema's order, so each call is `name` then
    # `arguments` (as the prompt's note shows, and as a stream can announce a call before its
    # arguments) and the arguments keep the order the client gave its parameters.
    return _grammar(json.dumps(calls_schema(tools, parallel)))


@functools.lru_cache(maxsize=256)
def _grammar(schema: str) -> str:
    """Built once per distinct tool set: clients send the same tools with every request."""
    import xgrammar as xgr

    calls = xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=(",", ":"))
    return str(xgr.Grammar.union(calls, xgr.Grammar.from_ebnf(_MESSAGE)))


def parse_calls(text: str, tools: Sequence[dict[str, Any]]) -> list[tuple[str, str]] | None:
    """[(name, arguments as JSON text)] when `text` is a whole list of calls to `tools`, else
    None (a message, or a list cut short by max_tokens).

    >>> tools = [{"type": "function", "function": {"name": "f"}}]
    >>> parse_calls('[{"name":"f","arguments":{"x":1}}]', tools)
    [('f', '{"x": 1}')]
    >>> parse_calls('[{"name":"f","argu', tools) is None, parse_calls("Hello", tools) is None
    (True, True)
    """
    if not text.startswith("["):
        return None
    try:
        items = json.loads(text)
    except ValueError:
        return None
    names = {tool["function"]["name"] for tool in tools}
    if not isinstance(items, list) or not items or not all(
            isinstance(i, dict) and i.get("name") in names and isinstance(i.get("arguments"), dict) for i in items):
        return None
    return [(item["name"], json.dumps(item["arguments"])) for item in items]
