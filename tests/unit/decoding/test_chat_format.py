"""Tools folded into conversations for chat templates without tool support."""

from __future__ import annotations

import json

from decoding.chat_format import fold_tools, template_knows_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}


def test_tools_become_a_system_note_and_calls_the_turns_text():
    folded = fold_tools([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "cold", "tool_call_id": "c1"},
    ], [WEATHER])
    assert folded[0]["role"] == "system" and json.dumps(WEATHER["function"]) in folded[0]["content"]
    assert json.loads(folded[2]["content"]) == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    assert folded[3] == {"role": "tool", "content": "cold"}
    assert all(set(m) == {"role", "content"} for m in folded)


def test_an_existing_system_message_keeps_its_text_first():
    folded = fold_tools([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], [WEATHER])
    assert len(folded) == 2 and folded[0]["content"].startswith("Be brief.\n\n")
    assert fold_tools([{"role": "user", "content": "hi"}], None) == [{"role": "user", "content": "hi"}]


def test_templates_that_render_tools_are_left_alone():
    assert template_knows_tools("{% if tools %}{{ tools }}{% endif %}{% for m in messages %}{{ m.tool_calls }}{% endfor %}")
    assert not template_knows_tools("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert not template_knows_tools(None)
