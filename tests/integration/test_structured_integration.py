"""Structured outputs, tools and vLLM's sampling extensions through the real server, driven by
the clients people use: the `openai` SDK, LangChain's `ChatOpenAI` and `instructor`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import openai
import pytest

from aligner.strategies import get_strategy, strategy_names
from bench.dropin import WEATHER, City  # the cases `bench.dropin` runs against vLLM too
from tests.conftest import MODEL

pytestmark = pytest.mark.integration

STRATEGIES = ["none", "best_of_n"]
ALIGN = {"none": {"strategy": "none"}, "best_of_n": {"strategy": "best_of_n", "n": 3}}
CITY = [{"role": "user", "content": "Name a large city and its population as JSON."}]
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 24}}, "required": ["tz"]}}}
# Short enough to finish within the token budget under any strategy.
VERDICT = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                            "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
           "required": ["answer", "confidence"], "additionalProperties": False}


def sampling(strategy: str) -> dict:
    """Best-of-N needs sampling; plain decoding is greedy, so its checks are reproducible."""
    return {"temperature": 0.8, "seed": 11} if strategy == "best_of_n" else {"temperature": 0}


def check_verdict(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"answer", "confidence"} and value["answer"] in ("yes", "no"), value
    assert isinstance(value["confidence"], int) and 0 <= value["confidence"] <= 100, value


# --- the openai SDK -------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sdk_parse_fills_a_pydantic_model(client, strategy):
    reply = client.chat.completions.parse(
        model=MODEL, messages=CITY, response_format=City, max_tokens=80, **sampling(strategy),
        extra_body={"alignment": ALIGN[strategy]})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City) and choice.message.parsed.name
    assert reply.alignment["strategy"] == strategy  # the extension field rides along


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_json_object_answers_are_json_objects(client, strategy):
    brief = [{"role": "user", "content": "Reply with a JSON object with two keys: city and country. Be brief."}]
    reply = client.chat.completions.create(
        model=MODEL, messages=brief, response_format={"type": "json_object"}, max_tokens=300, **sampling(strategy),
        extra_body={"alignment": {**ALIGN[strategy], "return_candidates": True}})
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    if strategy == "best_of_n":
        # Every candidate was constrained, so the reward scored JSON, not free text (a
        # candidate cut short by max_tokens is a JSON prefix).
        candidates = reply.model_extra["alignment"]["candidates"]
        assert len(candidates) == 3
        assert all(isinstance(json.loads(c["text"]), dict) for c in candidates if c["finish_reason"] == "stop")
        assert all(c["text"].lstrip().startswith("{") for c in candidates)
        # Whole JSON objects are chosen among first: the others are listed as left out.
        broken = sorted(c["index"] for c in candidates if not is_json_object(c["text"]))
        assert reply.model_extra["alignment"].get("ill_formed", []) == (broken if len(broken) < 3 else [])


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


@pytest.mark.parametrize("name", strategy_names())
def test_every_strategy_answers_a_json_schema_or_refuses_naming_it(server, name):
    """The contract: an answer that parses into the schema, or a 400 naming response_format."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Is the sky blue? Answer as JSON."}],
            "max_tokens": 120, "temperature": 0.7, "seed": 5,
            "response_format": {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT,
                                                                       "strict": True}},
            "alignment": {"strategy": name}}
    reply = httpx.post(f"{server.v1}/chat/completions", json=body, headers=server.headers(), timeout=600)
    if "structured" in get_strategy(name).refuses:
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"] == "response_format" and name in error["message"], error
        return
    assert reply.status_code == 200, reply.text
    (choice,) = reply.json()["choices"]
    if choice["finish_reason"] == "length":
        # The grammar allows any whitespace between tokens, which a 135M model can loop on;
        # cut short, the answer is a prefix of the schema's JSON, never other text.
        assert choice["message"]["content"].lstrip().startswith("{"), choice
        return
    check_verdict(choice["message"]["content"])


def test_a_pipeline_with_revisions_keeps_the_schema(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is water wet? Answer as JSON."}], max_tokens=40,
        temperature=0.7, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT}},
        extra_body={"alignment": {"pipeline": [{"strategy": "urial"}, {"strategy": "best_of_n", "n": 2},
                                               {"strategy": "self_refine"}, {"strategy": "correct"}]}})
    check_verdict(reply.choices[0].message.content)


