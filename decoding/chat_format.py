"""Conversations with tools, for chat templates that know nothing of tools.

A template that renders `tools` and `tool_calls` itself gets them unchanged. One that does
not (SmolLM2's, like many small models') would drop the tool list and fail on an assistant
turn that only called tools; for those the tools become a system note and each call the
JSON text of the turn, so the model still reads what it may call and what it called.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

TOOLS_NOTE = "You can call these functions. Each is described by a JSON schema of its arguments:\n{tools}"


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template and "tool_calls" in template


def fold_tools(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None,
               call_format: str | None = None) -> list[dict[str, Any]]:
    """`messages` with `tools` and each turn's `tool_calls` written into the text;
    `call_format` (how to call, `decoding.tool_grammar.CALL_FORMAT`) closes the tools' note.

    >>> fold_tools([{"role": "user", "content": "hi"},
    ...             {"role": "assistant", "content": "", "tool_calls": [
    ...                 {"function": {"name": "f", "arguments": {"x": 1}}}]},
    ...             {"role": "tool", "content": "2", "tool_call_id": "c1"}], None)[1]
    {'role': 'assistant', 'content': '[{"name": "f", "arguments": {"x": 1}}]'}
    """
    folded = []
    for message in messages:
        out = {"role": message["role"], "content": message.get("content") or ""}
        if calls := message.get("tool_calls"):
            text = json.dumps([{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls])
            out["content"] = f"{out['content']}\n{text}" if out["content"] else text
        folded.append(out)
    if tools:
        note = TOOLS_NOTE.format(tools="\n".join(json.dumps(t["function"] if "function" in t else t) for t in tools))
        if call_format:
            note = f"{note}\n{call_format}"
        if folded and folded[0]["role"] == "system":
            folded[0] = {"role": "system", "content": f"{folded[0]['content']}\n\n{note}"}
        else:
            folded.insert(0, {"role": "system", "content": note})
    return folded
