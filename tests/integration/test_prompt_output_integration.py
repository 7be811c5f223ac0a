"""Prompt-side and output-side strategies, pipelines and profiles through the real server."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from tests.conftest import MODEL

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "How do I keep basil alive on a windowsill?"}]


def post(server, alignment, **extra):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 24, "seed": 5, "alignment": alignment, **extra}
    r = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=600)
    return r


def ok(server, alignment, **extra) -> dict:
    r = post(server, alignment, **extra)
    assert r.status_code == 200, r.text
    return r.json()


def test_urial_prefix_is_added_and_served_from_the_prefix_cache(server):
    plain = ok(server, {"strategy": "none"})
    first = ok(server, {"strategy": "urial"}, messages=[{"role": "user", "content": "Name a calm colour."}])
    second = ok(server, {"strategy": "urial"})
    report = second["alignment"]
    assert report["strategy"] == "urial" and report["prompt_stages"][0]["template"] == "default"
    prefix_tokens = second["usage"]["prompt_tokens"] - plain["usage"]["prompt_tokens"]
    assert prefix_tokens > 150  # system prompt and three worked examples
    # The constant prefix was computed for the first request and reused by the second (the
    # cache works in whole KV blocks, so the count is rounded down to a block boundary).
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0.75 * prefix_tokens
    assert first["usage"]["prompt_tokens"] > prefix_tokens


def test_urial_puts_a_clients_system_message_into_the_templates(server):
    # Served exactly as the conversation with one merged system message, the client's first:
    # same prompt tokens, same greedy answer.
    from aligner.strategies.templates import BUILTIN_TEMPLATES

    own = {"role": "system", "content": "Answer in one short sentence."}
    prefix = BUILTIN_TEMPLATES["default"].prefix()
    merged = [{"role": "system", "content": f"{own['content']}\n\n{prefix[0]['content']}"}, *prefix[1:], *MESSAGES]
    # Both compared answers are served with the prompt in the prefix cache: on AMX CPUs a cold
    # prefill rounds differently and can change a greedy answer (BENCHMARKS.md, "CPU numerics").
    ok(server, {"strategy": "none"}, messages=merged, temperature=0)
    routed = ok(server, {"strategy": "urial"}, messages=[own, *MESSAGES], temperature=0)
    by_hand = ok(server, {"strategy": "none"}, messages=merged, temperature=0)
    assert routed["usage"]["prompt_tokens"] == by_hand["usage"]["prompt_tokens"]
    assert routed["choices"][0]["message"]["content"] == by_hand["choices"][0]["message"]["content"]
    # Not the old order (the template, its examples, then the client's system message).
    after = ok(server, {"strategy": "none"}, messages=[*prefix, own, *MESSAGES], temperature=0)
    assert after["usage"]["prompt_tokens"] != routed["usage"]["prompt_tokens"]


def test_urial_streams_token_by_token(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 16, "stream": True,
            "stream_options": {"include_usage": True}, "alignment": {"strategy": "urial"}}
    events = []
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    content = [e for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert len(content) > 3  # many small deltas, not one block
    assert events[-1]["alignment"]["prompt_stages"][0]["stage"] == "urial"


def test_rewrite_reports_the_original_and_the_rewrite(server):
    report = ok(server, {"strategy": "rewrite"})["alignment"]
    stage = report["prompt_stages"][0]
    assert stage["original"] == MESSAGES[0]["content"]
    assert stage["rewrite"] and stage["rewrite"] == stage["rewrites"][0]
    assert [s["stage"] for s in report["stages"]][:2] == ["rewrite", "generate"]


def test_rewrite_candidates_keep_the_best_scored_rewrite(server):
    report = ok(server, {"strategy": "rewrite", "candidates": 3, "reward": "length_penalty"})["alignment"]
    stage = report["prompt_stages"][0]
    assert len(stage["rewrites"]) == 3 and len(stage["scores"]) == 3
    assert stage["selected"] == max(range(3), key=lambda k: (stage["scores"][k], -k))
    assert stage["rewrite"] == stage["rewrites"][stage["selected"]]


def test_self_refine_keeps_a_revision_only_when_it_scores_higher(server):
    result = ok(server, {"strategy": "self_refine", "rounds": 2, "reward": "length_penalty",
                         "return_candidates": True, "max_critique_tokens": 24})
    history = result["alignment"]["self_refine"][0]
    rounds = history["rounds"]
    assert rounds[0]["round"] == 0
    current = rounds[0]["score"]
    kept = rounds[0]["answer"]
    for step in rounds[1:]:
        assert step["accepted"] == (step["score"] > current)
        assert step["score"] == pytest.approx(-len(step["answer"].split()) / 100)
        if not step["accepted"]:
            assert step is rounds[-1]  # refinement stops at the first rejected revision
            break
        current, kept = step["score"], step["answer"]
    assert result["choices"][0]["message"]["content"] == kept
    assert history["final_score"] == pytest.approx(current)
    stages = [s["stage"] for s in result["alignment"]["stages"]]
    assert stages[0] == "generate" and "critique-0-1" in stages and "revise-0-1" in stages
    assert result["usage"]["completion_tokens"] == sum(s["completion_tokens"] for s in result["alignment"]["stages"])


def test_correct_is_accepted_only_if_it_scores_higher(server):
    result = ok(server, {"strategy": "correct", "reward": "length_penalty", "return_candidates": True})
    (entry,) = result["alignment"]["correct"]
    assert entry["accepted"] == (entry["corrected_score"] > entry["original_score"])
    answer = result["choices"][0]["message"]["content"]
    if entry["accepted"]:
        assert answer == entry["correction"]
    else:
        assert answer != entry["correction"] or entry["corrected_score"] == entry["original_score"]


BANANAS = " ".join(["banana"] * 12)


def test_a_registered_helper_model_corrects_and_is_reward_gated(server):
    """`corrector: banana-lm` is a second vLLM engine serving a model that only says " banana"."""
    ready = httpx.get(f"{server.base_url}/ready", timeout=10).json()
    assert ready["helper_models"] == ["banana-lm"]
    kept = ok(server, {"strategy": "correct", "corrector": "banana-lm", "reward": "banana", "return_candidates": True})
    (entry,) = kept["alignment"]["correct"]
    assert entry["correction"].startswith(BANANAS)  # written by the helper, not the policy
    assert entry["accepted"] and kept["choices"][0]["message"]["content"] == entry["correction"]
    assert entry["corrected_score"] > entry["original_score"]
    # A reward that dislikes the correction keeps the policy's answer.
    refused = ok(server, {"strategy": "correct", "corrector": "banana-lm", "reward": "length_penalty",
                          "return_candidates": True})
    (entry,) = refused["alignment"]["correct"]
    assert not entry["accepted"] and "banana" not in refused["choices"][0]["message"]["content"]


def test_a_registered_helper_model_rewrites_the_prompt(server):
    report = ok(server, {"strategy": "rewrite", "rewriter": "banana-lm"})["alignment"]
    stage = report["prompt_stages"][0]
    assert stage["original"] == MESSAGES[0]["content"] and stage["rewrite"].startswith(BANANAS)
    assert report["params"]["rewriter"] == "banana-lm"


@pytest.mark.parametrize("alignment, param", [
    ({"strategy": "correct", "corrector": "gpt-5"}, "alignment.corrector"),
    ({"strategy": "rewrite", "rewriter": "nobody"}, "alignment.rewriter"),
])
def test_unknown_helper_models_are_400(server, alignment, param):
    r = post(server, alignment)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert "banana-lm" in r.json()["error"]["message"]  # the message lists what is served


def test_three_stage_pipeline_reports_every_stage(server):
    alignment = {"pipeline": [{"strategy": "urial"}, {"strategy": "best_of_n", "n": 3, "reward": "tiny"},
                              {"strategy": "self_refine", "rounds": 1, "reward": "tiny", "max_critique_tokens": 16}]}
    result = ok(server, alignment)
    report = result["alignment"]
    assert report["strategy"] == "pipeline"
    assert [s["strategy"] for s in report["params"]["pipeline"]] == ["urial", "best_of_n", "self_refine"]
    stages = [s["stage"] for s in report["stages"]]
    assert stages[:3] == ["urial", "generate", "score"] and "revise-0-1" in stages
    assert report["decode_stage"] == "best_of_n" and "self_refine" in report
    assert result["usage"]["completion_tokens"] == sum(s["completion_tokens"] for s in report["stages"])
    # best_of_n's three candidates all count.
    generate = next(s for s in report["stages"] if s["stage"] == "generate")
    assert generate["completion_tokens"] >= 3


@pytest.mark.parametrize(
    "alignment, param",
    [
        ({"pipeline": [{"strategy": "none"}, {"strategy": "best_of_n", "reward": "tiny"}]}, "alignment.pipeline"),
        ({"pipeline": [{"strategy": "self_refine"}, {"strategy": "none"}]}, "alignment.pipeline"),
        ({"pipeline": [{"strategy": "urial"}]}, "alignment.pipeline"),
        ({"pipeline": [{"strategy": "urial"}, {"strategy": "nope"}]}, "alignment.pipeline[1].strategy"),
        ({"pipeline": [{"strategy": "none"}, {"strategy": "self_refine", "rounds": 99}]}, "alignment.pipeline[1].rounds"),
        ({"pipeline": []}, "alignment.pipeline"),
        ({"pipeline": [{"strategy": "urial", "template": "missing"}, {"strategy": "none"}]}, "alignment.pipeline[0].template"),
        ({"strategy": "best_of_n", "pipeline": [{"strategy": "none"}]}, "alignment.pipeline"),
        ({"profile": "no-such-profile"}, "alignment.profile"),
        ({"profile": "helpful@99"}, "alignment.profile"),
    ],
)
def test_bad_pipelines_and_profiles_are_400(server, alignment, param):
    r = post(server, alignment)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_profiles_are_listed_and_resolved_with_overrides(server):
    listing = httpx.get(f"{server.v1}/alignment/profiles", timeout=10).json()["data"]
    by_name = {p["name"]: p for p in listing}
    assert {"helpful", "harmless", "concise"} <= set(by_name)
    assert by_name["helpful"]["latest"] == 3 and [v["version"] for v in by_name["helpful"]["versions"]] == [1, 2, 3]

    pinned = ok(server, {"profile": "helpful@1"})["alignment"]
    assert pinned["strategy"] == "best_of_n" and pinned["params"]["n"] == 4
    assert pinned["source"] == "body:profile helpful@1"
    overridden = ok(server, {"profile": "helpful@1", "n": 2})["alignment"]
    assert overridden["params"]["n"] == 2
    latest = ok(server, {"profile": "concise"})["alignment"]
    assert latest["strategy"] == "pipeline"
    assert latest["params"]["pipeline"][0] == {"strategy": "urial", "template": "concise", "return_candidates": False, "fallback": True}
    replaced = ok(server, {"profile": "concise", "strategy": "none"})["alignment"]
    assert replaced["strategy"] == "none"


def test_a_malformed_profiles_file_fails_at_start_naming_the_line(tmp_path):
    bad = tmp_path / "profiles.yaml"
    bad.write_text("profiles:\n  ok:\n    - version: 1\n      alignment: {strategy: none}\n"
                   "  broken:\n    - version: 1\n      alignment: {strategy: best_of_n, n: 0}\n")
    proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--profiles", str(bad), "--port", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"{bad}:6:" in proc.stderr and "broken@1" in proc.stderr
