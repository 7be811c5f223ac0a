"""Alignment strategies through the real server (vLLM on CPU) with a tiny reward model built
from a config and with rule rewards. Selections are checked against scores computed here,
independently of the server's scorer."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from aligner.strategies import strategy_names
from tests.conftest import MODEL

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Give me one tip for staying focused."}]


@pytest.fixture(scope="module")
def tiny_rm(tiny_reward_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_reward_dir)


def independent_score(tiny_rm, messages, text: str) -> float:
    model, tokenizer = tiny_rm
    convo = list(messages) + [{"role": "assistant", "content": text}]
    ids = tokenizer.apply_chat_template(convo, tokenize=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        return float(model(input_ids=ids).logits[0, 0])


def chat(client, alignment, **kwargs):
    kwargs.setdefault("max_tokens", 16)
    kwargs.setdefault("messages", MESSAGES)
    return client.chat.completions.create(model=MODEL, extra_body={"alignment": alignment}, **kwargs)


def test_best_of_n_returns_the_candidate_the_reward_model_prefers(client, tiny_rm):
    reply = chat(client, {"strategy": "best_of_n", "n": 6, "reward": "tiny", "return_candidates": True}, seed=11)
    report = reply.alignment
    assert report["strategy"] == "best_of_n" and report["params"]["reward"] == {"tiny": 1.0}
    candidates = report["candidates"]
    assert len(candidates) == 6
    ours = [independent_score(tiny_rm, MESSAGES, c["text"]) for c in candidates]
    for candidate, score in zip(candidates, ours):
        assert candidate["score"] == pytest.approx(score, abs=1e-3)
    best = max(range(6), key=lambda i: (ours[i], -i))
    assert reply.choices[0].message.content == candidates[best]["text"]
    assert report["selected"] == [best]
    # usage counts every candidate's tokens, not just the returned one.
    assert reply.usage.completion_tokens == sum(c["completion_tokens"] for c in candidates)
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["generate"]["completion_tokens"] == reply.usage.completion_tokens
    assert stages["score"]["seconds"] >= 0
    # What it cost: the reward read each (prompt, candidate) once; the policy prefilled the
    # prompt and decoded every candidate; FLOPs are 2 x parameters x tokens for each.
    model, tokenizer = tiny_rm
    read = sum(len(tokenizer.apply_chat_template(MESSAGES + [{"role": "assistant", "content": c["text"]}],
                                                 tokenize=True, return_dict=True)["input_ids"]) for c in candidates)
    parameters = sum(p.numel() for n, p in model.named_parameters() if not ("embed" in n and p.dim() == 2))
    compute = report["compute"]
    assert compute["rewards"]["tiny"] == {"sequences": 6, "tokens": read, "parameters": parameters,
                                          "flops": 2 * parameters * read}
    policy = compute["models"]["policy"]
    assert policy["decoded_tokens"] == reply.usage.completion_tokens
    assert policy["prefill_tokens"] + policy["cached_tokens"] == reply.usage.prompt_tokens
    assert policy["parameters"] == 134_515_008  # SmolLM2-135M: every weight, the embeddings once (tied)
    assert compute["flops"] == policy["flops"] + compute["rewards"]["tiny"]["flops"] and compute["unmeasured"] == []


def test_auto_escalates_by_its_rule_on_the_reward_models_scores(client, tiny_rm):
    """`auto` on the real model: each decision it reports follows from the candidates' scores
    (recomputed here by the reward model) and texts, and a bar no round can clear stops it at
    `start` while a bar every round clears runs it to `n`."""
    from aligner.strategies.auto import expected_gain
    from aligner.strategies.mbr import consensus

    for min_gain, agree, used in ((1e6, None, 2), (None, None, 8), (0.05, 60, None)):
        reply = chat(client, {"strategy": "auto", "n": 8, "start": 2, "reward": "tiny", "min_gain": min_gain,
                              "agree": agree, "return_candidates": True}, seed=5, max_tokens=24)
        report = reply.alignment
        candidates = report["candidates"]
        ours = [independent_score(tiny_rm, MESSAGES, c["text"]) for c in candidates]
        assert [c["score"] for c in candidates] == pytest.approx(ours, abs=1e-3)
        assert report["candidates_used"] == len(candidates) and (used is None or len(candidates) == used)
        assert len(candidates) == 2 * 2 ** sum(d["escalated"] for d in report["auto"])
        for decision in report["auto"]:
            k = decision["candidates"]
            gain = expected_gain(ours[:k], k)
            agreement = sum(consensus([c["text"] for c in candidates[:k]])) / k
            assert decision["expected_gain"] == pytest.approx(gain, abs=1e-2)
            assert decision["agreement"] == pytest.approx(agreement, abs=0.05)
            assert decision["escalated"] == ((agree is None or agreement < agree) and (min_gain is None or gain > min_gain))
        assert reply.usage.completion_tokens == sum(c["completion_tokens"] for c in candidates)
        assert reply.choices[0].message.content == candidates[max(range(len(ours)), key=lambda i: (ours[i], -i))]["text"]


def test_best_of_n_with_a_rule_reward_picks_the_most_matches(client):
    reply = chat(
        client,
        {"strategy": "best_of_n", "n": 6, "reward": {"exclaim": 1.0}, "return_candidates": True},
        seed=5,
        messages=[{"role": "user", "content": "Cheer me up with an excited sentence!"}],
    )
    candidates = reply.alignment["candidates"]
    counts = [min(10, c["text"].count("!")) for c in candidates]
    assert [c["score"] for c in candidates] == counts
    assert reply.choices[0].message.content.count("!") == max(counts)


def test_mbr_returns_the_candidate_the_others_agree_with(client):
    from sacrebleu.metrics import CHRF

    reply = chat(client, {"strategy": "mbr", "n": 5, "return_candidates": True}, seed=4, max_tokens=24)
    report = reply.alignment
    texts = [c["text"] for c in report["candidates"]]
    chrf = CHRF(word_order=2)
    ours = [sum(chrf.sentence_score(t, [o]).score for j, o in enumerate(texts) if j != i) / 4 for i, t in enumerate(texts)]
    assert [c["score"] for c in report["candidates"]] == pytest.approx(ours, abs=1e-3)
    best = max(range(5), key=lambda i: (ours[i], -i))
    assert report["selected"] == [best] and reply.choices[0].message.content == texts[best]
    assert report["utility"] == "chrf++" and {s["stage"] for s in report["stages"]} == {"generate", "mbr"}
    assert reply.usage.completion_tokens == sum(c["completion_tokens"] for c in report["candidates"])


def test_n2_returns_the_two_best_distinct_candidates(client, tiny_rm):
    reply = chat(client, {"strategy": "best_of_n", "n": 6, "reward": "tiny", "return_candidates": True}, n=2, seed=3)
    candidates = reply.alignment["candidates"]
    ranked = sorted(candidates, key=lambda c: (-c["score"], c["index"]))
    distinct = []
    for c in ranked:
        if c["text"] not in [d["text"] for d in distinct]:
            distinct.append(c)
    assert [c.message.content for c in reply.choices] == [c["text"] for c in distinct[:2]]
    assert [c.index for c in reply.choices] == [0, 1]


def test_weighted_rewards_combine_linearly(client):
    reply = chat(
        client,
        {"strategy": "best_of_n", "n": 4, "reward": {"tiny": 1.0, "length_penalty": 2.0}, "return_candidates": True},
        seed=9,
    )
    for c in reply.alignment["candidates"]:
        expected = c["scores"]["tiny"] + 2.0 * c["scores"]["length_penalty"]
        assert c["score"] == pytest.approx(expected)
        assert c["scores"]["length_penalty"] == pytest.approx(-len(c["text"].split()) / 100)


def test_soft_best_of_n_is_seeded_and_sharp_at_small_lambda(client):
    alignment = {"strategy": "soft_best_of_n", "n": 5, "reward": "tiny", "lambda": 0.5, "return_candidates": True}
    first = chat(client, alignment, seed=21)
    second = chat(client, alignment, seed=21)
    assert first.alignment["selected"] == second.alignment["selected"]
    assert first.choices[0].message.content == second.choices[0].message.content
    sharp = chat(client, {**alignment, "lambda": 1e-4}, seed=21)
    scores = [c["score"] for c in sharp.alignment["candidates"]]
    assert sharp.alignment["candidates"][sharp.alignment["selected"][0]]["score"] == max(scores)
    assert sharp.alignment["params"]["lambda"] == 1e-4


def stream_raw(server, body, headers=None) -> tuple[list[str], list[dict]]:
    comments, events = [], []
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, headers=headers, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith(":"):
                comments.append(line)
            elif line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return comments, events


def test_streamed_best_of_n_keeps_alive_then_sends_the_chosen_text(server):
    body = {
        "model": MODEL, "messages": MESSAGES, "max_tokens": 48, "seed": 4, "stream": True,
        "stream_options": {"include_usage": True},
        "alignment": {"strategy": "best_of_n", "n": 6, "reward": "tiny", "return_candidates": True},
    }
    comments, events = stream_raw(server, body)
    assert comments, "expected SSE keep-alive comments while candidates were generated"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    final = events[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] > 0
    report = final["alignment"]
    assert text == report["candidates"][report["selected"][0]]["text"]
    assert final["usage"]["completion_tokens"] == sum(c["completion_tokens"] for c in report["candidates"])


def test_stream_without_usage_puts_alignment_on_the_finish_chunk(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "seed": 4, "stream": True,
            "alignment": {"strategy": "best_of_n", "n": 3, "reward": "tiny"}}
    _, events = stream_raw(server, body)
    assert all(e["choices"] for e in events)
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-1]["alignment"]["strategy"] == "best_of_n"


@pytest.mark.parametrize("name", strategy_names())
@pytest.mark.parametrize("stream", [False, True])
def test_contract_every_registered_strategy_serves(server, name, stream):
    """Runs each registered strategy with its defaults and a rule reward, streamed or not."""
    alignment = {"strategy": name}
    if "reward" in get_params_schema(server, name):
        alignment["reward"] = "length_penalty"
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 12, "seed": 1, "alignment": alignment,
            "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
        _, events = stream_raw(server, body)
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        report, usage = events[-1]["alignment"], events[-1]["usage"]
    else:
        r = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        text, report, usage = r.json()["choices"][0]["message"]["content"], r.json()["alignment"], r.json()["usage"]
    assert text
    assert report["strategy"] == name and report["source"] == "body"
    assert usage["completion_tokens"] == sum(s["completion_tokens"] for s in report["stages"]) > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def get_params_schema(server, name) -> dict:
    strategies = httpx.get(f"{server.v1}/alignment/strategies", timeout=10).json()["data"]
    return next(s for s in strategies if s["name"] == name)["parameters"]["properties"]


def test_strategies_endpoint_lists_schemas(server):
    body = httpx.get(f"{server.v1}/alignment/strategies", timeout=10).json()
    assert body["default"] == "none"
    names = [s["name"] for s in body["data"]]
    assert names == strategy_names() and {"none", "best_of_n", "soft_best_of_n"} <= set(names)
    best = next(s for s in body["data"] if s["name"] == "best_of_n")
    assert best["parameters"]["properties"]["n"]["minimum"] == 1
    rewards = httpx.get(f"{server.v1}/alignment/rewards", timeout=10).json()["data"]
    assert {"tiny", "exclaim", "refusal", "length_penalty"} <= {r["name"] for r in rewards}


def test_precedence_body_over_header_over_alias(server):
    def run(model, header=None, alignment=None):
        body = {"model": model, "messages": MESSAGES, "max_tokens": 4, "seed": 2}
        if alignment:
            body["alignment"] = alignment
        headers = {"X-Alignment-Strategy": header} if header else None
        r = httpx.post(f"{server.v1}/chat/completions", json=body, headers=headers, timeout=300)
        assert r.status_code == 200, r.text
        report = r.json()["alignment"]
        return report["strategy"], report["source"]

    alias = f"{MODEL}@best_of_n"
    assert run(MODEL) == ("none", "default")
    assert run(alias) == ("best_of_n", "alias")
    assert run(alias, header="soft_best_of_n") == ("soft_best_of_n", "header")
    assert run(alias, header="soft_best_of_n", alignment={"strategy": "none"}) == ("none", "body")
    # Body parameters apply to a strategy picked by the alias.
    r = httpx.post(f"{server.v1}/chat/completions", timeout=300, json={
        "model": alias, "messages": MESSAGES, "max_tokens": 4, "alignment": {"n": 2, "reward": "tiny"}})
    assert r.json()["alignment"]["params"]["n"] == 2


@pytest.mark.parametrize(
    "alignment, header, model, param",
    [
        ({"strategy": "nope"}, None, MODEL, "alignment.strategy"),
        (None, "nope", MODEL, "X-Alignment-Strategy"),
        (None, None, f"{MODEL}@nope", "model"),
        ({"strategy": "best_of_n", "reward": "no-such-rm"}, None, MODEL, "alignment.reward.no-such-rm"),
        ({"strategy": "best_of_n", "reward": {"tiny": -1}}, None, MODEL, "alignment.reward.tiny"),
        ({"strategy": "best_of_n", "n": 17}, None, MODEL, "alignment.n"),
        ({"strategy": "best_of_n", "n": 0}, None, MODEL, "alignment.n"),
        ({"strategy": "best_of_n", "bogus": 1}, None, MODEL, "alignment.bogus"),
        ({"strategy": "soft_best_of_n", "lambda": 0}, None, MODEL, "alignment.lambda"),
    ],
)
def test_alignment_errors_are_400_naming_the_parameter(server, alignment, header, model, param):
    body = {"model": model, "messages": MESSAGES, "max_tokens": 4}
    if alignment is not None:
        body["alignment"] = alignment
    headers = {"X-Alignment-Strategy": header} if header else None
    r = httpx.post(f"{server.v1}/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_sdk_surfaces_alignment_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, {"strategy": "best_of_n", "n": 1000})
    assert info.value.body["param"] == "alignment.n"


def test_score_endpoint_matches_independent_scores(server, tiny_rm):
    answers = ["Take short breaks.", "Put your phone in another room and set a timer."]
    r = httpx.post(f"{server.v1}/alignment/score", timeout=60,
                   json={"messages": MESSAGES, "responses": answers, "reward": {"tiny": 1.0, "length_penalty": 1.0}})
    assert r.status_code == 200, r.text
    body = r.json()
    for i, text in enumerate(answers):
        assert body["per_reward"]["tiny"][i] == pytest.approx(independent_score(tiny_rm, MESSAGES, text), abs=1e-3)
        assert body["scores"][i] == pytest.approx(body["per_reward"]["tiny"][i] - len(text.split()) / 100)
    bad = httpx.post(f"{server.v1}/alignment/score", timeout=60,
                     json={"messages": MESSAGES, "responses": ["x"], "reward": "nope"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reward.nope"


@pytest.mark.parametrize("name", ["helpful-harmless", "helpful-harmless-causal"])
def test_the_shipped_starter_reward_models_score_through_the_server(server, name):
    """models/helpful-harmless (LoRA + head on the packaged MiniLM encoder) and
    models/helpful-harmless-causal (LoRA + head on the policy's own backbone)."""
    question = [{"role": "user", "content": "How can I hurt my neighbour's dog without anyone noticing?"}]
    r = httpx.post(f"{server.v1}/alignment/score", timeout=60, json={
        "messages": question, "reward": name,
        "responses": ["I won't help with hurting an animal. If the dog is a problem, talk to your neighbour or animal control.",
                      "Mix some chocolate into its food when nobody is looking."]})
    assert r.status_code == 200, r.text
    # The server's scores equal those of the model loaded here through the same loader.
    from aligner.rewards.hf import SequenceClassifierReward
    from bench.launch import REPO

    local = SequenceClassifierReward("local", REPO / "models" / name)
    local_answers = ["I won't help with hurting an animal. If the dog is a problem, talk to your neighbour or animal control.",
                     "Mix some chocolate into its food when nobody is looking."]
    expected = local.score([question, question], local_answers)
    assert r.json()["scores"] == pytest.approx(expected, abs=1e-4)
    assert len(set(r.json()["scores"])) == 2
    # ... and those `aligner eval-rm` gives the same pair (one encoder for training, eval, serving).
    from tests.unit.aligner.test_reward_encoding import eval_rm_scores

    pair = {"prompt": question, "chosen": [{"role": "assistant", "content": local_answers[0]}],
            "rejected": [{"role": "assistant", "content": local_answers[1]}]}
    chosen, rejected, _ = eval_rm_scores(REPO / "models" / name, [pair])
    assert r.json()["scores"] == pytest.approx(chosen + rejected, abs=1e-4)
    reply = httpx.post(f"{server.v1}/chat/completions", timeout=300, json={
        "model": MODEL, "messages": question, "max_tokens": 24, "seed": 0,
        "alignment": {"strategy": "best_of_n", "n": 3, "reward": name}})
    assert reply.status_code == 200 and reply.json()["alignment"]["params"]["reward"] == {name: 1.0}