def test_vllm_structured_outputs_extension(client):
    choice = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is Paris in France?"}], max_tokens=5, temperature=0,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert choice.choices[0].message.content in ("yes", "no")
    code = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Make up a product code."}], max_tokens=12, temperature=0,
        extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{4}"}})
    assert len(code.choices[0].message.content) == 8 and code.choices[0].message.content[3] == "-"
    # The text completions endpoint takes the same extension.
    text = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0,
                                     extra_body={"structured_outputs": {"choice": [" Paris", " Lyon"]}})
    assert text.choices[0].text in (" Paris", " Lyon")
    schema = client.completions.create(
        model=MODEL, prompt="Is the sky blue? Answer as JSON:", max_tokens=60, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": VERDICT}}})
    if schema.choices[0].finish_reason == "stop":
        check_verdict(schema.choices[0].text)
    else:  # cut short by max_tokens: a prefix of the schema's JSON
        assert schema.choices[0].text.lstrip().startswith("{")


def test_streamed_json_schema_answer_parses(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=CITY, max_tokens=80, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema()}})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    City.model_validate_json(text)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_named_tool_call_arguments_parse(client, strategy):
    reply = client.chat.completions.create(
        model=MODEL, messages=WEATHER_QUESTION, tools=[WEATHER, CLOCK], max_tokens=60, **sampling(strategy),
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        extra_body={"alignment": ALIGN[strategy]})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None  # OpenAI's forced-call shape
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("c", "f")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_required_tool_choice_calls_one_of_the_tools(client, strategy):
    reply = client.chat.completions.create(
        model=MODEL, messages=WEATHER_QUESTION, tools=[WEATHER, CLOCK], tool_choice="required",
        parallel_tool_calls=False, max_tokens=80, **sampling(strategy), extra_body={"alignment": ALIGN[strategy]})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls  # parallel calls off: exactly one
    assert call.function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(call.function.arguments), dict)


def test_tool_result_turn_is_answered_from_the_result(client):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "c"})}}
    history = WEATHER_QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "It is 31 degrees and sunny."},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], tool_choice="none",
                                           max_tokens=40, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length") and not reply.choices[0].message.tool_calls
    assert "31" in reply.choices[0].message.content or "sunny" in reply.choices[0].message.content.lower()


def test_streamed_tool_calls_follow_openais_delta_format(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=WEATHER_QUESTION, tools=[WEATHER], max_tokens=60, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    deltas, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            deltas += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "stop" and len(deltas) > 1  # the arguments arrive as they are decoded
    assert deltas[0].id and deltas[0].function.name == "get_weather" and all(d.index == 0 for d in deltas)
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    assert json.loads("".join(d.function.arguments for d in deltas))["city"]
    required = client.chat.completions.create(
        model=MODEL, messages=WEATHER_QUESTION, tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=120,
        parallel_tool_calls=False, temperature=0, stream=True)
    deltas = [c for chunk in required for choice in chunk.choices for c in choice.delta.tool_calls or []]
    (call,) = merge_call_deltas(deltas)  # one call: its id and name first, then its arguments in pieces
    assert call.function.name in ("get_weather", "get_time") and isinstance(json.loads(call.function.arguments), dict)
    assert len(deltas) > 2  # streamed as decoded, not sent whole


def merge_call_deltas(deltas) -> list[SimpleNamespace]:
    """Streamed tool-call deltas merged as a client merges them (by index); OpenAI's layout:
    id, type and name on a call's first delta only, then pieces of its arguments."""
    calls: dict[int, SimpleNamespace] = {}
    for d in deltas:
        if d.index not in calls:
            assert d.id and d.type == "function" and d.function.name, d
            calls[d.index] = SimpleNamespace(id=d.id, function=SimpleNamespace(
                name=d.function.name, arguments=d.function.arguments or ""))
        else:
            assert d.id is None and d.function.name is None, d
            calls[d.index].function.arguments += d.function.arguments or ""
    return [calls[i] for i in sorted(calls)]


# A Hermes-format call (what `--tool-call-parser hermes` reads), forced by a regex: the 135M
# model does not call tools of its own accord.
HERMES_CALL = r'Checking\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "[A-Za-z]{1,12}", "unit": "c"\}\}</tool_call>'


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_choice_is_parsed_by_vllms_parser(client, strategy, stream):
    """The session server runs `--tool-call-parser hermes`: under `auto` (OpenAI's default
    with tools) the answer is split into content and calls by vLLM's Hermes parser."""
    request = dict(model=MODEL, messages=WEATHER_QUESTION, tools=[WEATHER], max_tokens=60, **sampling(strategy),
                   extra_body={"structured_outputs": {"regex": HERMES_CALL}, "alignment": ALIGN[strategy]})
    if stream:
        content, deltas, finish = "", [], None
        for chunk in client.chat.completions.create(stream=True, **request):
            for choice in chunk.choices:
                content += choice.delta.content or ""
                deltas += choice.delta.tool_calls or []
                finish = choice.finish_reason or finish
        calls = merge_call_deltas(deltas)
        if strategy == "none":  # through the parser's streaming mode: the arguments in pieces
            assert sum(bool(d.function.arguments) for d in deltas) > 1, deltas
    else:
        choice = client.chat.completions.create(**request).choices[0]
        content, calls, finish = choice.message.content, choice.message.tool_calls, choice.finish_reason
    assert finish == "tool_calls" and content.strip() == "Checking."
    (call,) = calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["unit"] == "c"
    # No call in the answer: it is plain content.
    plain = client.chat.completions.create(model=MODEL, messages=WEATHER_QUESTION, tools=[WEATHER], max_tokens=8,
                                           temperature=0)
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls


def weather_arguments(call) -> dict:
    """A get_weather call's arguments, checked against its schema."""
    assert call.function.name == "get_weather", call
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("c", "f") and len(args["city"]) <= 24, args
    return args


# At most five letters: the 135M model, asked for a big city, names some longer ones.
SHORT_CITY = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
                                                              "unit": {"type": "string", "enum": ["c", "f"]}},
                             "required": ["city", "unit"]}}}
