"""Protocol models: validation and conversion, no server."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from decoding.engine import StructuredOutput
from server.protocol import ChatCompletionRequest, CompletionRequest


def chat(**kw):
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **kw)


def test_defaults_convert_to_plain_sampling():
    sampling = chat().to_sampling_config(max_tokens=10, logprobs=None)
    assert (sampling.n, sampling.temperature, sampling.top_p, sampling.top_k) == (1, 1.0, 1.0, 0)
    assert sampling.stop == () and sampling.seed is None and sampling.max_tokens == 10


def test_fields_carry_over():
    req = chat(n=3, temperature=0.5, top_p=0.9, top_k=-1, stop="END", seed=7, presence_penalty=0.1)
    sampling = req.to_sampling_config(max_tokens=5, logprobs=2)
    assert (sampling.n, sampling.temperature, sampling.top_p, sampling.top_k) == (3, 0.5, 0.9, 0)
    assert sampling.stop == ("END",) and sampling.seed == 7 and sampling.logprobs == 2
    assert sampling.presence_penalty == 0.1


def test_max_completion_tokens_wins_over_max_tokens():
    assert chat(max_tokens=5, max_completion_tokens=9).requested_max_tokens() == 9
    assert chat(max_tokens=5).requested_max_tokens() == 5
    assert chat().requested_max_tokens() is None


def test_developer_role_and_content_parts_become_template_messages():
    req = ChatCompletionRequest(
        model="m",
        messages=[
            {"role": "developer", "content": "be kind"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
    )
    assert req.template_messages() == [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "ab"},
    ]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"messages": [{"role": "tool", "content": "x"}]},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
        {"messages": []},
        {"n": 0},
        {"max_tokens": 0},
        {"top_p": 0},
        {"temperature": -0.1},
        {"top_logprobs": 21, "logprobs": True},
        {"top_logprobs": 2},
        {"stream_options": {"include_usage": True}},
        {"stop": [""]},
        {"stop": ["x"] * 17},
        {"tools": [{"type": "function"}]},
        {"response_format": {"type": "json_schema"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        {"response_format": {"type": "structural_tag"}},
        {"response_format": {"type": "json_object", "extra": 1}},
        {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a+"}},
        {"structured_outputs": {"regex": "a", "choice": ["b"]}},
        {"structured_outputs": {}},
        {"structured_outputs": {"choice": []}},
        {"structured_outputs": {"json": "not json"}},
        {"structured_outputs": {"structural_tag": "x"}},
        {"logit_bias": {"abc": 1}},
        {"logit_bias": {"5": 101}},
        {"logit_bias": {str(i): 1 for i in range(301)}},
        {"min_p": 1.5},
        {"min_tokens": -1},
        {"repetition_penalty": 0},
        {"stop_token_ids": [-1]},
        {"frequency_penalty": 3},
    ],
)
def test_invalid_chat_requests_are_rejected(kwargs):
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ValidationError):
        ChatCompletionRequest(**{**base, **kwargs})


def test_structured_outputs_become_one_engine_constraint():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    as_schema = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                          "strict": True}})
    assert as_schema.to_sampling_config(8, None).structured == StructuredOutput(json=schema)
    assert chat(response_format={"type": "json_object"}).to_sampling_config(8, None).structured == \
        StructuredOutput(json_object=True)
    assert chat(response_format={"type": "text"}).to_sampling_config(8, None).structured is None
    regex = chat(structured_outputs={"regex": "[ab]+"}).to_sampling_config(8, None).structured
    assert (regex.regex, regex.param) == ("[ab]+", "structured_outputs")
    # vLLM accepts the schema as JSON text too.
    text = chat(structured_outputs={"json": json.dumps(schema)}).to_sampling_config(8, None).structured
    assert text.json == schema
    assert chat(structured_outputs={"choice": ["yes", "no"]}).to_sampling_config(8, None).structured.choice == \
        ("yes", "no")


def test_completions_take_response_format_as_vllm_does():
    request = CompletionRequest(model="m", prompt="x", response_format={"type": "json_object"})
    assert request.to_sampling_config(8, None).structured == StructuredOutput(json_object=True)
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="x", structured_outputs={"regex": "a"},
                          response_format={"type": "json_object"})


def test_sampling_extensions_reach_the_sampling_config():
    config = chat(logit_bias={"42": -100, "7": 5.5}, min_tokens=3, min_p=0.1, repetition_penalty=1.2,
                  stop_token_ids=[2, 2, 9], include_stop_str_in_output=True).to_sampling_config(8, None)
    assert config.logit_bias == {42: -100.0, 7: 5.5}
    assert (config.min_tokens, config.min_p, config.repetition_penalty) == (3, 0.1, 1.2)
    assert config.stop_token_ids == (2, 2, 9) and config.include_stop_str_in_output


def test_logprobs_k():
    assert chat().logprobs_k() is None
    assert chat(logprobs=True).logprobs_k() == 0
    assert chat(logprobs=True, top_logprobs=4).logprobs_k() == 4


def test_unknown_fields_are_ignored():
    assert chat(user="abc", metadata={"a": 1}).model == "m"


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("hello", ["hello"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_completion_prompts_normalise(prompt, expected):
    assert CompletionRequest(model="m", prompt=prompt).prompts() == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prompt": []},
        {"prompt": [[]]},
        {"prompt": [1, -2]},
        {"prompt": "x", "suffix": "y"},
        {"prompt": "x", "best_of": 3},
        {"prompt": "x", "echo": True, "stream": True},
        {"prompt": "x", "logprobs": 6},
    ],
)
def test_invalid_completion_requests_are_rejected(kwargs):
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", **kwargs)


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [WEATHER], "tool_choice": "required", "structured_outputs": {"regex": "a"}}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages"),
])
def test_tool_errors_name_their_field(kwargs, field):
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest(**{"model": "m", "messages": [{"role": "user", "content": "hi"}], **kwargs})
    assert info.value.errors()[0]["loc"][0] == field


def test_named_and_required_tool_choices_become_grammars():
    named = chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.tool_kind == "named"
    assert named.to_sampling_config(8, None).structured == StructuredOutput(
        json=WEATHER["function"]["parameters"], param="tool_choice")
    required = chat(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    schema = required.to_sampling_config(8, None).structured.json
    assert schema["type"] == "array" and schema["maxItems"] == 1
    assert schema["items"]["anyOf"][0]["properties"]["name"]["enum"] == ["get_weather"]
    assert chat(tools=[WEATHER]).tool_kind == "auto"  # OpenAI's default with tools
    assert chat(tools=[WEATHER], tool_choice="none").template_tools() is None
    assert chat(tools=[WEATHER], tool_choice="none").to_sampling_config(8, None).structured is None


def test_tool_history_reaches_the_template_with_arguments_as_objects():
    request = ChatCompletionRequest(model="m", messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "cold"},
    ])
    _, called, answered = request.template_messages()
    assert called["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert answered == {"role": "tool", "content": "cold", "tool_call_id": "c1"}
