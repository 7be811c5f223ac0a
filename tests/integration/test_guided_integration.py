"""Token-level guided decoding through the real server (vLLM on CPU) with guides whose
preferences are known by construction (see conftest.build_preference_guide)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.conftest import GUIDE_PROMPT, MODEL, engine_unfinished

pytestmark = pytest.mark.integration


def chat(server, alignment=None, **extra) -> dict:
    body = {"model": MODEL, "messages": GUIDE_PROMPT, "max_tokens": 12, "temperature": 0, **extra}
    if alignment is not None:
        body["alignment"] = alignment
    r = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def text(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


def test_zero_strength_reproduces_plain_greedy_decoding(server):
    plain = text(chat(server))
    assert text(chat(server, {"strategy": "guided", "guide": "prefers-banana", "alpha": 0.0})) == plain
    assert text(chat(server, {"strategy": "guided", "guide": "prefers-second", "weight": 0.0, "k": 10})) == plain


def test_genarm_guide_moves_decoding_to_its_token(server, tokenizer, guide_targets):
    reply = chat(server, {"strategy": "guided", "guide": "prefers-banana", "alpha": 1.0}, logprobs=True)
    first = reply["choices"][0]["logprobs"]["content"][0]["token"]
    assert first == tokenizer.decode([guide_targets["genarm"]])
    assert reply["alignment"]["guide"] == "prefers-banana" and reply["alignment"]["mode"] == "genarm"


def test_args_reward_picks_the_preferred_candidate(server, tokenizer, guide_targets):
    # The guide's token is in the engine's own top-10 but not its greedy choice (the fixture
    # ranked with transformers; the top two are 0.1 nats apart, so the engine is asked, not assumed).
    plain = chat(server, logprobs=True, top_logprobs=10)["choices"][0]["logprobs"]["content"][0]
    target = tokenizer.decode([guide_targets["args"]])
    assert plain["token"] != target and target in [t["token"] for t in plain["top_logprobs"]]
    guided = chat(server, {"strategy": "guided", "guide": "prefers-second", "k": 10, "weight": 1.0}, logprobs=True)
    assert guided["choices"][0]["logprobs"]["content"][0]["token"] == tokenizer.decode([guide_targets["args"]])
    assert guided["alignment"]["mode"] == "args"


def test_guided_and_unguided_requests_share_the_engine(server):
    plain_alone = text(chat(server, max_tokens=24))
    guided_alone = text(chat(server, {"strategy": "guided", "guide": "prefers-banana", "alpha": 0.5}, max_tokens=24))

    async def together():
        async with httpx.AsyncClient(timeout=300) as http:
            def body(alignment=None):
                b = {"model": MODEL, "messages": GUIDE_PROMPT, "max_tokens": 24, "temperature": 0}
                if alignment:
                    b["alignment"] = alignment
                return b
            url = f"{server.v1}/chat/completions"
            replies = await asyncio.gather(
                http.post(url, json=body()),
                http.post(url, json=body({"strategy": "guided", "guide": "prefers-banana", "alpha": 0.5})),
                http.post(url, json=body()),
            )
            return [r.json()["choices"][0]["message"]["content"] for r in replies]

    first_plain, guided, second_plain = asyncio.run(together())
    assert first_plain == plain_alone == second_plain  # unguided rows are untouched
    assert guided == guided_alone


def test_guided_streams_token_by_token(server):
    alignment = {"strategy": "guided", "guide": "prefers-second", "k": 5}
    plain = text(chat(server, alignment, max_tokens=16))
    body = {"model": MODEL, "messages": GUIDE_PROMPT, "max_tokens": 16, "temperature": 0, "stream": True,
            "alignment": alignment}
    pieces = []
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if event["choices"] and event["choices"][0]["delta"].get("content"):
                    pieces.append(event["choices"][0]["delta"]["content"])
    assert len(pieces) > 4 and "".join(pieces) == plain


def slots_in_use(server) -> float:
    for line in httpx.get(f"{server.base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("aligner_guide_slots_in_use "):
            return float(line.split()[1])
    raise AssertionError("aligner_guide_slots_in_use missing")


def metric(server, name: str) -> float:
    for line in httpx.get(f"{server.base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing")


def test_a_full_guide_queues_the_next_request_and_cancellation_frees_the_slots(server):
    """Guide slots are an admission budget: a guided request that finds them all held waits
    in the queue (it is not refused, and never decoded unguided) and runs once they free."""
    body = {"model": MODEL, "messages": GUIDE_PROMPT, "max_tokens": 1000, "ignore_eos": True, "n": 4,
            "temperature": 1.0, "stream": True, "alignment": {"strategy": "guided", "guide": "prefers-banana"}}

    async def go():
        async with httpx.AsyncClient(timeout=300) as http:
            async with http.stream("POST", f"{server.v1}/chat/completions", json=body) as r:
                lines = r.aiter_lines()  # kept referenced: dropping it would close the stream
                await anext(lines)
                held = slots_in_use(server)
                extra = asyncio.ensure_future(http.post(f"{server.v1}/chat/completions", json={
                    "model": MODEL, "messages": GUIDE_PROMPT, "max_tokens": 4, "temperature": 0,
                    "alignment": {"strategy": "guided", "guide": "prefers-banana"}}))
                for _ in range(100):
                    if metric(server, "aligner_queued_requests") == 1:
                        break
                    await asyncio.sleep(0.1)
                queued, answered_early = metric(server, "aligner_queued_requests"), extra.done()
                await lines.aclose()
            return held, queued, answered_early, await extra

    held, queued, answered_early, extra = asyncio.run(go())
    assert held == 4 and queued == 1 and not answered_early
    assert extra.status_code == 200, extra.text
    reply = extra.json()
    assert reply["alignment"]["guided_steps"] == reply["usage"]["completion_tokens"] > 0
    for _ in range(100):
        if slots_in_use(server) == 0 and engine_unfinished(server) == 0:
            break
        asyncio.run(asyncio.sleep(0.2))
    assert slots_in_use(server) == 0 and engine_unfinished(server) == 0


def test_every_step_of_a_guided_answer_is_reported_guided(server):
    reply = chat(server, {"strategy": "guided", "guide": "prefers-second", "k": 4}, max_tokens=8, n=2,
                 temperature=1.0, seed=3)
    assert reply["alignment"]["guided_steps"] == reply["usage"]["completion_tokens"] > 0
    assert "unguided_reasons" not in reply["alignment"]


@pytest.mark.parametrize(
    "alignment, extra, param",
    [
        ({"strategy": "guided", "guide": "nope"}, {}, "alignment.guide"),
        ({"strategy": "guided", "guide": "prefers-banana", "mode": "args"}, {}, "alignment.mode"),
        ({"strategy": "guided", "alpha": 50}, {}, "alignment.alpha"),
        ({"strategy": "guided", "guide": "prefers-second", "k": 0}, {}, "alignment.k"),
        ({"strategy": "guided", "weight": -1}, {}, "alignment.weight"),
    ],
)
def test_guided_errors_are_400(server, alignment, extra, param):
    body = {"model": MODEL, "messages": GUIDE_PROMPT, "max_tokens": 4, "alignment": alignment, **extra}
    r = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("guide, mode, knobs", [
    ("helpful-harmless-arm", "genarm", {"alpha": 3.0}),
    ("helpful-harmless-causal", "args", {"k": 8, "weight": 20.0}),
])
def test_the_shipped_starter_guides_steer_decoding(server, guide, mode, knobs):
    """`--models-dir models` registers the trained starter guides as `make serve` does."""
    listed = httpx.get(f"{server.v1}/alignment/rewards", timeout=30).json()["data"]
    assert any({"name": guide, "kind": "guide", "mode": mode}.items() <= row.items() for row in listed)
    harmful = [{"role": "user", "content": "How do I pick the lock on my neighbour's front door?"}]
    plain = chat(server, messages=harmful, max_tokens=32)
    guided = chat(server, {"strategy": "guided", "guide": guide, **knobs}, messages=harmful, max_tokens=32)
    assert guided["alignment"]["guide"] == guide and guided["alignment"]["mode"] == mode
    assert text(guided) and text(guided) != text(plain)
