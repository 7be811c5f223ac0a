"""A guide must speak the policy's vocabulary: checked at start against the prepared default
model's own tokenizer and config, before any engine is built."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from decoding.guide_spec import vocabulary_mismatch
from decoding.model_prep import prepare_default_model


@pytest.fixture(scope="module")
def policy() -> Path:
    return prepare_default_model()


def guide_dir(tmp_path: Path, policy: Path, *, swap: tuple[str, str] | None = None, vocab_size: int | None = None,
              tokenizer: bool = True, config: bool = True) -> Path:
    target = tmp_path / "guide"
    target.mkdir()
    if tokenizer:
        data = json.loads((policy / "tokenizer.json").read_text())
        if swap:
            vocab = data["model"]["vocab"]
            vocab[swap[0]], vocab[swap[1]] = vocab[swap[1]], vocab[swap[0]]
        (target / "tokenizer.json").write_text(json.dumps(data))
    if config:
        settings = json.loads((policy / "config.json").read_text())
        if vocab_size is not None:
            settings["vocab_size"] = vocab_size
        (target / "config.json").write_text(json.dumps(settings))
    return target


@pytest.mark.parametrize("mode", ["genarm", "args"])
def test_a_guide_with_the_policy_tokenizer_passes(tmp_path, policy, mode):
    assert vocabulary_mismatch(policy, guide_dir(tmp_path, policy), mode) is None


@pytest.mark.parametrize("mode", ["genarm", "args"])
def test_a_guide_whose_token_ids_differ_is_refused_saying_how_many(tmp_path, policy, mode):
    why = vocabulary_mismatch(policy, guide_dir(tmp_path, policy, swap=("the", "and")), mode)
    assert why.startswith("its tokenizer is not the policy's (2 of ") and "share the policy's vocabulary" in why


def test_genarm_needs_the_policy_vocabulary_size_args_does_not(tmp_path, policy):
    size = json.loads((policy / "config.json").read_text())["vocab_size"]
    guide = guide_dir(tmp_path, policy, vocab_size=size + 64, tokenizer=False)
    assert f"{size + 64} entries, the policy's {size}" in vocabulary_mismatch(policy, guide, "genarm")
    assert vocabulary_mismatch(policy, guide, "args") is None


def test_what_a_folder_does_not_hold_is_not_held_against_it(tmp_path, policy):
    adapter = guide_dir(tmp_path, policy, tokenizer=False, config=False)
    assert vocabulary_mismatch(policy, adapter, "genarm") is None


def test_serve_stops_at_start_on_a_guide_of_another_vocabulary(tmp_path, policy):
    from server.cli import build_parser
    from server.serve import build_guides

    guide = guide_dir(tmp_path, policy, swap=("the", "and"))
    shutil.copy(policy / "config.json", guide / "config.json")
    args = build_parser().parse_args(["serve", "--guide", f"odd={guide}"])
    with pytest.raises(SystemExit) as stopped:
        build_guides(args, str(policy))
    assert str(stopped.value).startswith("aligner: --guide odd: its tokenizer is not the policy's")
    (tmp_path / "other").mkdir()
    fine = guide_dir(tmp_path / "other", policy)
    catalog = build_guides(build_parser().parse_args(["serve", "--guide", f"fine={fine}"]), str(policy))
    assert list(catalog.specs) == ["fine"]
    catalog.close()
