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
    """Stands in for a vLLM parser: each `CALL name {json}` after the content is a call. Its
    streaming mode sends content up to a `C` that may begin a call, then a call's name once
    its `{` arrives and its arguments as they come, as vLLM's Hermes parser does."""

    def parse(self, text, model, messages, tools):
        if "CALL " not in text:
            return ParsedAnswer(text)
        content, *calls = text.split("CALL ")
        return ParsedAnswer(content or None, [tuple(call.strip().split(" ", 1)) for call in calls])

    def streaming(self, model, messages, tools):
        return MarkerStream()


class MarkerStream:
    def __init__(self):
        self.text, self.content_sent, self.args_sent = "", 0, {}

    def feed(self, text, token_ids=()):
        from decoding.tool_parsing import CallPiece

        self.text += text
        head, *calls = self.text.split("CALL ")
        end = len(head) if calls else (head.rfind("C") if "C" in head else len(head))  # hold a possible "CALL"
        content, self.content_sent = self.text[self.content_sent:end], max(self.content_sent, end)
        pieces = []
        for i, call in enumerate(calls):
            if "{" not in call:
                continue
            name, args = call.split(" ", 1)[0], call[call.index("{"):].rstrip()
            if i not in self.args_sent:
                pieces.append(CallPiece(i, f"call_{i}", name, ""))
                self.args_sent[i] = 0
            if len(args) > self.args_sent[i]:
                pieces.append(CallPiece(i, None, None, args[self.args_sent[i]:]))
                self.args_sent[i] = len(args)
        return content or None, pieces


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


def merged(deltas) -> list[tuple[str, str, str]]:
    """Streamed tool-call deltas as a client merges them: (id, name, arguments) per index,
    checking OpenAI's layout (id, type and name on a call's first delta only)."""
    calls: dict[int, list[str]] = {}
    for d in deltas:
        if d.index not in calls:
            assert d.id and d.type == "function" and d.function.name, d
            calls[d.index] = [d.id, d.function.name, d.function.arguments or ""]
        else:
            assert d.id is None and d.function.name is None, d
            calls[d.index][2] += d.function.arguments or ""
    assert sorted(calls) == list(range(len(calls)))
    return [tuple(calls[i]) for i in sorted(calls)]


def stream_pieces(stream: ToolCallStream, pieces, finish_reason="stop", index=0):
    """Feeds pieces; returns (per-piece deltas, content, finish delta's calls too, finish reason)."""
    steps = [stream.delta(index, piece) for piece in pieces]
    last, reason = stream.finish(index, finish_reason)
    deltas = [c for step in [*steps, last] if step is not None for c in step.tool_calls or []]
    content = "".join(step.content or "" for step in [*steps, last] if step is not None)
    return steps, content, deltas, reason


LISTS = [  # (kind, text): the grammar's compact envelope, and vLLM's `required` layout with whitespace
    ("auto", '[{"name":"get_weather","arguments":{"city":"Oslo, \\"the {capital}\\""}},{"name":"get_time","arguments":{}}]'),
    ("required", json.dumps([{"name": "get_weather", "parameters": {"city": "Bergen", "days": [1, {"a": "]}"}]}},
                             {"name": "get_time", "parameters": {}}], indent=2)),
]


def test_streamed_lists_of_calls_send_each_call_then_its_arguments_as_they_decode():
    for kind, text in LISTS:
        for size in (1, 3, 7, len(text)):  # token-sized pieces, and the whole answer at once
            req = request() if kind == "auto" else request(tool_choice="required")
            pieces = [text[i:i + size] for i in range(0, len(text), size)]
            # `required` is held to its grammar even on a server with a parser for `auto`
            steps, content, deltas, reason = stream_pieces(
                ToolCallStream(req, MarkerParser() if kind == "required" else None), pieces)
            key = "arguments" if kind == "auto" else "parameters"
            want = [(item["name"], item[key]) for item in json.loads(text)]
            got = merged(deltas)
            assert [(name, json.loads(args)) for _, name, args in got] == want, (size, got)
            assert reason == "tool_calls" and content == ""
            if size < len(text):  # arguments arrive before the answer ends, not at the finish
                first_args = next(i for i, step in enumerate(steps) if step and any(
                    d.function.arguments for d in step.tool_calls))
                assert first_args < len(pieces) - 1