ANY_CITY_CALL = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{1,11}", "unit": "c"\}\}</tool_call>'


def test_best_of_n_prefers_calls_whose_arguments_follow_the_schema(client):
    """Best-of-N under `auto` (vLLM's Hermes parser here): a candidate whose call breaks its
    tool's schema (a city over five letters) is left out before the reward compares, even
    where the reward ranks it first (all tie here, and ties go to the lowest index)."""
    mixed = 0
    for seed in (1, 7, 13):  # candidates vary; on this machine the first pool already mixes
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is the weather like in a big city today?"}],
            tools=[SHORT_CITY], max_tokens=60, temperature=1.0, seed=seed,
            extra_body={"structured_outputs": {"regex": ANY_CITY_CALL},
                        "alignment": {"strategy": "best_of_n", "n": 6, "reward": "exclaim", "return_candidates": True}})
        report = reply.alignment
        cities = {c["index"]: c["text"].split('"city": "')[1].split('"')[0] for c in report["candidates"]}
        too_long = sorted(i for i, city in cities.items() if len(city) > 5)
        assert report.get("ill_formed", []) == (too_long if len(too_long) < len(cities) else [])
        (call,) = reply.choices[0].message.tool_calls
        if len(too_long) < len(cities):
            assert report["selected"][0] not in too_long and len(json.loads(call.function.arguments)["city"]) <= 5
        mixed += 0 < len(too_long) < len(cities)
        if mixed:
            break  # one mixed pool shows the rule (CI time); the next seeds only if it did not mix
    assert mixed, "no pool mixed valid and invalid calls: the test showed nothing"


@pytest.mark.parametrize("strategy, stream", [("none", False), ("best_of_n", True)])  # two of four: CI time
def test_auto_tools_work_on_a_server_without_a_tool_parser(store_server, tokenizer, strategy, stream):
    """`tools` without `tool_choice` (what LangChain and the Agents SDK send) on a server started
    without --tool-call-parser: the answer is held to "a message or a list of calls", so it is
    a real message or real calls. A bias on `[` makes the model open a list: then it is calls
    whose arguments follow the tool's schema, and the tool's result turn is answered."""
    client = openai.OpenAI(base_url=store_server.v1, api_key=store_server.api_key, max_retries=0, timeout=300)
    bracket = tokenizer.encode("[", add_special_tokens=False)
    assert len(bracket) == 1
    alignment = {**ALIGN[strategy], "reward": {"exclaim": 1.0}} if strategy == "best_of_n" else ALIGN[strategy]
    base = dict(model=MODEL, messages=WEATHER_QUESTION, tools=[WEATHER], max_tokens=60, **sampling(strategy),
                extra_body={"alignment": alignment})

    def ask(**kw):
        if not stream:
            reply = client.chat.completions.create(**{**base, **kw})
            choice = reply.choices[0]
            return choice.message.content, choice.message.tool_calls, choice.finish_reason, reply.alignment
        content, calls, finish, report = "", [], None, None
        for chunk in client.chat.completions.create(stream=True, **{**base, **kw}):
            for choice in chunk.choices:
                content += choice.delta.content or ""
                calls += choice.delta.tool_calls or []
                finish = choice.finish_reason or finish
            report = getattr(chunk, "alignment", None) or report
        return content or None, merge_call_deltas(calls), finish, report

    content, calls, finish, report = ask()
    assert report["auto_tool_calls"] == "grammar"
    if calls:  # the model's choice: either is fine, and well formed
        assert finish == "tool_calls" and all(weather_arguments(c) for c in calls)
    else:
        assert content and not content.startswith("[") and finish in ("stop", "length")
    content, calls, finish, report = ask(logit_bias={str(bracket[0]): 100})
    assert finish == "tool_calls" and not content, (content, calls)
    args = [weather_arguments(c) for c in calls][0]
    call = calls[0]
    call_id = getattr(call, "id", None) or "call_1"
    turn = [*WEATHER_QUESTION,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(args)}}]},
            {"role": "tool", "tool_call_id": call_id, "content": '{"temperature": 21, "sky": "clear"}'}]
    content, calls, finish, _ = ask(messages=turn, max_tokens=30)
    assert content or calls


