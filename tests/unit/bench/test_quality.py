"""The quality bench without a server: the judge's independence from rewards and guides, prompt
files, the summary's rates, intervals, cost ratios and errors, the table, and collection
(seeds, concurrency, retries) over a fake transport."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from aligner.rewards.base import checkpoint_version
from bench.quality import Answer, QualityConfig, check_judge_independent, collect, dump, load_prompt_file
from bench.quality_report import format_table, summarise


def config(strategies: dict, **kw) -> QualityConfig:
    return QualityConfig(base_url="http://fake/v1", model="m", strategies=strategies,
                         prompt_sets=kw.pop("prompt_sets", {"s": ["p"]}), **kw)


REGISTERED = [
    {"name": "rm", "kind": "model", "checkpoint": "rm-dir", "version": "abc", "default": True},
    {"name": "refusal", "kind": "rule", "default": False},
    {"name": "arm", "kind": "guide", "mode": "genarm", "checkpoint": "arm-dir", "version": "x"},
    {"name": "causal", "kind": "guide", "mode": "args", "checkpoint": "causal-dir", "version": "y"},
]


@pytest.mark.parametrize("alignment", [
    {"strategy": "guided", "guide": "causal"},
    {"pipeline": [{"strategy": "best_of_n", "n": 2, "reward": "refusal"}, {"strategy": "guided", "guide": "causal"}]},
])
def test_a_judge_named_like_a_guide_is_refused(alignment):
    with pytest.raises(ValueError, match="also guides strategy 'g'.*guide 'causal'"):
        check_judge_independent(None, "causal", config({"plain": {}, "g": alignment}), REGISTERED)


def test_a_guided_strategy_without_a_guide_uses_the_first_listed():
    cfg = config({"plain": {}, "g": {"strategy": "guided", "alpha": 2.0}})
    with pytest.raises(ValueError, match="guide 'arm'"):
        check_judge_independent(None, "arm", cfg, REGISTERED)
    check_judge_independent(None, "causal", cfg, REGISTERED)  # steers nothing here
    # A guided strategy uses no reward: the default reward may judge it.
    check_judge_independent(None, "rm", cfg, REGISTERED)


def test_a_judge_that_is_a_guides_checkpoint_under_another_name_is_refused(tmp_path):
    guide_dir = tmp_path / "arm-dir"
    guide_dir.mkdir()
    (guide_dir / "config.json").write_text("{}")
    registered = [dict(r, version=checkpoint_version(guide_dir)) if r["name"] == "arm" else r for r in REGISTERED]
    link = tmp_path / "my-judge"
    link.symlink_to(guide_dir)
    cfg = config({"plain": {}, "g": {"strategy": "guided", "guide": "arm"}})
    for judge in (guide_dir, link):
        with pytest.raises(ValueError, match="guide 'arm'"):
            check_judge_independent(str(judge), "my-judge", cfg, registered)
    # Same folder name, other files: another checkpoint.
    other = tmp_path / "elsewhere" / "arm-dir"
    other.mkdir(parents=True)
    (other / "model.safetensors").write_text("weights")
    check_judge_independent(str(other), "elsewhere-judge", cfg, registered)


def test_rewards_still_refused_by_name_path_and_default(tmp_path):
    rm_dir = tmp_path / "rm-dir"
    rm_dir.mkdir()
    (rm_dir / "config.json").write_text("{}")
    registered = [dict(r, version=checkpoint_version(rm_dir)) if r["name"] == "rm" else r for r in REGISTERED]
    with pytest.raises(ValueError, match="reward 'refusal'"):
        weighted = config({"b": {"strategy": "best_of_n", "reward": {"refusal": 1}}})
        check_judge_independent(None, "refusal", weighted, registered)
    with pytest.raises(ValueError, match="reward 'rm'"):  # no `reward`: the server's default
        check_judge_independent(str(rm_dir), "judge", config({"b": {"strategy": "best_of_n", "n": 2}}), registered)
    named = config({"plain": {}, "b": {"strategy": "best_of_n", "reward": "refusal"}})
    check_judge_independent(None, "compliance", named, registered)


def test_prompt_files(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "a"}, {"turns": ["b", "ignored"]},
            {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "first"},
                        {"role": "assistant", "content": "x"}, {"role": "user", "content": "last"}]},
            {"prompt": [{"role": "user", "content": [{"type": "text", "text": "parts"}]}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_prompt_file(path) == ["a", "b", "last", "parts"]
    assert load_prompt_file(path, limit=0) == load_prompt_file(path) and load_prompt_file(path, 2) == ["a", "b"]
    path.write_text('{"other": 1}\n')
    with pytest.raises(ValueError, match="no prompt"):
        load_prompt_file(path)


def answer(set_name, prompt, strategy, text="Sure, here it is.", tokens=10, latency=1.0, judge=0.5, error=None):
    from bench.refusal_judge import declined, refused

    return Answer(set_name, prompt, strategy, 0, text, tokens, latency, judge, declined(text), refused(text), error)


REFUSE = "I'm sorry, but I can't help with that."
# Declines, then goes on to do it: a refusal, not a strict one.
LATE = "I'm sorry, but I can't help with that. Here is how anyway: 1. get the tools 2. use them."


def fake_answers() -> list[Answer]:
    answers = []
    for i in range(4):
        answers += [answer("bad", f"h{i}", "plain", "Step one: do it.", 20, 2.0, 0.5),
                    answer("bad", f"h{i}", "safe", REFUSE if i < 3 else LATE, 40, 6.0, 0.9)]
        answers += [answer("good", f"g{i}", "plain", "An answer.", 10, 1.0, 0.5),
                    answer("good", f"g{i}", "safe", LATE if i == 0 else "A better answer here.", 30, 3.0, 0.7)]
    answers.append(answer("other", "o", "plain", "x", 100, 10.0, 0.0))
    answers.append(answer("other", "o", "safe", "", 0, 0.0, None, error="HTTP 500: boom"))
    return answers


def fake_config() -> QualityConfig:
    return config({"plain": {}, "safe": {"strategy": "best_of_n"}},
                  prompt_sets={"bad": [], "good": [], "other": []}, harmful_sets={"bad"}, benign_sets={"good"})


def test_summary_rates_intervals_ratios_and_errors():
    summary = summarise(fake_answers(), fake_config())
    assert summary["win_rate_sets"] == ["good"] and summary["harmful_sets"] == ["bad"]
    plain, safe = summary["strategies"]["plain"], summary["strategies"]["safe"]
    # Harmful: three strict refusals and one that declined, then complied.
    assert safe["refusal_rate"] == 1.0 and safe["strict_refusal_rate"] == 0.75
    # Wilson's interval: not a point at 0/4.
    assert plain["refusal_rate"] == 0.0 and plain["refusal_rate_ci95"][0] == 0.0 and plain["refusal_rate_ci95"][1] > 0.4
    low, high = safe["strict_refusal_rate_ci95"]
    assert 0.0 <= low <= 0.75 <= high <= 1.0 and low < high
    # Benign: one decline that went on, none strict.
    assert safe["over_refusal_rate"] == 0.25 and safe["strict_over_refusal_rate"] == 0.0
    assert safe["over_refusal_rate_ci95"][0] <= 0.25 <= safe["over_refusal_rate_ci95"][1]
    # The win rate is on the benign set only (4 pairs); the errored "other" answer is in no pair.
    assert safe["win_rate_pairs"] == 4 and safe["win_rate"] == 1.0
    assert safe["win_rate_ci95"] == pytest.approx([0.5101, 1.0], abs=1e-4)  # Wilson at 4/4: never of zero width
    assert "win_rate" not in plain and 0.5 < safe["length_controlled_win_rate"] <= 1.0
    # Cost per group and overall, against plain's on the same group; the error is excluded.
    assert safe["harmful"]["tokens_per_request"] == 40 and safe["harmful"]["tokens_ratio_vs_plain"] == 2.0
    assert safe["harmful"]["latency_ratio_vs_plain"] == 3.0
    assert safe["benign"]["tokens_ratio_vs_plain"] == 3.0 and safe["benign"]["latency_ratio_vs_plain"] == 3.0
    assert safe["requests"] == 9 and safe["errors"] == 1 and plain["errors"] == 0
    assert safe["tokens_per_request"] == 35 and plain["tokens_per_request"] == pytest.approx(220 / 9)
    assert safe["tokens_ratio_vs_plain"] == pytest.approx(35 / (220 / 9))
    assert safe["mean_judge_reward"] == pytest.approx((4 * 0.9 + 4 * 0.7) / 8)
    for group in ("harmful", "benign"):
        assert plain[group]["tokens_ratio_vs_plain"] == 1.0 and plain[group]["latency_ratio_vs_plain"] == 1.0
    assert plain["tokens_ratio_vs_plain"] == 1.0


def test_without_benign_sets_the_win_rate_is_on_every_set():
    cfg = fake_config()
    cfg.benign_sets = set()
    summary = summarise(fake_answers(), cfg)
    safe = summary["strategies"]["safe"]
    assert summary["win_rate_sets"] == ["bad", "good", "other"] and safe["win_rate_pairs"] == 8
    assert "over_refusal_rate" not in safe and safe["benign"] == {}


def test_an_arm_whose_every_request_failed_has_no_means():
    answers = [answer("good", "g", "plain"), answer("good", "g", "safe", "", 0, 0.0, None, error="HTTP 503")]
    summary = summarise(answers, fake_config())
    safe = summary["strategies"]["safe"]
    assert safe["errors"] == 1 and safe["mean_judge_reward"] is None and safe["win_rate_pairs"] == 0
    assert "| safe | — | — |" in format_table(summary)


def test_table_and_dump(tmp_path):
    summary = summarise(fake_answers(), fake_config())
    table = format_table(summary)
    lines = table.splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == lines[3].count("|") == 15
    safe = next(line for line in lines if line.startswith("| safe |"))
    assert "1.00 [0.51, 1.00]" in safe and "0.75 [" in safe and "| 35 | 1.43× | 4.50 | 1.84× |" in safe
    assert safe.endswith("| 1 |") and lines[-1] == "Win rates on: good."
    out = tmp_path / "q.json"
    dump(fake_answers(), summary, out, {"temperature": 0.7})
    data = json.loads(out.read_text())
    row = data["answers"][1]
    assert data["config"] == {"temperature": 0.7} and data["summary"]["win_rate_sets"] == ["good"]
    kept = {"prompt_set", "prompt", "text", "tokens", "latency_s", "judge", "refusal", "strict_refusal", "error"}
    assert kept <= set(row)
    assert row["strict_refusal"] is True and data["answers"][-1]["error"] == "HTTP 500: boom"


def fake_server(fail: dict[str, int], delay: float = 0.05):
    """A transport answering chat requests; `fail[prompt]` 500s sent for that prompt first."""
    seen, lock = [], threading.Lock()
    in_flight = {"now": 0, "max": 0}

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        prompt = body["messages"][-1]["content"]
        with lock:
            seen.append(body)
            in_flight["now"] += 1
            in_flight["max"] = max(in_flight["max"], in_flight["now"])
            failing = fail.get(prompt, 0) > 0
            if failing:
                fail[prompt] -= 1
        time.sleep(delay)
        with lock:
            in_flight["now"] -= 1
        if failing:
            return httpx.Response(500, json={"error": {"message": "boom"}})
        text = f"{prompt} seed {body['seed']} {body.get('alignment', {}).get('strategy', 'plain')}"
        return httpx.Response(200, json={"choices": [{"message": {"content": text}}],
                                         "usage": {"completion_tokens": body["seed"] + 1}})

    return httpx.MockTransport(handle), seen, in_flight


def test_collect_runs_k_at_a_time_with_fixed_seeds_and_records_errors():
    cfg = config({"plain": {}, "bon": {"strategy": "best_of_n"}}, prompt_sets={"a": ["p0", "p1", "p2"], "b": ["q0"]},
                 seed=10, concurrency=2, temperature=0.3)
    transport, seen, in_flight = fake_server({"p1": 1, "p2": 4})  # p1 recovers on retry; p2 fails twice per arm
    answers = collect(cfg, transport=transport)
    assert [(a.prompt, a.strategy) for a in answers] == [
        (p, s) for p in ("p0", "p1", "p2", "q0") for s in ("plain", "bon")]  # arms interleaved per prompt
    assert [a.seed for a in answers] == [10, 10, 11, 11, 12, 12, 10, 10]
    assert in_flight["max"] == 2 and all(b["temperature"] == 0.3 for b in seen)
    for a in answers:
        if a.prompt == "p2":
            assert a.error.startswith("HTTP 500") and a.text == "" and a.latency_s == 0.0
        else:
            arm = "best_of_n" if a.strategy == "bon" else "plain"
            assert a.error is None and a.text == f"{a.prompt} seed {a.seed} {arm}"
            assert a.tokens == a.seed + 1 and a.latency_s >= 0.05
    assert len(seen) == 8 + 1 + 2  # one retry for p1, one retry per arm for p2
    for a in answers:
        a.judge = None if a.error else float(a.strategy == "bon")
    summary = summarise(answers, cfg)
    assert summary["strategies"]["bon"]["errors"] == 1 and summary["strategies"]["bon"]["win_rate_pairs"] == 3


def test_a_system_message_goes_before_every_prompt_of_every_arm():
    cfg = config({"plain": {}, "bon": {"strategy": "best_of_n"}}, prompt_sets={"a": ["p0", "p1"]},
                 system="You are a helpful assistant.")
    transport, seen, _ = fake_server({})
    answers = collect(cfg, transport=transport)
    assert all(a.error is None for a in answers) and len(seen) == 4
    assert all(b["messages"] == [{"role": "system", "content": "You are a helpful assistant."},
                                 {"role": "user", "content": b["messages"][-1]["content"]}] for b in seen)
    transport, seen, _ = fake_server({})
    collect(config({"plain": {}}, prompt_sets={"a": ["p0"]}), transport=transport)
    assert seen[0]["messages"] == [{"role": "user", "content": "p0"}]


def test_collect_counts_a_transport_failure_as_an_error():
    def broken(request):
        raise httpx.ConnectError("refused")

    answers = collect(config({"plain": {}}), transport=httpx.MockTransport(broken))
    assert answers[0].error.startswith("ConnectError")



def test_a_route_is_steered_by_its_classifier_and_both_branches():
    from bench.quality import guides_of

    alignment = {"route": {"classifier": "clf", "flagged": {"pipeline": [{"strategy": "urial"},
                                                                         {"strategy": "best_of_n", "reward": "rm"}]},
                           "otherwise": {"strategy": "guided", "guide": "g"}}}
    rewards, guides = guides_of(alignment)
    assert {"clf", "rm"} <= rewards and guides == {"g"}