def test_a_call_is_announced_only_once_its_name_has_ended():
    stream = ToolCallStream(request())
    assert stream.delta(0, '[{"name":"get_wea') is None  # the name is not whole yet
    (head,) = stream.delta(0, 'ther","arguments":{"ci').tool_calls
    assert (head.index, head.function.name, head.function.arguments) == (0, "get_weather", '{"ci')
    (more,) = stream.delta(0, 'ty":"Oslo"}}').tool_calls
    assert (more.id, more.function.arguments) == (None, 'ty":"Oslo"}')
    assert stream.delta(0, "]") is None and stream.finish(0, "stop") == (None, "tool_calls")


def test_a_list_cut_by_max_tokens_keeps_what_was_sent_and_says_length():
    _, content, deltas, reason = stream_pieces(ToolCallStream(request()), ['[{"name":"get_time","argu', 'ments":{"tz":"U'],
                                               finish_reason="length")
    assert reason == "length" and content == ""
    assert merged(deltas)[0][1:] == ("get_time", '{"tz":"U')
    # Cut before any call had its name: nothing went out as a call, so the text is content.
    _, content, deltas, reason = stream_pieces(ToolCallStream(request()), ['[{"name":"get_ti'], finish_reason="length")
    assert (content, deltas, reason) == ('[{"name":"get_ti', [], "length")


def test_auto_answers_read_by_a_parser_stream_through_its_streaming_mode():
    stream = ToolCallStream(request(), MarkerParser())
    steps, content, deltas, reason = stream_pieces(stream, ["Hm. ", "C", "ALL get_time ", '{"tz": ', '"UTC"}'], index=1)
    assert content == "Hm. " and reason == "tool_calls"
    assert [step and step.content for step in steps[:2]] == ["Hm. ", None]  # "C" held back: it may begin a call
    assert merged(deltas) == [("call_0", "get_time", '{"tz": "UTC"}')]
    assert sum(bool(d.function.arguments) for d in deltas) == 2  # the arguments in two pieces
    # What the stream held back goes out at the finish: here a trailing "C" that began no call.
    tail = ToolCallStream(request(), MarkerParser())
    _, content, deltas, reason = stream_pieces(tail, ["It is 5 C"])
    assert (content, deltas, reason) == ("It is 5 C", [], "stop")
    one = ToolCallStream(request(parallel_tool_calls=False), MarkerParser())
    _, _, deltas, _ = stream_pieces(one, ["CALL get_time {} CALL get_weather {", '"city": "Oslo"} '])
    assert [name for _, name, _ in merged(deltas)] == ["get_time"]  # one call, as the answer keeps
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


def test_a_streamed_grammar_auto_answer_streams_a_message_as_content():
    held = ToolCallStream(request())
    assert held.delta(0, "") is None and held.delta(0, "It").content == "It"  # empty: nothing to decide on
    stream = ToolCallStream(request())
    assert stream.delta(0, "It is").content == "It is" and stream.delta(0, " [sunny]").content == " [sunny]"
    assert stream.finish(0, "stop") == (None, "stop")
    calls = ToolCallStream(request())
    assert calls.delta(1, '[{"name":"get_time",').tool_calls[0].function.name == "get_time"
    assert calls.delta(1, '"arguments":{}}]').tool_calls[0].function.arguments == "{}"
    assert calls.finish(1, "stop") == (None, "tool_calls")


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


def test_well_formed_answers_are_whole_calls_whose_arguments_follow_their_schemas():
    from server.tools import well_formed

    assert well_formed(request(tool_choice="none")) is None  # no tools: nothing to check
    auto = well_formed(request())
    assert auto('[{"name":"get_weather","arguments":{"city":"Oslo"}}]', "stop")
    assert auto("It is sunny.", "stop") and auto("It is sun", "length")  # a message, whole or not
    assert not auto('[{"name":"get_weather","argu', "length")  # a list of calls cut short
    parsed = well_formed(request(), MarkerParser())
    assert parsed('Sure. CALL get_weather {"city": "Oslo"}', "stop")
    assert not parsed('CALL get_weather {"town": "Oslo"}', "stop")  # `city` is required
    assert not parsed('CALL get_weather {"city": 7}', "stop")  # not a string
    assert not parsed('CALL get_weather {"city": "Os', "length") and not parsed("CALL launch {}", "stop")
    named = well_formed(request(tool_choice=NAMED))
    assert named('{"city": "Oslo"}', "stop") and not named('{"city": "Os', "length")
    required = well_formed(request(tool_choice="required"))
    assert required('[{"name": "get_time", "parameters": {}}]', "stop") and not required("[", "length")


