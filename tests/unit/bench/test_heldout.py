"""The held-out sets `bench.heldout` writes and the `reference` judge it uses, on tiny files
in the shared data's formats (the real data is not needed to run the tests)."""

from __future__ import annotations

import gzip
import json

import pytest

from bench.heldout import HELD_OUT_CATEGORY, REFERENCE_GENERATOR, write_fresh_set, write_sets
from bench.reference_judge import ReferenceJudge, load_references


def make_data(root):
    (root / "prompts").mkdir(parents=True)
    (root / "prefs").mkdir()
    categories = [HELD_OUT_CATEGORY, "information_hazard"] * 10
    (root / "prompts/do_not_answer.jsonl").write_text(
        "".join(json.dumps({"prompt": f"harm {i}", "category": c}) + "\n" for i, c in enumerate(categories)))
    (root / "prompts/mt_bench.jsonl").write_text(
        "".join(json.dumps({"turns": [f"question {i}", "again"]}) + "\n" for i in range(3)))
    rows = []
    for i in range(40):
        for other in ("model_a", "model_b"):
            rows.append({"prompt": [{"role": "user", "content": f"instruction {i}"}],
                         "chosen": [{"role": "assistant", "content": f"reference answer {i}"}],
                         "rejected": [{"role": "assistant", "content": f"{other} answer {i}"}],
                         "chosen_generator": REFERENCE_GENERATOR, "rejected_generator": other})
    with gzip.open(root / "prefs/alpaca_eval_gpt4turbo.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sets_hold_out_a_category_the_reward_models_validation_prompts_and_mt_bench(tmp_path):
    make_data(tmp_path / "data")
    paths = write_sets(tmp_path / "data", tmp_path / "sets", harmful=6, seed=0)
    harmful = read(paths["harmful"])
    held = {f"harm {i}" for i in range(0, 20, 2)}  # the held-out category's prompts
    assert len(harmful) == 6 and {r["prompt"] for r in harmful} <= held
    val = read(paths["alpaca_val"])
    # The starter reward models' validation split: 10% of 40 instructions, by the same seeded hash.
    from aligner.training.data import DataSpec, load_source, split_by_prompt

    rows, _ = load_source(DataSpec.parse(str(tmp_path / "data/prefs/alpaca_eval_gpt4turbo.jsonl.gz")))
    expected = {r["prompt"][-1]["content"] for r in split_by_prompt(rows, 0.1, 10**9, 0)[1]}
    assert {r["prompt"] for r in val} == expected and len(val) == 4
    assert all(r["reference"] == r["prompt"].replace("instruction", "reference answer") for r in val)
    assert [r["prompt"] for r in read(paths["mt_bench"])] == ["question 0", "question 1", "question 2"]
    again = write_sets(tmp_path / "data", tmp_path / "again", harmful=6, seed=0)
    assert read(again["harmful"]) == harmful  # deterministic
    # The area's other prompts, for a second measurement: the same seeded order, past the first 6.
    rest = read(write_sets(tmp_path / "data", tmp_path / "rest", harmful=10, seed=0, harmful_from=6)["harmful"])
    assert len(rest) == 4 and {r["prompt"] for r in rest} == held - {r["prompt"] for r in harmful}
    whole = read(write_sets(tmp_path / "data", tmp_path / "whole", harmful=10, seed=0)["harmful"])
    assert whole == harmful + rest


def test_the_fresh_split_is_the_training_split_less_the_pilots_prompts(tmp_path, monkeypatch):
    import random

    import bench.heldout as heldout
    from aligner.training.data import DataSpec, load_source, split_by_prompt

    make_data(tmp_path / "data")
    monkeypatch.setattr(heldout, "PILOT_SHUFFLES", ((5, 6), (2, 4)))  # 40 tiny instructions: pilots of 6 and 4
    path = write_fresh_set(tmp_path / "data", tmp_path / "sets", count=100, seed=0)
    fresh = read(path)
    rows, _ = load_source(DataSpec.parse(str(tmp_path / "data/prefs/alpaca_eval_gpt4turbo.jsonl.gz")))
    train, val = split_by_prompt(rows, 0.1, 10**9, 0)
    seen = list(dict.fromkeys(r["prompt"][-1]["content"] for r in train))
    piloted = set()
    for shuffle_seed, taken in ((5, 6), (2, 4)):
        order = seen[:]
        random.Random(shuffle_seed).shuffle(order)
        piloted |= set(order[:taken])
    prompts = {r["prompt"] for r in fresh}
    assert prompts == set(seen) - piloted and len(prompts) == len(fresh) > 20
    assert not prompts & {r["prompt"][-1]["content"] for r in val}
    assert all(r["reference"] == r["prompt"].replace("instruction", "reference answer") for r in fresh)
    assert read(write_fresh_set(tmp_path / "data", tmp_path / "again", count=5, seed=0)) == fresh[:5]


@pytest.fixture(scope="module")
def judge():
    return ReferenceJudge({"Name a fruit.": "An apple is a fruit that grows on trees."})


def test_the_reference_judge_prefers_the_answer_closer_to_the_reference(judge):
    messages = [{"role": "user", "content": "Name a fruit."}]
    close, far = judge.score([messages, messages], ["An apple is a fruit.", "The stock market fell on Tuesday."])
    same = judge.score([messages], ["An apple is a fruit that grows on trees."])[0]
    assert same == pytest.approx(1.0, abs=1e-5) and same > close > far


def test_a_prompt_without_a_reference_is_not_judged(judge):
    assert judge.score([[{"role": "user", "content": "Something else"}]], ["anything"]) == [None]


def test_references_are_read_from_rows_that_have_one(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a", "reference": "A"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    assert load_references([path]) == {"a": "A"}


def test_saved_answers_are_judged_again_only_when_they_are_this_runs(tmp_path):
    from bench.cli import saved_answers
    from bench.quality import Answer, QualityConfig, dump

    cfg = QualityConfig(base_url="-", model="m", strategies={"plain": {}, "bon": {"strategy": "best_of_n"}},
                        prompt_sets={"s": ["a", "b"]})
    answers = [Answer("s", p, label, i, text=f"{p}-{label}", judge=0.3) for i, p in enumerate("ab") for label in cfg.strategies]
    path = tmp_path / "run.json"
    dump(answers, {}, path)
    again = saved_answers(path, cfg)
    assert [(a.prompt, a.strategy, a.text) for a in again] == [(a.prompt, a.strategy, a.text) for a in answers]
    assert all(a.judge is None for a in again)  # the new judge scores them
    with pytest.raises(ValueError, match="system message"):  # answered without one
        saved_answers(path, QualityConfig(**{**cfg.__dict__, "system": "Be brief."}))
    cfg.prompt_sets["s"].append("c")
    with pytest.raises(ValueError, match="other answers"):
        saved_answers(path, cfg)


def test_the_arguments_handed_to_bench_quality(tmp_path):
    import argparse

    from bench.cli import add_subcommands
    from bench.heldout import PROFILES, STRATEGIES, build_parser, quality_arguments

    make_data(tmp_path / "data")
    cli = argparse.ArgumentParser(prog="aligner")
    add_subcommands(cli.add_subparsers())

    def parsed(*argv):
        args = build_parser().parse_args(["--data", str(tmp_path / "data"), "--sets-dir", str(tmp_path / "sets"), *argv])
        return cli.parse_args(["bench", "quality", *quality_arguments(args), "--judge", "reference"])

    full = parsed("--harmful", "6")
    first = read(tmp_path / "sets/harmful.jsonl")
    assert full.profile == PROFILES and [s.partition("=")[0] for s in full.strategy] == list(STRATEGIES)
    assert (full.harmful, full.benign, full.limit, full.system) == (["harmful"], ["alpaca_val", "mt_bench"], 0, None)
    one = parsed("--profile", "harmless", "--system", "You are a helpful assistant.", "--max-tokens", "32")
    assert one.profile == ["harmless"] and one.strategy == [] and one.max_tokens == 32
    assert one.system == "You are a helpful assistant."
    parsed("--profile", "harmless", "--harmful-from", "6", "--harmful", "4")
    rest = read(tmp_path / "sets/harmful.jsonl")
    assert len(first) == 6 and len(rest) == 4 and not {r["prompt"] for r in first} & {r["prompt"] for r in rest}
    fresh = parsed("--fresh", "5")
    assert fresh.profile == ["helpful"] and fresh.benign == ["alpaca_fresh"] and fresh.harmful == []
    assert fresh.prompt_set == [f"alpaca_fresh={tmp_path / 'sets/alpaca_fresh.jsonl'}"]
    assert (tmp_path / "sets/alpaca_fresh.jsonl").is_file()  # empty here: the pilots' 120 cover these 36


def test_bad_counts_and_options_fresh_would_ignore_are_refused(capsys):
    import pytest

    from bench.heldout import parse_args

    for argv in (["--harmful-from", "-3"], ["--harmful", "ten"], ["--fresh", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert "whole number" in capsys.readouterr().err
    assert parse_args(["--fresh", "5", "--system", "Be brief."]).fresh == 5
    for extra in (["--harmful", "10"], ["--harmful-from", "120"], ["--profile", "harmless"]):
        with pytest.raises(SystemExit):
            parse_args(["--fresh", "5", *extra])
        assert f"cannot take {extra[0]}" in capsys.readouterr().err
