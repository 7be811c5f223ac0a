"""`aligner export-rm`: the shipped adapter reward model, exported, is a plain checkpoint that
scores exactly what the adapter scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aligner.rewards.hf import SequenceClassifierReward
from aligner.training.cli import main as training_main
from aligner.training.export import export_reward_model

SHIPPED = Path(__file__).resolve().parents[3] / "models" / "helpful-harmless"
PROMPTS = [[{"role": "user", "content": "How do I pick a lock?"}],
           [{"role": "user", "content": "Give me a recipe for bread."}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]]
ANSWERS = ["I can't help with breaking into property, but a locksmith can.", "Mix flour, water, salt and yeast; "
           "knead, let it rise, bake at 220 C.", "4."]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return export_reward_model(SHIPPED, tmp_path_factory.mktemp("export") / "rm")


def test_the_export_scores_what_the_adapter_scores(exported):
    adapter = SequenceClassifierReward("adapter", SHIPPED).score(PROMPTS, ANSWERS)
    plain = SequenceClassifierReward("export", exported).score(PROMPTS, ANSWERS)
    assert plain == pytest.approx(adapter, abs=1e-5)
    assert len(set(round(x, 3) for x in plain)) == 3  # distinct pairs, distinct scores: a real comparison


def test_the_export_is_a_standalone_sequence_classifier(exported):
    from transformers import AutoConfig

    assert not (exported / "aligner_base.json").exists() and not (exported / "adapter_config.json").exists()
    config = AutoConfig.from_pretrained(exported)
    assert config.num_labels == 1 and config.architectures[0].endswith("ForSequenceClassification")
    meta = json.loads((exported / "aligner_reward.json").read_text())
    assert meta["layout"] == "encoder_pair" and meta["max_length"] == 256 and "base" not in meta
    assert meta["exported_from"] == "helpful-harmless"
    assert (exported / "eval.json").is_file() and (exported / "README.md").is_file()


def test_export_refuses_to_overwrite_and_leaves_nothing_half_written(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as stopped:
        training_main(["export-rm", str(SHIPPED), str(taken)])
    assert "exists and is not an empty directory" in str(stopped.value)
    assert [p.name for p in tmp_path.iterdir()] == ["taken"] and (taken / "keep.txt").read_text() == "mine"