# --- sampling parameters that change output --------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_logit_bias_changes_the_greedy_token(client, tokenizer, strategy):
    plain = client.chat.completions.create(model=MODEL, messages=WEATHER_QUESTION, max_tokens=1, temperature=0,
                                           logprobs=True)
    first = plain.choices[0].logprobs.content[0].token
    first_id = tokenizer.encode(first, add_special_tokens=False)[0]
    banned = client.chat.completions.create(model=MODEL, messages=WEATHER_QUESTION, max_tokens=1, temperature=0,
                                            logit_bias={str(first_id): -100})
    assert banned.choices[0].message.content != first
    forced_id = tokenizer.encode(" banana", add_special_tokens=False)[0]
    forced = client.chat.completions.create(
        model=MODEL, messages=WEATHER_QUESTION, max_tokens=3, **sampling(strategy),
        logit_bias={str(forced_id): 100}, extra_body={"alignment": ALIGN[strategy]})
    assert forced.choices[0].message.content.strip().startswith("banana")


def test_vllm_sampling_extensions_are_honoured(client, tokenizer):
    short = [{"role": "user", "content": "What is 2+2? Answer with one number."}]
    plain = client.chat.completions.create(model=MODEL, messages=short, max_tokens=40, temperature=0)
    assert plain.usage.completion_tokens < 20 and plain.choices[0].finish_reason == "stop"
    longer = client.chat.completions.create(model=MODEL, messages=short, max_tokens=40, temperature=0,
                                            extra_body={"min_tokens": 20})
    assert longer.usage.completion_tokens >= 20
    answer = client.chat.completions.create(model=MODEL, messages=WEATHER_QUESTION, max_tokens=30, temperature=0)
    ids = tokenizer.encode(answer.choices[0].message.content, add_special_tokens=False)
    stopped = client.chat.completions.create(model=MODEL, messages=WEATHER_QUESTION, max_tokens=30, temperature=0,
                                             extra_body={"stop_token_ids": [ids[3]]})
    assert stopped.usage.completion_tokens == 4
    word = answer.choices[0].message.content.split()[2]
    kept = client.chat.completions.create(model=MODEL, messages=WEATHER_QUESTION, max_tokens=30, temperature=0,
                                          stop=[word], extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].message.content.endswith(word)
    penalised = client.chat.completions.create(
        model=MODEL, messages=WEATHER_QUESTION, max_tokens=30, temperature=0,
        extra_body={"repetition_penalty": 1.8, "min_p": 0.05})
    assert penalised.choices[0].message.content != answer.choices[0].message.content


# --- what is refused, and how ---------------------------------------------------------------


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": {"type": "json_object"}, "alignment": {"strategy": "blockwise"}}, "response_format"),
    ({"tools": [WEATHER], "tool_choice": "required", "alignment": {"strategy": "speculative_rejection"}},
     "tool_choice"),
    ({"logprobs": True, "alignment": {"strategy": "self_refine"}}, "logprobs"),
    ({"min_tokens": 5, "alignment": {"strategy": "blockwise"}}, "min_tokens"),
    ({"logit_bias": {"999999": 5}}, "logit_bias"),
    ({"stop_token_ids": [10 ** 7]}, "stop_token_ids"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]}, "tool_choice"),
    ({"logit_bias": {"12": 1}, "alignment": {"strategy": "correct", "corrector": "banana-lm"}},
     "alignment.corrector"),
])
def test_refused_combinations_name_the_parameter(server, body, param):
    request = {"model": MODEL, "messages": WEATHER_QUESTION, "max_tokens": 8, **body}
    reply = httpx.post(f"{server.v1}/chat/completions", json=request, headers=server.headers(), timeout=120)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param or (param == "tool_choice" and error["param"] is None
                                       and "tool_choice" in error["message"]), error


