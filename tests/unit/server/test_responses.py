"""POST /v1/responses over a fake engine: the chat path, re-worded as OpenAI's Responses API."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from server.app import build_app
from server.config import ServerConfig
from tests.fakes import FakeEngine

WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}


def make_client():
    engine = FakeEngine()
    return TestClient(build_app(engine, ServerConfig(served_model_name="fake-model"), start_engine=False)), engine


def events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def test_text_in_text_out_with_usage_and_instructions():
    client, engine = make_client()
    r = client.post("/v1/responses", json={"model": "fake-model", "input": "hello", "instructions": "be kind",
                                           "max_output_tokens": 3, "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "response" and body["id"].startswith("resp-")
    (item,) = body["output"]
    assert item["type"] == "message" and item["content"][0]["text"] == "w0_0 w0_1 w0_2 "
    # Cut by max_output_tokens: incomplete, as OpenAI reports it.
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    prompt = engine.calls[0][1]
    assert body["usage"]["input_tokens"] == len(prompt) and body["usage"]["output_tokens"] == 3
    assert engine.tokenizer.encode("system: be kind user: hello")[:5] == prompt[:5]
    assert body["alignment"]["strategy"] == "none"


def test_the_stream_spells_out_the_answer_in_responses_events():
    client, _ = make_client()
    r = client.post("/v1/responses", json={"model": "fake-model", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hello"}]}], "max_output_tokens": 2,
        "stream": True})
    got = events(r.text)
    kinds = [e["type"] for e in got]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert got[-1]["response"]["status"] == "incomplete"
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    deltas = "".join(e["delta"] for e in got if e["type"] == "response.output_text.delta")
    assert deltas == "w0_0 w0_1 " == next(e["text"] for e in got if e["type"] == "response.output_text.done")
    assert got[-1]["response"]["output"][0]["content"][0]["text"] == deltas
    assert got[-1]["response"]["usage"]["output_tokens"] == 2


def test_errors_name_the_responses_fields():
    client, _ = make_client()
    cases = [({"previous_response_id": "resp_1"}, "previous_response_id"),
             ({"tools": [{"type": "web_search"}]}, "tools"),
             ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
             ({"input": []}, "input"),
             ({"top_logprobs": 3}, "top_logprobs"),
             ({"include": ["message.output_text.logprobs"]}, "include"),
             ({"reasoning": {"effort": "high"}}, "reasoning"),
             ({"truncation": "auto"}, "truncation"),
             ({"max_tool_calls": 2}, "max_tool_calls")]
    for extra, param in cases:
        r = client.post("/v1/responses", json={"model": "fake-model", "input": "hi", **extra})
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == param, (extra, r.json())



def test_wrongly_typed_fields_are_a_400_naming_the_field_never_a_500():
    client, _ = make_client()
    cases = [({"tools": 1.0}, "tools"),  # once a TypeError in the tools validator
             ({"tools": "get_weather"}, "tools"),
             ({"tools": [1, "x"]}, "tools[0]"),
             ({"metadata": 1}, "metadata"),  # once a ValidationError echoing it into the response
             ({"metadata": ["k", "v"]}, "metadata"),
             ({"metadata": {"k": 1}}, "metadata.k"),
             ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
             ({"metadata": 1, "stream": True}, "metadata")]  # before the stream starts, not inside it
    for extra, param in cases:
        r = client.post("/v1/responses", json={"model": "fake-model", "input": "hi", "max_output_tokens": 2, **extra})
        assert r.status_code == 400, (extra, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"], (extra, error)

def test_fields_left_at_their_defaults_are_accepted():
    client, _ = make_client()
    r = client.post("/v1/responses", json={"model": "fake-model", "input": "hi", "max_output_tokens": 2,
                                           "include": [], "truncation": "disabled", "reasoning": None,
                                           "store": False, "metadata": {"k": "v"}, "user": "u"})
    assert r.status_code == 200, r.text
    assert r.json()["metadata"] == {"k": "v"}


def test_function_calls_and_their_outputs_become_the_chat_history():
    client, engine = make_client()
    r = client.post("/v1/responses", json={"model": "fake-model", "max_output_tokens": 2, "tools": [WEATHER],
                                           "tool_choice": "none", "input": [
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]})
    assert r.status_code == 200, r.text
    assert engine.tokenizer.encode("tool: sunny")[1] in engine.calls[0][1]
    named = client.post("/v1/responses", json={"model": "fake-model", "max_output_tokens": 2, "input": "weather?",
                                               "tools": [WEATHER], "tool_choice": {"type": "function",
                                                                                   "name": "get_weather"}})
    (call,) = named.json()["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["call_id"].startswith("call_")


def test_function_tools_without_a_tool_choice_give_a_call_or_text_on_a_server_without_a_parser():
    from tests.unit.server.test_tools import CallLM

    engine = FakeEngine(max_model_len=512, lm=CallLM())
    client = TestClient(build_app(engine, ServerConfig(served_model_name="fake-model"), start_engine=False))
    r = client.post("/v1/responses", json={"model": "fake-model", "max_output_tokens": 10, "input": "weather?",
                                           "tools": [WEATHER]})
    assert r.status_code == 200, r.text
    (call,) = r.json()["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Oslo"}
    assert engine.calls[0][2].structured.param == "tool_choice"  # held to the call-or-message grammar
    text, _ = make_client()
    r = text.post("/v1/responses", json={"model": "fake-model", "max_output_tokens": 3, "input": "weather?",
                                         "tools": [WEATHER]})
    assert r.status_code == 200 and r.json()["output"][0]["type"] == "message", r.text