class TwoCallsLM:
    """`required` calls, a JSON token per token (the fake tokenizer joins them by spaces):
    sample 0 writes whole JSON whose `city` is a number (and an exclamation mark the reward
    likes); sample 1 a valid call."""

    TOKENS = ('[ { "name" : "get_weather" , "parameters" : { "city" : 7 , "mood" : "!" } } ]'.split(),
              '[ { "name" : "get_weather" , "parameters" : { "city" : "Oslo" } } ]'.split())

    def next_token(self, draw):
        tokens = self.TOKENS[draw.index % 2]
        return tokens[draw.step] if draw.step < len(tokens) else None

    def top_logprobs(self, draw, token, k):
        return -0.5, ()


def test_best_of_n_prefers_a_valid_call_before_the_reward_compares():
    from aligner.rewards import RewardRegistry

    rewards = RewardRegistry.with_builtins()
    rewards.add_from_spec("bang=regex:!")
    client = TestClient(build_app(FakeEngine(max_model_len=512, lm=TwoCallsLM()),
                                  ServerConfig(served_model_name="fake-model"), rewards, start_engine=False))
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER],
            "tool_choice": "required", "max_tokens": 80, "temperature": 0.8,
            "alignment": {"strategy": "best_of_n", "n": 2, "reward": "bang", "return_candidates": True}}
    # The fake's `required` grammar is not enforced, so sample 0's bad argument stands; it
    # scores higher (its "!"), and still loses: its call does not follow the tool's schema.
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    report = reply.json()["alignment"]
    scores = {c["index"]: c["score"] for c in report["candidates"]}
    assert scores[0] > scores[1] and report["ill_formed"] == [0] and report["selected"] == [1]
    (call,) = reply.json()["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}


def test_json_answers_are_well_formed_when_whole_and_valid_under_their_schema():
    from server.tools import well_formed

    def req(**kw):
        return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "json?"}], **kw)

    assert well_formed(req()) is None and well_formed(req(response_format={"type": "text"})) is None
    assert well_formed(req(structured_outputs={"regex": "a+"})) is None  # not JSON: nothing to check
    obj = well_formed(req(response_format={"type": "json_object"}))
    assert obj('{"name": "Oslo"}', "stop") and not obj('{"name": "Os', "length") and not obj("[1]", "stop")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    strict = well_formed(req(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}))
    assert strict('{"n": 3}', "stop") and not strict('{"n": "3"}', "stop") and not strict("{}", "stop")
    assert well_formed(req(structured_outputs={"json": schema}))('{"n": 1}', "stop")


class StrictMarkerParser(MarkerParser):
    """MarkerParser whose finished parse, like vLLM's, finds no call when arguments are not JSON."""

    def parse(self, text, model, messages, tools):
        parsed = super().parse(text, model, messages, tools)
        try:
            [json.loads(args) for _, args in parsed.calls]
        except ValueError:
            return ParsedAnswer(text)
        return parsed


def test_a_parser_call_that_never_parses_is_not_followed_by_its_text_and_is_not_well_formed():
    from server.tools import well_formed

    stream = ToolCallStream(request(), StrictMarkerParser())
    _, content, deltas, reason = stream_pieces(stream, ["Ok. CALL get_time ", '{"tz": "U'], finish_reason="length")
    assert content == "Ok. " and merged(deltas)[0][1:] == ("get_time", '{"tz": "U') and reason == "length"
    check = well_formed(request(), StrictMarkerParser())
    assert check("Ok.", "stop") and not check('Ok. CALL get_time {"tz": "U', "length")  # a call begun, cut


def test_the_rails_refusal_after_streamed_calls_is_content_and_ends_the_choice():
    stream = ToolCallStream(request())
    assert stream.delta(0, '[{"name":"get_time","arguments":{"tz":"').tool_calls
    refusal = stream.delta(0, " I can't help with that.", (), "content_filter")
    assert refusal.content == " I can't help with that." and not refusal.tool_calls
    assert stream.finish(0, "content_filter") == (None, "content_filter")


def test_schemas_that_cannot_be_checked_never_fail_the_request():
    from server.tools import _fits

    missing_ref = {"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}
    assert _fits('{"x": 1}', missing_ref)  # logged, counted as well formed
    assert not _fits("[" * 100_000, {"type": "object"})  # too deep to parse: not well formed, no RecursionError
