"""The CPU numerics fixes and the start-up self-check, without a server: the vLLM plugin's
attention choice (AMX detection faked, vLLM's own function underneath), the comparison rule,
and the guide check on the shipped starter guides with a broken forward injected."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bench.launch import REPO
from decoding import self_check, vllm_plugin
from decoding.self_check import Reference, compare

STARTER_ARM = REPO / "models" / "helpful-harmless-arm"
STARTER_CAUSAL = REPO / "models" / "helpful-harmless-causal"


@pytest.fixture
def cpu_attn(monkeypatch):
    """vLLM's CPU attention module with vLLM's own ISA choice (the plugin may already have
    wrapped it in this process: anything that built vLLM's config loads plugins), restored after."""
    from vllm.v1.attention.backends import cpu_attn

    vllms = cpu_attn._get_attn_isa
    while hasattr(vllms, "__wrapped__"):
        vllms = vllms.__wrapped__
    monkeypatch.setattr(cpu_attn, "_get_attn_isa", vllms)
    monkeypatch.delenv(vllm_plugin.AMX_ATTENTION_ENV, raising=False)
    return cpu_attn


def test_plugin_turns_vllms_amx_attention_into_vec_on_an_amx_cpu(cpu_attn, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert cpu_attn._get_attn_isa(torch.bfloat16, 32, 64) == "amx"  # vLLM's own choice on AMX
    monkeypatch.setattr(vllm_plugin, "_registered", False)
    vllm_plugin.register()
    assert cpu_attn._get_attn_isa(torch.bfloat16, 32, 64) == "vec"
    # Only that choice changes: float32 and 16-token blocks never took the AMX kernel.
    assert cpu_attn._get_attn_isa(torch.float32, 32, 64) == "vec"
    assert cpu_attn._get_attn_isa(torch.bfloat16, 16, 64) == "vec16"
    wrapper = cpu_attn._get_attn_isa
    vllm_plugin._same_attention_as_other_families()  # applied twice in one process: still one wrapper
    assert cpu_attn._get_attn_isa is wrapper and not hasattr(wrapper.__wrapped__, "__wrapped__")


def test_plugin_leaves_vllms_choice_when_asked(cpu_attn, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setenv(vllm_plugin.AMX_ATTENTION_ENV, "1")
    monkeypatch.setattr(vllm_plugin, "_registered", False)
    vllm_plugin.register()
    assert cpu_attn._get_attn_isa(torch.bfloat16, 32, 64) == "amx"
    assert not hasattr(cpu_attn._get_attn_isa, "__wrapped__")


def test_attention_choice_reported_for_the_log_and_ready(monkeypatch):
    monkeypatch.delenv(vllm_plugin.AMX_ATTENTION_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert vllm_plugin.attention_choice("cpu", "bfloat16")["kernel"] == "vec"
    assert vllm_plugin.attention_choice("cpu", "float32")["kernel"] == "vllm-default"
    assert vllm_plugin.attention_choice("cuda", "bfloat16")["kernel"] == "vllm-default"
    monkeypatch.setenv(vllm_plugin.AMX_ATTENTION_ENV, "1")
    assert vllm_plugin.attention_choice("cpu", "bfloat16")["kernel"] == "amx"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert vllm_plugin.attention_choice("cpu", "bfloat16") == {"kernel": "vllm-default", "reason": "this CPU has no AMX"}


def _reference(n: int = 40, margin: float = 5.0) -> Reference:
    return Reference(list(range(n + 1)), [100 + i for i in range(n)], [margin] * n)


def test_compare_passes_agreement_and_fails_gibberish():
    ref = _reference()
    assert compare(list(ref.top1), ref, "bf16").passed
    one_off = list(ref.top1)
    one_off[3] = 7
    result = compare(one_off, ref, "bf16")
    assert result.passed and result.agreement == pytest.approx(39 / 40) and result.mismatches == [(3, 103, 7)]
    rotated = [t + 1 for t in ref.top1]  # every position wrong, as a broken kernel gives
    result = compare(rotated, ref, "bf16")
    assert not result.passed and result.agreement == 0.0 and len(result.mismatches) == 5
    assert "FAILED in bf16" in result.summary()


def test_compare_ignores_near_ties_but_not_when_nothing_is_confident():
    ref = _reference()
    ref.margins[:10] = [0.01] * 10  # near-ties: bf16 may flip them legitimately
    wrong_on_ties = [7] * 10 + ref.top1[10:]
    result = compare(wrong_on_ties, ref, "bf16")
    assert result.passed and result.positions == 30 and result.agreement == 1.0
    unsure = _reference(margin=0.01)  # nothing confident: every position counts
    assert not compare(wrong_on_ties, unsure, "bf16").passed
    assert compare(wrong_on_ties, unsure, "bf16").positions == 40
    assert not compare([], ref, "bf16").passed  # an engine that returned nothing


def test_prompt_top1_reads_vllms_prompt_logprobs():
    lp = lambda rank: SimpleNamespace(rank=rank, logprob=-1.0)  # noqa: E731
    prompt_logprobs = [None, {5: lp(3), 9: lp(1)}, {4: lp(1)}, None]
    assert self_check.prompt_top1(prompt_logprobs) == [9, 4, None]


def test_auto_mode_checks_small_checkpoints_only(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    assert self_check.resolve_mode("auto", tmp_path)
    assert not self_check.resolve_mode("off", tmp_path)
    monkeypatch.setattr(self_check, "AUTO_MAX_WEIGHT_BYTES", 999)
    assert not self_check.resolve_mode("auto", tmp_path) and self_check.resolve_mode("on", tmp_path)


@pytest.mark.parametrize(("path", "mode"), [(STARTER_ARM, "genarm"), (STARTER_CAUSAL, "args")])
def test_starter_guides_pass_their_check_and_a_broken_forward_fails_it(path, mode, monkeypatch):
    from decoding.guide_model import SlotDecoder

    result = self_check.check_guide(str(path), mode, "bfloat16", None)
    assert result.passed, result.summary()
    assert result.positions >= 8 and result.agreement >= self_check.MIN_AGREEMENT
    if mode == "genarm":
        broken = SlotDecoder.next_token_logits
        monkeypatch.setattr(SlotDecoder, "next_token_logits", lambda self, h: broken(self, h).roll(1, dims=-1))
    else:
        broken = SlotDecoder.append_and_score
        monkeypatch.setattr(SlotDecoder, "append_and_score", lambda self, t, c: -broken(self, t, c))
    result = self_check.check_guide(str(path), mode, "bfloat16", None)
    assert not result.passed and result.agreement < 0.5, result.summary()


def test_the_decode_check_passes_float32s_own_greedy_tokens_and_fails_shifted_ones():
    """The engine's decode check: a continuation decoded greedily by float32 itself agrees at
    every position, the same tokens each shifted by one vocabulary entry at almost none."""
    from transformers import AutoModelForCausalLM

    from decoding.model_prep import prepare_default_model

    policy = prepare_default_model()
    check_ids, prompt_ids = self_check.engine_check_ids(policy)
    assert prompt_ids and check_ids[:len(prompt_ids) - 3] == prompt_ids[:len(prompt_ids) - 3]
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    greedy: list[int] = []
    with torch.inference_mode():  # greedy past the end-of-sequence token, as the engine's check decodes
        for _ in range(self_check.DECODE_TOKENS):
            greedy.append(int(model(torch.tensor([prompt_ids + greedy])).logits[0, -1].argmax()))
    assert len(greedy) == self_check.DECODE_TOKENS
    prefill, decode = self_check.causal_references(policy, check_ids, prompt_ids, greedy)
    assert prefill.token_ids == check_ids and len(prefill.top1) == len(check_ids) - 1
    assert decode.token_ids == prompt_ids + greedy and len(decode.top1) == len(greedy)
    assert compare(greedy, decode, "float32").passed
    shifted = [(t + 1) % model.config.vocab_size for t in greedy]
    _, decode_shifted = self_check.causal_references(policy, check_ids, prompt_ids, shifted)
    result = compare(shifted, decode_shifted, "bf16")
    assert not result.passed and result.agreement < 0.5, result.summary()
