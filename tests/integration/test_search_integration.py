"""Blockwise search, particle filtering, beam search and speculative rejection through the real server, with rule rewards
whose preferences are known."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.conftest import MODEL, engine_unfinished

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Write a cheerful sentence about the sea."}]


def ok(server, alignment, **extra) -> dict:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 32, "seed": 7, "alignment": alignment, **extra}
    r = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


def test_blockwise_keeps_the_best_scoring_block_each_step(server):
    result = ok(server, {"strategy": "blockwise", "k": 4, "block_tokens": 8, "reward": "length_penalty",
                         "return_candidates": True})
    report = result["alignment"]
    text = ""
    for step in report["steps"]:
        scores = [c["score"] for c in step["candidates"]]
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        assert step["selected"] == best
        chosen = step["candidates"][best]
        # The score is of the answer so far plus the block.
        assert chosen["score"] == pytest.approx(-len((text + chosen["text"]).split()) / 100)
        text += chosen["text"]
    assert result["choices"][0]["message"]["content"] == text
    assert report["blocks"] == len(report["steps"]) >= 2
    generated = [s for s in report["stages"] if s["stage"].startswith("block-")]
    assert result["usage"]["completion_tokens"] == sum(s["completion_tokens"] for s in generated)
    # Later blocks re-send the chat prompt + accepted tokens: the prefix cache serves it.
    assert all(s["cached_tokens"] > 0 for s in generated[1:])
    assert report["prefix_cache_hit_rate"] > 0.3


def test_blockwise_streams_each_block_as_it_is_chosen(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 32, "seed": 7, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True},
            "alignment": {"strategy": "blockwise", "k": 3, "block_tokens": 8, "reward": "keyword:sea",
                          "return_candidates": True}}
    arrivals, events = [], []
    start = time.monotonic()
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                arrivals.append(time.monotonic() - start)
    report = events[-1]["alignment"]
    blocks = [(t, e["choices"][0]["delta"]["content"]) for t, e in zip(arrivals, events)
              if e["choices"] and e["choices"][0]["delta"].get("content")]
    chosen = [s["candidates"][s["selected"]]["text"] for s in report["steps"]]
    assert [b for _, b in blocks] == [c for c in chosen if c]
    # Streamed as chosen, not buffered: the first block arrives well before the last one
    # (relative, so a slow or busy machine does not matter; buffered blocks arrive together).
    assert len(blocks) >= 3 and blocks[0][0] < 0.75 * blocks[-1][0]


def test_blockwise_cards_threshold_accepts_the_first_clearing_block_or_retries(server):
    easy = ok(server, {"strategy": "blockwise", "k": 3, "block_tokens": 8, "reward": "length_penalty",
                       "accept_threshold": -1000.0, "max_retries": 2})["alignment"]
    assert all(s["selected"] == 0 and s["retries"] == 0 for s in easy["steps"])
    hard = ok(server, {"strategy": "blockwise", "k": 2, "block_tokens": 8, "reward": "length_penalty",
                       "accept_threshold": 1000.0, "max_retries": 1}, max_tokens=16)["alignment"]
    assert all(s["retries"] == 1 for s in hard["steps"])
    assert any(s["stage"].endswith("-retry1") for s in hard["stages"])


def test_blockwise_entropy_segments_end_early(server):
    result = ok(server, {"strategy": "blockwise", "k": 2, "block_tokens": 24, "segment": "entropy",
                         "entropy_threshold": 0.5, "min_block_tokens": 2, "reward": "length_penalty",
                         "return_candidates": True}, max_tokens=48)
    kept = [s["candidates"][s["selected"]]["completion_tokens"] for s in result["alignment"]["steps"]]
    # Blocks end where the model is uncertain: shorter than block_tokens, never under the minimum.
    assert len(kept) >= 2 and any(n < 24 for n in kept[:-1])
    assert all(n >= 2 for n in kept[:-1])
    # Tokens generated past a segment's end are discarded but still counted in usage.
    assert result["usage"]["completion_tokens"] > sum(kept)


def test_speculative_rejection_stops_the_rejected_candidates(server):
    max_tokens = 48
    result = ok(server, {"strategy": "speculative_rejection", "n": 8, "chunk_tokens": 8, "rejection_rate": 0.5,
                         "reward": "keyword:sea", "return_candidates": True}, max_tokens=max_tokens, ignore_eos=True)
    report = result["alignment"]
    alive = [r["alive"] for r in report["rounds"]]
    # Half stopped each round down to min_survivors (2), which then run to the end.
    assert alive == [8, 4, 2]
    assert report["stopped_early"] == 6
    candidates = report["candidates"]
    lengths = sorted(c["completion_tokens"] for c in candidates)
    assert lengths == [8] * 4 + [16] * 2 + [max_tokens] * 2
    assert result["usage"]["completion_tokens"] == sum(lengths) < 0.5 * 8 * max_tokens
    # Each round kept the best-scoring of the partial answers it scored.
    for r in report["rounds"][:-1]:
        scores = dict(zip(r["candidates"], r["scores"]))
        rejected = set(r["candidates"]) - set(r["kept"]) - set(r["finished"])
        assert rejected and min(scores[i] for i in r["kept"]) >= max(scores[i] for i in rejected)
    finalists = [c for c in candidates if c["completion_tokens"] == max_tokens]
    assert report["scores"][0] == max(c["score"] for c in finalists)


def test_speculative_rejection_keeps_searching_after_one_candidate_finishes(server):
    # "." ends an answer: some candidates finish in the first chunks, others go on.
    result = ok(server, {"strategy": "speculative_rejection", "n": 8, "chunk_tokens": 8, "rejection_rate": 0.5,
                         "reward": "keyword:sea", "return_candidates": True}, max_tokens=48, stop=["."])
    report = result["alignment"]
    rounds = report["rounds"]
    early = [r for r in rounds[:-1] if r["finished"]]
    assert early and all(r["kept"] for r in early), rounds  # a finished answer did not end the search
    finished = {i for r in rounds for i in r["finished"]}
    by_index = {c["index"]: c for c in report["candidates"]}
    assert report["selected"][0] in finished
    assert report["scores"][0] == max(by_index[i]["score"] for i in finished)


def stream_events(server, body) -> tuple[list[float], list[dict]]:
    arrivals, events = [], []
    start = time.monotonic()
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, timeout=600) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                arrivals.append(time.monotonic() - start)
    return arrivals, events


def test_particle_filter_streams_the_prefix_its_particles_agree_on(server):
    """A sharp resampling (temperature 0.01 on the tiny reward model's scores) keeps copies
    of the best particle each step, so each step's block is final and streams at once."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 32, "seed": 7, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True},
            "alignment": {"strategy": "particle_filter", "n": 4, "block_tokens": 8, "reward": "tiny",
                          "resample_temperature": 0.01, "return_candidates": True}}
    arrivals, events = stream_events(server, body)
    report = events[-1]["alignment"]
    pieces = [(t, e["choices"][0]["delta"]["content"]) for t, e in zip(arrivals, events)
              if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert len(report["steps"]) == 4 and report["streamed_early_tokens"] == 32
    for step in report["steps"]:
        # Every kept particle is the best-scoring partial answer (sampled once, or more than
        # once: identical blocks are the same particle).
        assert len({step["candidates"][i]["text"] for i in step["kept"]}) == 1, step["candidates"]
        assert step["scores"][step["kept"][0]] == max(step["scores"])
    assert len(pieces) >= 3 and pieces[0][0] < 0.75 * pieces[-1][0]
    text = "".join(p for _, p in pieces)
    assert text == report["particles"][report["selected"]]["text"]
    # The answer's score is the tiny reward model's score of the streamed text.
    r = httpx.post(f"{server.v1}/alignment/score", json={"messages": MESSAGES, "responses": [text], "reward": "tiny"},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["scores"][0] == pytest.approx(report["scores"][0], abs=1e-3)
    generated = [s for s in report["stages"] if s["stage"].startswith("step-")]
    assert events[-1]["usage"]["completion_tokens"] == sum(s["completion_tokens"] for s in generated) == 4 * 32


def test_beam_search_keeps_the_best_distinct_partial_answers(server):
    result = ok(server, {"strategy": "beam_search", "n": 2, "k": 2, "block_tokens": 8, "reward": "length_penalty",
                         "return_candidates": True})
    report = result["alignment"]
    assert len(report["steps"]) >= 2
    for step in report["steps"]:
        pool = step["candidates"]
        assert [c["score"] for c in pool] == pytest.approx([-len(c["text"].split()) / 100 for c in pool])
        kept = {pool[i]["text"] for i in step["kept"]}
        floor = min(pool[i]["score"] for i in step["kept"])
        assert all(c["score"] <= floor for c in pool if c["text"] not in kept)
    best = report["particles"][report["selected"]]
    assert result["choices"][0]["message"]["content"] == best["text"]
    assert best["score"] == max(p["score"] for p in report["particles"])


def test_disconnect_aborts_every_sub_request_of_blockwise(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1200, "ignore_eos": True, "seed": 1, "stream": True,
            "alignment": {"strategy": "blockwise", "k": 4, "block_tokens": 64, "reward": "length_penalty"}}

    async def go():
        async with httpx.AsyncClient(timeout=300) as http:
            async with http.stream("POST", f"{server.v1}/chat/completions", json=body) as r:
                seen = 0.0
                async for _ in r.aiter_lines():
                    seen = max(seen, engine_unfinished(server))
                    if seen >= 4:
                        break
        return seen

    assert asyncio.run(go()) == 4
    for _ in range(100):
        if engine_unfinished(server) == 0:
            break
        time.sleep(0.2)
    assert engine_unfinished(server) == 0
    time.sleep(2)  # and no further block is started after the client left
    assert engine_unfinished(server) == 0


@pytest.mark.parametrize(
    "alignment, extra, param",
    [
        ({"strategy": "blockwise", "k": 99, "reward": "length_penalty"}, {}, "alignment.k"),
        ({"strategy": "blockwise", "reward": "length_penalty"}, {"n": 2}, "alignment.n"),
        ({"strategy": "blockwise", "block_tokens": 1000, "reward": "length_penalty"}, {}, "alignment.block_tokens"),
        ({"strategy": "blockwise", "max_retries": 50, "reward": "length_penalty"}, {}, "alignment.max_retries"),
        ({"strategy": "speculative_rejection", "n": 99, "reward": "length_penalty"}, {}, "alignment.n"),
        ({"strategy": "particle_filter", "n": 99, "reward": "length_penalty"}, {}, "alignment.n"),
        ({"strategy": "particle_filter", "resample_temperature": 0, "reward": "length_penalty"}, {},
         "alignment.resample_temperature"),
        ({"strategy": "beam_search", "n": 4, "k": 8, "reward": "length_penalty"}, {}, "alignment.k"),
        ({"strategy": "beam_search", "reward": "length_penalty"}, {"n": 2}, "alignment.n"),
        ({"strategy": "speculative_rejection", "rejection_rate": 1.0, "reward": "length_penalty"}, {}, "alignment.rejection_rate"),
        ({"strategy": "speculative_rejection", "n": 4, "min_survivors": 5, "reward": "length_penalty"}, {}, "alignment.min_survivors"),
    ],
)
def test_search_limits_are_400(server, alignment, extra, param):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "alignment": alignment, **extra}
    r = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def chat_stream(server, body) -> tuple[str, str | None]:
    """The streamed answer's text and its finish reason."""
    text, finish = "", None
    for event in stream_events(server, {**body, "stream": True})[1]:
        for choice in event.get("choices", []):
            text += choice["delta"].get("content") or ""
            finish = choice.get("finish_reason") or finish
    return text, finish


@pytest.mark.parametrize("alignment", [{"strategy": "blockwise", "k": 1, "block_tokens": 4},
                                       {"strategy": "beam_search", "n": 1, "k": 1, "block_tokens": 4},
                                       {"strategy": "particle_filter", "n": 1, "block_tokens": 4}],
                         ids=lambda a: a["strategy"])
def test_a_stop_string_across_two_blocks_ends_the_answer(server, alignment):
    """vLLM ends a sequence at a stop string only within one engine request; these strategies
    join requests (blocks of 4 tokens here, greedy, one candidate: the answer is plain decoding's),
    so a string made of the end of one block and the start of the next is theirs to find."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "alignment": {**alignment, "reward": "length_penalty", "return_candidates": True}}
    r = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    plain = r.json()["choices"][0]["message"]["content"]
    report = r.json()["alignment"]
    first = report["steps"][0]["candidates"][0]["text"]  # the first block (a particle's whole text so far)
    assert plain.startswith(first) and len(plain) > len(first) + 3
    stop = plain[len(first) - 3:len(first) + 3]  # three characters each side of the boundary
    before = plain[:plain.index(stop)]
    for include in (False, True):
        extra = {"stop": [stop], "include_stop_str_in_output": include}
        r = httpx.post(f"{server.v1}/chat/completions", json={**body, **extra}, timeout=600)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        expected = before + stop if include else before
        assert (choice["message"]["content"], choice["finish_reason"]) == (expected, "stop"), stop
        assert chat_stream(server, {**body, **extra}) == (expected, "stop")
