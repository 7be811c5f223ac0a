"""Tool calls out of answers (`server.tools`) and through the HTTP layer over a fake engine."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from decoding.tool_parsing import ParsedAnswer
from server.app import build_app
from server.config import ServerConfig
from server.protocol import ChatCompletionRequest
from server.tools import ToolCallStream, tool_answer
from tests.fakes import FakeEngine

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "weather?"}],
                                 tools=[WEATHER, CLOCK], **kw)


class MarkerParser:
    """Stands in for a vLLM parser: each `CALL name {json}` after the content is a call."""

    def parse(self, text, model, messages, tools):
        if "CALL " not in text:
            return ParsedAnswer(text)
        content, *calls = text.split("CALL ")
        return ParsedAnswer(content or None, [tuple(call.strip().split(" ", 1)) for call in calls])


def test_a_named_choice_is_one_call_of_that_function_finishing_with_stop():
    answer = tool_answer(request(tool_choice=NAMED), '{"city": "Oslo"}', "stop")
    assert answer.content is None and answer.finish_reason == "stop"
    (call,) = answer.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == '{"city": "Oslo"}'


def test_required_calls_are_split_from_the_list_and_finish_with_tool_calls():
    text = json.dumps([{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}])
    answer = tool_answer(request(tool_choice="required"), text, "stop")
    assert [(c.function.name, json.loads(c.function.arguments)) for c in answer.tool_calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert answer.finish_reason == "tool_calls" and len({c.id for c in answer.tool_calls}) == 2
    # Cut short by max_tokens: the partial list stays content, the finish reason says why.
    cut = tool_answer(request(tool_choice="required"), text[:20], "length")
    assert (cut.content, cut.tool_calls, cut.finish_reason) == (text[:20], [], "length")


def test_auto_answers_go_through_the_parser():
    answer = tool_answer(request(), 'Looking. CALL get_time {"tz": "UTC"}', "stop", MarkerParser())
    assert answer.content == "Looking. " and answer.finish_reason == "tool_calls"
    assert answer.tool_calls[0].function.name == "get_time"
    one = tool_answer(request(parallel_tool_calls=False), 'CALL get_time {} CALL x {}', "stop", MarkerParser())
    assert [c.function.name for c in one.tool_calls] == ["get_time"]
    both = tool_answer(request(), 'CALL get_time {} CALL x {}', "stop", MarkerParser())
    assert [c.function.name for c in both.tool_calls] == ["get_time", "x"]
    plain = tool_answer(request(), "It is sunny.", "stop", MarkerParser())
    assert (plain.content, plain.tool_calls, plain.finish_reason) == ("It is sunny.", [], "stop")


def test_a_streamed_named_call_opens_once_then_streams_arguments():
    stream = ToolCallStream(request(tool_choice=NAMED))
    first, second = stream.delta(0, '{"city"'), stream.delta(0, ': "Oslo"}')
    assert first.tool_calls[0].id and first.tool_calls[0].function.name == "get_weather"
    assert second.tool_calls[0].id is None and second.tool_calls[0].function.name is None
    assert first.tool_calls[0].function.arguments + second.tool_calls[0].function.arguments == '{"city": "Oslo"}'
    assert stream.finish(0, "stop") == (None, "stop")


def test_streamed_required_and_auto_calls_arrive_whole_at_the_finish():
    stream = ToolCallStream(request(tool_choice="required"))
    text = json.dumps([{"name": "get_time", "parameters": {}}])
    assert stream.delta(0, text[:5]) is None and stream.delta(0, text[5:]) is None
    delta, finish = stream.finish(0, "stop")
    assert finish == "tool_calls" and delta.tool_calls[0].function.name == "get_time"
    auto = ToolCallStream(request(), MarkerParser())
    assert auto.delta(1, "Hm. CALL get_time {}") is None
    delta, finish = auto.finish(1, "stop")
    assert (delta.content, delta.tool_calls[0].function.name, finish) == ("Hm. ", "get_time", "tool_calls")
    # Without tools (or with tool_choice none) content streams as always.
    assert ToolCallStream(request(tool_choice="none")).delta(0, "hi").content == "hi"


class CallLM:
    """Answers with one call to get_weather in the grammar's envelope, a piece per token."""

    PIECES = ('[{"name":"get_weather",', '"arguments":', '{"city":"Oslo"}}]')

    def next_token(self, draw):
        return self.PIECES[draw.step] if draw.step < len(self.PIECES) else None

    def top_logprobs(self, draw, token, k):
        return -0.5, ()


