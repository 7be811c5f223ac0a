"""The HTTP layer over a fake engine: routing, envelopes, streaming format, auth."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from server.app import build_app
from server.config import ServerConfig
from tests.fakes import FakeEngine

MESSAGES = [{"role": "user", "content": "hello there"}]


def make_client(engine=None, **config):
    engine = engine or FakeEngine()
    app = build_app(engine, ServerConfig(served_model_name="fake-model", **config), start_engine=False)
    return TestClient(app), engine


def sse_events(text: str) -> list:
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_chat_completion_counts_usage_from_the_engine():
    client, engine = make_client()
    r = client.post("/v1/chat/completions", json={"model": "fake-model", "messages": MESSAGES, "max_tokens": 3, "n": 2, "seed": 1})
    assert r.status_code == 200
    body = r.json()
    assert [c["message"]["content"] for c in body["choices"]] == ["w0_0 w0_1 w0_2 ", "w1_0 w1_1 w1_2 "]
    prompt_len = len(engine.calls[0][1])
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 6, "total_tokens": prompt_len + 6,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert engine.calls[0][2].n == 2 and engine.calls[0][2].seed == 1


def test_missing_max_tokens_takes_the_rest_of_the_context():
    client, engine = make_client(FakeEngine(max_model_len=12))
    r = client.post("/v1/chat/completions", json={"model": "fake-model", "messages": MESSAGES})
    assert r.status_code == 200
    assert engine.calls[0][2].max_tokens == 12 - len(engine.calls[0][1])


def test_stream_format_with_usage():
    client, _ = make_client()
    r = client.post(
        "/v1/chat/completions",
        json={"model": "fake-model", "messages": MESSAGES, "max_tokens": 2, "stream": True,
              "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2},
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"]["content"] for e in events[1:-2]] == ["w0_0 ", "w0_1 "]
    # The finish reason comes in its own chunk once the strategy has reported.
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["choices"][0]["delta"]["content"] is None
    assert events[-1]["alignment"]["strategy"] == "none"
    assert len(events[1]["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2
    assert all(e["id"] == events[0]["id"] for e in events)


def test_stream_without_include_usage_omits_the_field():
    client, _ = make_client()
    r = client.post("/v1/chat/completions", json={"model": "fake-model", "messages": MESSAGES, "max_tokens": 1, "stream": True})
    assert all("usage" not in e for e in sse_events(r.text))


def test_multi_prompt_completion_indexes_prompt_major():
    client, engine = make_client()
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": ["a b", "c"], "max_tokens": 1, "n": 2, "seed": 0})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
    assert r.json()["usage"]["prompt_tokens"] == 3
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": ["a b", "c"], "max_tokens": 2, "stream": True})
    events = sse_events(r.text)
    texts = {}
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert texts == {0: "w0_0 w0_1 ", 1: "w0_0 w0_1 "}


def test_completion_default_max_tokens_is_16():
    client, engine = make_client(FakeEngine(max_model_len=100))
    client.post("/v1/completions", json={"model": "fake-model", "prompt": "a"})
    assert engine.calls[0][2].max_tokens == 16


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"model": "other"}, "model", "model_not_found"),
        ({"n": 9}, "n", None),
        ({"n": 2, "temperature": 0}, "n", None),
        ({"max_tokens": 61}, "max_tokens", "context_length_exceeded"),
        ({"messages": [{"role": "user", "content": "x " * 80}]}, "messages", "context_length_exceeded"),
    ],
)
def test_invalid_requests_are_400_without_reaching_the_engine(body, param, code):
    client, engine = make_client()
    r = client.post("/v1/chat/completions", json={"model": "fake-model", "messages": MESSAGES, **body})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param
    if code:
        assert r.json()["error"]["code"] == code
    assert engine.calls == []


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/chat/completions", {"messages": MESSAGES, "stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
        ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
        ("/v1/completions", {"prompt": "x", "echo": True, "stream": True}, "echo"),
        ("/v1/completions", {"prompt": "x", "alignment": {"strategy": "best_of_n"}}, "alignment"),
    ],
)
def test_a_setting_that_needs_another_names_itself_in_the_400(path, body, param):
    client, engine = make_client()
    r = client.post(path, json={"model": "fake-model", "max_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert r.json()["error"]["message"].startswith(f"{param}: ")
    assert engine.calls == []


def test_completion_token_ids_outside_the_vocabulary_are_400():
    client, engine = make_client()
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": [1, 5000]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_not_ready_engine_gives_503():
    client, _ = make_client(FakeEngine(ready=False))
    assert client.get("/ready").status_code == 503
    assert client.get("/health").status_code == 200
    r = client.post("/v1/chat/completions", json={"model": "fake-model", "messages": MESSAGES})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"


def test_api_key_guards_everything_but_health():
    client, _ = make_client(api_key="k")
    assert client.get("/health").status_code == 200
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer x"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "k"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200


def test_method_not_allowed_uses_the_envelope():
    client, _ = make_client()
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_metrics_count_requests_by_status():
    client, _ = make_client()
    client.post("/v1/chat/completions", json={"model": "fake-model", "messages": MESSAGES, "max_tokens": 1})
    client.post("/v1/chat/completions", json={"model": "bad", "messages": MESSAGES})
    text = client.get("/metrics").text
    assert 'aligner_requests_total{endpoint="chat_completions",status="200"} 1.0' in text
    assert 'aligner_requests_total{endpoint="chat_completions",status="400"} 1.0' in text
    assert "aligner_engine_unfinished_requests 0.0" in text


def test_best_of_n_over_the_fake_engine_picks_by_reward():
    client, engine = make_client()
    body = {"model": "fake-model", "messages": MESSAGES, "max_tokens": 2, "seed": 0,
            "alignment": {"strategy": "best_of_n", "n": 5, "reward": "keyword:w3_0", "return_candidates": True}}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "w3_0 w3_1 "
    assert body["alignment"]["selected"] == [3]
    assert engine.calls[0][2].n == 5
    assert body["usage"]["completion_tokens"] == 10


def test_alias_header_and_unknown_param_on_the_fake_engine():
    client, engine = make_client()
    r = client.post("/v1/chat/completions", headers={"X-Alignment-Strategy": "best_of_n"},
                    json={"model": "fake-model@none", "messages": MESSAGES, "max_tokens": 1, "seed": 0,
                          "alignment": {"reward": "keyword:w1_0", "n": 3}})
    assert r.json()["alignment"]["strategy"] == "best_of_n" and r.json()["alignment"]["source"] == "header"
    r = client.post("/v1/chat/completions", json={"model": "fake-model", "messages": MESSAGES,
                                                  "alignment": {"strategy": "none", "n": 3}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "alignment.n"
    r = client.post("/v1/completions", json={"model": "fake-model@best_of_n", "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_best_of_n_without_any_reward_model_asks_for_one():
    client, _ = make_client()
    r = client.post("/v1/chat/completions", json={"model": "fake-model", "messages": MESSAGES,
                                                  "alignment": {"strategy": "best_of_n"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "alignment.reward"


def test_streamed_best_of_n_sends_keepalives_while_deciding():
    engine = FakeEngine()
    engine.step_delay = 0.05
    client, _ = make_client(engine, stream_keepalive_s=0.02)
    body = {"model": "fake-model", "messages": MESSAGES, "max_tokens": 4, "seed": 0, "stream": True,
            "alignment": {"strategy": "best_of_n", "n": 3, "reward": "keyword:w2_1"}}
    r = client.post("/v1/chat/completions", json=body)
    assert ": keep-alive" in r.text
    events = sse_events(r.text)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == "w2_0 w2_1 w2_2 w2_3 "
    assert events[-1]["alignment"]["selected"] == [2]


def test_the_guide_length_limit_is_checked_on_the_prompt_a_prompt_stage_wrote():
    """A URIAL stage lengthens the prompt after the request was checked: the guided stage
    re-checks on the prompt it decodes, cutting the answer budget to the guide's limit, or
    refusing with 400 when the prompt alone is too long (never decoding it unguided)."""
    from decoding.guide_spec import GuideCatalog

    def ask(max_len: int):
        engine = FakeEngine(max_model_len=100_000)
        guides = GuideCatalog({"g": {"path": "unused", "mode": "genarm"}}, max_slots=2, max_len=max_len)
        app = build_app(engine, ServerConfig(served_model_name="fake-model"), guides=guides, start_engine=False)
        alignment = {"pipeline": [{"strategy": "urial"}, {"strategy": "guided"}]}
        body = {"model": "fake-model", "messages": MESSAGES, "max_tokens": 8, "alignment": alignment}
        return TestClient(app).post("/v1/chat/completions", json=body), engine

    r, engine = ask(max_len=10_000)
    assert r.status_code == 200, r.text
    (_, staged_prompt, sampling), = engine.calls
    assert sampling.max_tokens == 8 and sampling.extra_args["aligner_guide"]["guide"] == "g"
    assert r.json()["alignment"]["guided_steps"] == 8
    # Room for 3 answer tokens after the URIAL prompt: the budget shrinks to fit the guide.
    r, engine = ask(max_len=len(staged_prompt) + 3)
    assert r.status_code == 200 and engine.calls[0][2].max_tokens == 3
    r, engine = ask(max_len=len(staged_prompt) - 1)
    assert r.status_code == 400 and r.json()["error"]["param"] == "alignment.guide"
    assert "guide" in r.json()["error"]["message"] and not engine.calls


def test_what_the_engine_could_not_guide_comes_back_with_its_last_chunk():
    """The engine returns a guided request's reports with the finished chunk; the answer counts
    the steps the guide did not shape out and names why."""
    from decoding.guide_spec import GuideCatalog

    engine = FakeEngine(max_model_len=100_000)
    engine.guide_reports = [{"guided_steps": 5, "unguided_steps": 3, "lagged_steps": 3, "reason": "lagged"}]
    guides = GuideCatalog({"g": {"path": "unused", "mode": "genarm"}}, max_slots=2, max_len=10_000)
    app = build_app(engine, ServerConfig(served_model_name="fake-model"), guides=guides, start_engine=False)
    body = {"model": "fake-model", "messages": MESSAGES, "max_tokens": 8, "alignment": {"strategy": "guided"}}
    report = TestClient(app).post("/v1/chat/completions", json=body).json()["alignment"]
    assert report["guided_steps"] == 5 and report["unguided_reasons"] == ["lagged"]


def test_a_failed_start_is_one_short_line_on_ready_with_its_kind_not_its_text():
    engine = FakeEngine(ready=False)
    engine.start_error = RuntimeError("CUDA out of memory at /srv/models/policy\n" + "Traceback line\n" * 50)
    client, _ = make_client(engine)
    message = client.get("/ready").json()["error"]["message"]
    assert message == "the engine failed to start (RuntimeError; the server log has the detail)"
    # Our own start failures are written for the operator: the self-check's figures are quoted.
    from decoding.self_check import SelfCheckFailed

    engine.start_error = SelfCheckFailed("numerics self-check failed, not serving: engine FAILED in float32: 12%")
    message = client.get("/ready").json()["error"]["message"]
    assert message == ("the engine failed to start (SelfCheckFailed): numerics self-check failed, not serving: "
                       "engine FAILED in float32: 12%")


def test_exposure_warning_only_beyond_loopback_without_a_key():
    from server.serve import exposure_warning

    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("localhost", None) is None
    assert exposure_warning("0.0.0.0", "k") is None
    assert "without an API key" in exposure_warning("0.0.0.0", None)


def test_tokenizing_a_long_prompt_does_not_stall_other_requests():
    import asyncio
    import time

    import httpx

    class SlowTokenizer(type(FakeEngine().tokenizer)):
        def encode_chat(self, messages, tools=None):
            time.sleep(0.5)  # a very long prompt
            return super().encode_chat(messages, tools)

    engine = FakeEngine()
    engine.tokenizer.__class__ = SlowTokenizer
    app = build_app(engine, ServerConfig(served_model_name="fake-model"), start_engine=False)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            started = time.monotonic()
            chat = asyncio.create_task(http.post("/v1/chat/completions", json={
                "model": "fake-model", "messages": MESSAGES, "max_tokens": 2}))
            await asyncio.sleep(0.05)  # the chat request is being tokenized now
            health = await http.get("/health")
            return health, time.monotonic() - started, await chat

    health, waited, chat = asyncio.run(scenario())
    assert health.status_code == 200 and waited < 0.3, waited  # answered while the prompt was tokenized
    assert chat.status_code == 200


def test_the_server_token_cap_bounds_every_endpoint_and_is_reported():
    client, engine = make_client(max_request_tokens=5, max_request_seconds=None)
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "hi", "max_tokens": 40, "n": 2,
                                             "ignore_eos": True, "seed": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 5 + 1  # one token per choice per step
    assert [c["finish_reason"] for c in r.json()["choices"]] == ["length", "length"]
    r = client.post("/v1/chat/completions", json={
        "model": "fake-model", "messages": MESSAGES, "max_tokens": 40, "ignore_eos": True, "seed": 3,
        "alignment": {"strategy": "best_of_n", "n": 3, "reward": "length_penalty", "max_total_tokens": 50}})
    body = r.json()
    assert body["usage"]["completion_tokens"] <= 5 + 2
    budget = body["alignment"]["budget"]
    assert (budget["max_total_tokens"], budget["exhausted"], budget["deadline_s"]) == (5, "max_total_tokens", None)
    metrics = client.get("/metrics").text
    assert 'aligner_budget_exhausted_total{limit="max_total_tokens",strategy="best_of_n"} 1.0' in metrics


class SlowStartEngine(FakeEngine):
    """Records when each start begins and ends."""

    def __init__(self, name: str, log: list):
        super().__init__(ready=False)
        self.model_name, self.log = name, log

    async def start(self) -> None:
        import asyncio

        self.log.append(("begin", self.model_name))
        await asyncio.sleep(0.05)
        self.log.append(("end", self.model_name))
        await super().start()


@pytest.mark.parametrize("in_turn", [True, False])
def test_engines_start_one_after_another_when_asked(in_turn):
    log: list = []
    helpers = {"h1": SlowStartEngine("h1", log), "h2": SlowStartEngine("h2", log)}
    app = build_app(SlowStartEngine("policy", log), ServerConfig(served_model_name="fake-model",
                                                                  start_engines_in_turn=in_turn), helpers=helpers)
    with TestClient(app):
        import time

        for _ in range(200):
            if len(log) == 6:
                break
            time.sleep(0.01)
    in_turn_log = [("begin", "policy"), ("end", "policy"), ("begin", "h1"), ("end", "h1"), ("begin", "h2"), ("end", "h2")]
    assert (log == in_turn_log) is in_turn
    assert sorted(log) == sorted(in_turn_log)


def test_memory_shares_add_up_to_the_server_total():
    from server.serve import memory_shares

    for total in (None, 0.5, 0.95):
        for helpers in range(8):
            policy, helper = memory_shares(total, helpers)
            assert policy + helper * helpers == pytest.approx(total or 0.9)
            assert policy >= (total or 0.9) / 2 - 1e-3  # helpers never take more than half


def test_reward_queues_are_a_gauge_per_reward_model():
    import threading

    from aligner.rewards import RewardRegistry
    from aligner.rewards.base import Reward

    release = threading.Event()

    class Stuck(Reward):
        name, kind, description = "stuck", "model", "waits for the test"

        def score(self, prompts, responses):
            release.wait(5)
            return [0.0] * len(responses)

    rewards = RewardRegistry.with_builtins()
    rewards.add(Stuck())
    app = build_app(FakeEngine(), ServerConfig(served_model_name="fake-model"), rewards, start_engine=False)
    with TestClient(app) as client:
        assert "aligner_reward_pending" in client.get("/metrics").text
        import asyncio

        async def two_calls():
            calls = [asyncio.ensure_future(rewards.score({"stuck": 1.0}, [], ["a"])) for _ in range(2)]
            await asyncio.sleep(0.2)
            text = client.get("/metrics").text
            release.set()
            await asyncio.gather(*calls)
            return text

        text = asyncio.run(two_calls())
    assert 'aligner_reward_pending{reward="stuck"} 2.0' in text
