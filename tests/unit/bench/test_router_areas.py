"""`bench.router_areas`: it must train what `models/harmful-request` trained, with another area held out."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from bench.launch import REPO
from bench.router_areas import format_table, row_of, training_config

SHIPPED = REPO / "models/harmful-request/eval.json"


def test_with_malicious_uses_held_out_it_is_the_shipped_classifiers_config():
    shipped = json.loads(SHIPPED.read_text())["config"]
    shipped.pop("card_notes")  # words on the card, not training settings
    config = dataclasses.asdict(training_config(Path("../shared/data"), "malicious_uses", Path("models/harmful-request")))
    config.pop("card_notes")
    assert config == shipped


def test_another_area_swaps_training_and_report_sides():
    config = training_config(Path("d"), "information_hazard", Path("out"))
    assert config.positive[0] == "d/prompts/do_not_answer.jsonl#not-category=information_hazard"
    assert config.report_positive == ["d/prompts/do_not_answer.jsonl#category=information_hazard"]


def test_a_row_and_its_table_line():
    record = json.loads(SHIPPED.read_text())
    row = row_of("malicious_uses", record)
    assert row["recall"] == {k: record["held_out"]["do_not_answer#category=malicious_uses"][k] for k in ("n", "flagged", "rate")} | {"class": "positive"}
    assert set(row["false_positives"]) == {"alpaca_eval_gpt4turbo", "mt_bench"}
    table = format_table([row]).splitlines()
    m = row["recall"]
    assert len(table) == 3 and table[2].startswith(f"| `malicious_uses` | {m['flagged']} / {m['n']} (")