def test_auto_without_a_parser_is_held_to_the_call_or_message_grammar():
    from decoding.tool_grammar import CALL_FORMAT

    engine = FakeEngine()
    client = TestClient(build_app(engine, ServerConfig(served_model_name="fake-model"), start_engine=False))
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER],
            "max_tokens": 3}
    reply = client.post("/v1/chat/completions", json=body)  # no tool_choice: OpenAI's default, auto
    assert reply.status_code == 200, reply.text
    assert reply.json()["alignment"]["auto_tool_calls"] == "grammar"
    assert reply.json()["choices"][0]["message"]["content"]  # the fake model answers in words
    _, prompt, sampling = engine.calls[0]
    assert sampling.structured.param == "tool_choice" and "get_weather" in sampling.structured.grammar
    assert engine.tokenizer.encode(CALL_FORMAT.split()[0])[0] in prompt  # how to call, in the prompt
    # Another grammar beside it is refused, naming it.
    refused = client.post("/v1/chat/completions", json={**body, "response_format": {"type": "json_object"}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "response_format"

    calling = TestClient(build_app(FakeEngine(max_model_len=512, lm=CallLM()),
                                   ServerConfig(served_model_name="fake-model"), start_engine=False))
    answered = calling.post("/v1/chat/completions", json={**body, "max_tokens": 10})
    assert answered.status_code == 200, answered.text
    (choice,) = answered.json()["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == ("get_weather", {"city": "Oslo"})


def test_a_streamed_grammar_auto_answer_streams_a_message_and_sends_a_call_whole():
    held = ToolCallStream(request())
    assert held.delta(0, "") is None and held.delta(0, "It").content == "It"  # empty: nothing to decide on
    stream = ToolCallStream(request())
    assert stream.delta(0, "It is").content == "It is" and stream.delta(0, " [sunny]").content == " [sunny]"
    assert stream.finish(0, "stop") == (None, "stop")
    calls = ToolCallStream(request())
    assert calls.delta(1, '[{"name":"get_time",') is None and calls.delta(1, '"arguments":{}}]') is None
    delta, finish = calls.finish(1, "stop")
    assert finish == "tool_calls" and delta.tool_calls[0].function.name == "get_time"
    cut = ToolCallStream(request())
    assert cut.delta(0, '[{"name":"get_ti') is None
    delta, finish = cut.finish(0, "length")  # cut by max_tokens: the partial list, as content
    assert (delta.content, delta.tool_calls, finish) == ('[{"name":"get_ti', None, "length")


def test_the_http_layer_renders_tools_into_the_prompt():
    engine = FakeEngine()
    client = TestClient(build_app(engine, ServerConfig(served_model_name="fake-model"), start_engine=False))
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER],
            "max_tokens": 3}
    named = client.post("/v1/chat/completions", json={**body, "tool_choice": NAMED})
    assert named.status_code == 200, named.text
    (choice,) = named.json()["choices"]
    assert choice["message"]["content"] is None and choice["message"]["tool_calls"][0]["function"]["name"] == \
        "get_weather"
    _, prompt, sampling = engine.calls[0]
    assert engine.tokenizer.encode("get_weather")[0] in prompt  # the tools reached the chat template
    assert sampling.structured.json == WEATHER["function"]["parameters"]
    none = client.post("/v1/chat/completions", json={**body, "tool_choice": "none"})
    assert none.status_code == 200 and none.json()["choices"][0]["message"]["tool_calls"] == []
    assert engine.tokenizer.encode("get_weather")[0] not in engine.calls[1][1]