# --- the Responses API ----------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_responses_api_text_in_text_out(client, strategy):
    settings = sampling(strategy)
    seed = {"seed": settings.pop("seed")} if "seed" in settings else {}  # an extension the SDK does not know
    if strategy == "best_of_n":
        # At 0.8 the 135M model names a landmark instead of Paris on some CPUs (AVX2: "L'Etoile de
        # France ..."); this checks the Responses API under best-of-N, not the model's sampling.
        settings["temperature"] = 0.3
    response = client.responses.create(model=MODEL, input="What is the capital of France?", max_output_tokens=24,
                                       instructions="Answer in one sentence.", **settings,
                                       extra_body={"alignment": ALIGN[strategy], **seed})
    assert response.object == "response" and response.status in ("completed", "incomplete")
    assert "Paris" in response.output_text
    assert response.usage.output_tokens > 0 and response.usage.input_tokens > 10
    assert response.model_extra["alignment"]["strategy"] == strategy


def test_responses_api_streams_events_the_sdk_reads(client):
    deltas, final = [], None
    with client.responses.stream(model=MODEL, input="What is the capital of France?", max_output_tokens=24,
                                 temperature=0) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert len(deltas) > 1 and "".join(deltas) == final.output_text and "Paris" in final.output_text


def test_responses_api_structured_text_and_function_calls(client):
    parsed = client.responses.parse(model=MODEL, input="Name a large city and its population.", text_format=City,
                                    max_output_tokens=80, temperature=0)
    assert isinstance(parsed.output_parsed, City)
    tool = {"type": "function", **WEATHER["function"]}
    called = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[tool],
                                     tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60,
                                     temperature=0)
    (call,) = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["unit"] in ("c", "f")
    answered = client.responses.create(model=MODEL, max_output_tokens=30, temperature=0, input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "It is 31 degrees and sunny."}])
    assert answered.output_text


# --- LangChain and instructor ----------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(server, strategy, method):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=server.v1, api_key=server.api_key or "unused", max_tokens=80,
                     max_retries=0, timeout=300, extra_body={"alignment": ALIGN[strategy]}, **sampling(strategy))
    city = llm.with_structured_output(City, method=method).invoke("Name a large city and its population.")
    assert isinstance(city, City) and city.name


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_langchain_bind_tools(server, strategy):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=server.v1, api_key=server.api_key or "unused", max_tokens=60,
                     max_retries=0, timeout=300, extra_body={"alignment": ALIGN[strategy]}, **sampling(strategy))
    message = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("What is the weather in Paris?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mode", ["JSON", "TOOLS"])
def test_instructor_modes(client, strategy, mode):
    import instructor
    from instructor.core.exceptions import IncompleteOutputException, InstructorRetryException

    patched = instructor.from_openai(client, mode=getattr(instructor.Mode, mode))
    try:
        city = patched.chat.completions.create(
            model=MODEL, messages=CITY, response_model=City, max_tokens=200, max_retries=2, **sampling(strategy),
            extra_body={"alignment": ALIGN[strategy]})
    except InstructorRetryException as exc:
        # TOOLS mode sends the schema as a named tool (a grammar) and must succeed. JSON mode
        # asks for `json_object` and puts the schema only in the prompt, which the 135M model
        # often ignores when sampling: what the server guarantees there is a JSON object.
        assert mode == "JSON" and strategy == "best_of_n", exc
        assert all(isinstance(json.loads(a.completion.choices[0].message.content), dict) for a in exc.failed_attempts)
        return
    except IncompleteOutputException as exc:
        # The same mode when a sampled object runs past max_tokens: the answer is cut, so it is
        # a JSON prefix, and the server says so with finish_reason "length".
        assert mode == "JSON" and strategy == "best_of_n", exc
        choice = exc.last_completion.choices[0]
        assert choice.finish_reason == "length" and choice.message.content.lstrip().startswith("{")
        return
    assert isinstance(city, City) and city.name


def test_openai_error_type_reaches_the_sdk(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=WEATHER_QUESTION, response_format={"type": "json_object"},
                                       max_tokens=5, extra_body={"alignment": {"strategy": "blockwise"}})
    assert info.value.body["param"] == "response_format"
