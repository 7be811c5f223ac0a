"""The guided-decoding state in vLLM's style: fake logits, a simulated persistent batch with
random add / remove / move over many steps, every row checked against a slow reference that
recomputes the guide from scratch. No engine needed."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from decoding.guide_model import SlotDecoder, SlotsFull
from decoding.guided_processor import GuidedState, GuideSet
from kernels.candidate_attention import candidate_attention_expanded_torch, candidate_attention_torch
from kernels.guide_combine import guide_combine_torch
from kernels.topk_combine import topk_reward_combine_torch

VOCAB = 61


def tiny_config(**kw):
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **kw)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    arm = LlamaForCausalLM(tiny_config()).eval()
    rm = LlamaForSequenceClassification(tiny_config(num_labels=1, pad_token_id=0)).eval()
    return arm, rm


def guide_set(models, max_slots=8, max_len=128) -> GuideSet:
    arm, rm = models
    return GuideSet(decoders={"arm": SlotDecoder(arm, max_slots, max_len), "rm": SlotDecoder(rm, max_slots, max_len)},
                    modes={"arm": "genarm", "rm": "args"})


def reference(models, spec, tokens, base):
    """Recompute the guided logits of one row from scratch with the Hugging Face models."""
    arm, rm = models
    if spec is None:
        return base
    with torch.no_grad():
        if spec["mode"] == "genarm":
            guide = arm(torch.tensor([tokens])).logits[0, -1]
            return guide_combine_torch(base[None], guide[None], torch.tensor([spec["alpha"]]))[0]
        candidates = torch.topk(base, spec["k"]).indices
        # The reward of prefix + candidate, read at the candidate (the last position; HF's own
        # pooling would skip a trailing token equal to the pad id).
        rewards = torch.stack([rm.score(rm.model(torch.tensor([tokens + [int(c)]])).last_hidden_state[0, -1])[0]
                               for c in candidates])
        return topk_reward_combine_torch(base[None], candidates[None], rewards[None], torch.tensor([spec["weight"]]))[0]


def random_spec(rng):
    kind = rng.choice(["none", "genarm", "args"])
    if kind == "none":
        return None
    if kind == "genarm":
        return {"guide": "arm", "mode": "genarm", "alpha": rng.choice([0.0, 0.5, 2.0])}
    return {"guide": "rm", "mode": "args", "k": rng.choice([1, 3, 5]), "weight": rng.choice([0.0, 1.0, 3.0])}


def test_random_batch_updates_keep_every_row_aligned(models):
    rng = random.Random(0)
    torch.manual_seed(1)
    state = GuidedState(guide_set(models))
    rows: list[dict | None] = [None] * 6  # row index -> request
    for step in range(40):
        # removed, then added, then moved - the order vLLM documents.
        for i in range(len(rows)):
            if rows[i] is not None and rng.random() < 0.15:
                state.remove(i)
                rows[i] = None
        for i in range(len(rows)):
            if rows[i] is None and rng.random() < 0.4:
                spec = random_spec(rng)
                request = {"spec": spec, "prompt": [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 6))], "outputs": []}
                state.add(i, {"aligner_guide": spec} if spec else None, request["prompt"], request["outputs"])
                rows[i] = request
        if rng.random() < 0.5:
            a, b = rng.sample(range(len(rows)), 2)
            swap = rng.random() < 0.5 or rows[b] is not None
            if swap:
                state.move(a, b, True)
                rows[a], rows[b] = rows[b], rows[a]
            elif rows[a] is not None:
                state.move(a, b, False)
                rows[b], rows[a] = rows[a], None
        base = torch.randn(len(rows), VOCAB)
        out = state.apply(base.clone())
        for i, request in enumerate(rows):
            if request is None:
                continue
            expected = reference(models, request["spec"], request["prompt"] + request["outputs"], base[i])
            torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-4, msg=f"step {step} row {i}")
            # The engine samples; the live output list grows.
            finite = torch.isfinite(out[i])
            request["outputs"].append(int(torch.where(finite, out[i], -1e9).argmax()))
    # Every slot still held belongs to a live guided row.
    held = sum(d.max_slots - d.free_slots for d in state.guides.decoders.values())
    assert held == sum(1 for i, r in state.rows.items() if r.slot is not None)


def test_alpha_zero_and_weight_zero_keep_greedy_choice(models):
    state = GuidedState(guide_set(models))
    prompt = [3, 4, 5]
    state.add(0, {"aligner_guide": {"guide": "arm", "mode": "genarm", "alpha": 0.0}}, prompt, [])
    state.add(1, {"aligner_guide": {"guide": "rm", "mode": "args", "k": 4, "weight": 0.0}}, prompt, [])
    base = torch.randn(2, VOCAB)
    out = state.apply(base.clone())
    assert torch.equal(out[0], base[0])
    assert out[1].argmax() == base[1].argmax()


def test_slots_are_bounded_and_freed(models):
    state = GuidedState(guide_set(models, max_slots=2))
    for i in range(3):
        state.add(i, {"aligner_guide": {"guide": "arm", "mode": "genarm", "alpha": 1.0}}, [1, 2], [])
    base = torch.randn(3, VOCAB)
    out = state.apply(base.clone())
    assert sum(r.disabled is not None for r in state.rows.values()) == 1
    disabled = next(i for i, r in state.rows.items() if r.disabled)
    assert torch.equal(out[disabled], base[disabled])  # runs unguided, never crashes
    state.remove(0)
    state.remove(1)
    assert state.guides.decoders["arm"].free_slots == 2


def test_a_lagging_output_list_is_left_unguided_that_step(models):
    state = GuidedState(guide_set(models))
    state.add(0, {"aligner_guide": {"guide": "arm", "mode": "genarm", "alpha": 1.0}}, [1, 2, 3], [])
    state.apply(torch.randn(1, VOCAB))
    base = torch.randn(1, VOCAB)
    assert torch.equal(state.apply(base.clone()), base)  # no new token arrived


def test_unguided_steps_are_reported_to_the_server(models, tmp_path):
    """What the engine could not guide reaches the server as report files, and the response
    counts only the steps that were guided."""
    from dataclasses import dataclass

    from aligner.strategies.guided import guided_steps
    from decoding.guide_spec import read_guide_reports

    @dataclass
    class Choice:
        token_ids: list

    state = GuidedState(guide_set(models, max_slots=1), str(tmp_path))
    outputs = [[], []]
    for i in range(2):  # one slot for two rows of one request (n=2): the second runs unguided
        state.add(i, {"aligner_guide": {"guide": "arm", "mode": "genarm", "alpha": 1.0, "report": "req-a"}},
                  [1, 2], outputs[i])
    state.add(2, {"aligner_guide": {"guide": "arm", "mode": "genarm", "report": "req-b"}}, [1], [])
    for step in range(3):
        state.apply(torch.randn(3, VOCAB))
        outputs[0].append(7)
        outputs[1].append(8 + step)
    reports = read_guide_reports(str(tmp_path), "req-a")
    assert len(reports) == 1 and reports[0]["stopped"] and "slot" in reports[0]["reason"]
    assert read_guide_reports(str(tmp_path), "req-a") == []  # read once
    # Row 1 (tokens 8, 9, 10) never got a slot: only row 0's three steps were guided.
    assert guided_steps([Choice([7, 7, 7]), Choice([8, 9, 10])], reports) == 3
    state.remove(0)
    state.add(0, {"aligner_guide": {"guide": "arm", "mode": "genarm", "report": "req-c"}}, [1], [])
    state.apply(torch.randn(3, VOCAB))
    assert read_guide_reports(str(tmp_path), "req-c") == []  # guided throughout: nothing to report
    assert guided_steps([Choice([7, 7, 7])], []) == 3


def test_decoder_refuses_sequences_past_its_limit(models):
    decoder = SlotDecoder(models[0], max_slots=1, max_len=4)
    slot = decoder.allocate()
    with pytest.raises(SlotsFull):
        decoder.append({slot: [1, 2, 3, 4, 5]})
    with pytest.raises(SlotsFull):
        decoder.allocate()


def test_an_accepted_candidate_is_copied_from_its_scoring_pass(models):
    """ARGS: the token the engine accepts was scored as a candidate the step before; its
    keys/values are copied from that pass instead of a new forward, and every later reward
    still equals the reward recomputed from scratch. A token that was not a candidate (or a
    catch-up of several) takes the forward."""
    _, rm = models
    decoder = SlotDecoder(rm, max_slots=3, max_len=32)
    slots = [decoder.allocate(), decoder.allocate()]
    sequences = {slots[0]: [5, 7, 9], slots[1]: [11, 2]}
    new = dict(sequences)
    steps = [{slots[0]: 1, slots[1]: 0}, {slots[0]: 2, slots[1]: None}, {slots[0]: 0, slots[1]: 3}]
    offered = 0  # accepted tokens that were candidates, so far
    for step, picks in enumerate(steps):
        candidates = torch.tensor([[3 + step, 8, 13 + step, 21], [4, 6 + step, 10, 40]])
        rewards = decoder.append_and_score(new, candidates)
        assert decoder.copied_tokens == offered
        for row, slot in enumerate(slots):
            with torch.no_grad():
                expected = torch.stack([rm.score(rm.model(torch.tensor([sequences[slot] + [int(c)]])).last_hidden_state[0, -1])[0]
                                        for c in candidates[row]])
            torch.testing.assert_close(rewards[row], expected, rtol=1e-4, atol=1e-4, msg=f"step {step} slot {slot}")
        new = {}
        for row, slot in enumerate(slots):
            pick = picks[slot]
            # None: the engine's token was not a candidate (two tokens arrive, as after a lag).
            tokens = [int(candidates[row, pick])] if pick is not None else [50, 51]
            offered += pick is not None
            sequences[slot] = sequences[slot] + tokens
            new[slot] = tokens
    decoder.append_and_score(new, torch.tensor([[1], [2]]))
    assert decoder.copied_tokens == offered == 5
    assert decoder.lengths[slots].tolist() == [len(sequences[s]) for s in slots]


@pytest.mark.parametrize("k, heads, kv_heads, lengths", [(1, 4, 4, [0, 1, 7]), (10, 6, 2, [3]), (3, 4, 1, [0, 0])])
def test_candidate_attention_matches_the_expanded_reference(k, heads, kv_heads, lengths):
    torch.manual_seed(k)
    d, slots_total, max_len = 8, 4, 9
    k_cache, v_cache = torch.randn(slots_total, kv_heads, max_len, d), torch.randn(slots_total, kv_heads, max_len, d)
    b = len(lengths)
    q, k_new, v_new = torch.randn(b, k, heads, d), torch.randn(b, k, kv_heads, d), torch.randn(b, k, kv_heads, d)
    slots, lens = torch.tensor(list(range(b))[::-1]), torch.tensor(lengths)
    torch.testing.assert_close(
        candidate_attention_torch(q, k_new, v_new, k_cache, v_cache, slots, lens),
        candidate_attention_expanded_torch(q, k_new, v_new, k_cache, v_cache, slots, lens),
        rtol=1e-5, atol=1e-5,
    )


def test_guide_combine_samples_at_reduced_temperature():
    base, guide = torch.randn(1, 7), torch.randn(1, 7)
    out = guide_combine_torch(base, guide, torch.tensor([1.5]))
    expected = 2.5 * (base + 1.5 * torch.log_softmax(guide, -1))
    torch.testing.assert_close(out, expected)
    assert math.isfinite(float(out.sum()))


@pytest.mark.parametrize("bias", [False, True])
def test_fused_projections_equal_the_separate_linears(monkeypatch, bias):
    """q/k/v (or gate/up) as one GEMM - vLLM's prepacked oneDNN one on CPU, `F.linear` where
    that is missing - gives what each projection gives on its own."""
    import decoding.guide_model as guide_model

    torch.manual_seed(0)
    projections = [torch.nn.Linear(16, n, bias=bias) for n in (16, 8, 8)]
    x = torch.randn(5, 16)
    expected = torch.cat([p(x) for p in projections], -1).detach()
    torch.testing.assert_close(guide_model.fused_linear(projections)(x), expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(guide_model, "_onednn", lambda: None)
    torch.testing.assert_close(guide_model.fused_linear(projections)(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 80])
def test_int8_projections_stay_close_to_the_exact_ones(rows):
    """W8A8: per-channel int8 weights, per-row int8 activations, on vLLM's oneDNN int8 GEMM.
    The error is the quantisation's (about 1% of the output's range), for any batch size, on
    this CPU whatever its int8 instructions (without VNNI 8-bit weights overflowed: 20-26%), and
    the GEMM keeps working after everything but itself is gone (its scales must outlive it)."""
    import gc

    import decoding.guide_model as guide_model

    if guide_model._onednn() is None:
        pytest.skip("this vLLM build has no oneDNN CPU kernels")
    torch.manual_seed(rows)
    projections = [torch.nn.Linear(64, n, bias=True, dtype=torch.bfloat16) for n in (64, 32)]
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    expected = torch.cat([p(x) for p in projections], -1).detach().float()
    gemm = guide_model.fused_linear(projections, quantize=True)
    del projections
    gc.collect()
    error = (gemm(x).float() - expected).abs().max() / expected.abs().max()
    assert 0 < error < 0.03


def test_int8_projections_need_the_onednn_kernels(monkeypatch):
    import decoding.guide_model as guide_model

    monkeypatch.setattr(guide_model, "_onednn", lambda: None)
    with pytest.raises(ValueError, match="int8"):
        guide_model.fused_linear([torch.nn.Linear(8, 8)], quantize=True)


def test_int8_reaches_the_guide_runners(models, tmp_path):
    """`--guide-quantization int8` -> the engine's additional config -> `load_guides`, which is
    what the logits processor calls in the engine process: every projection is an int8 GEMM."""
    import decoding.guide_model as guide_model
    from decoding.guide_spec import CONFIG_KEY, GuideCatalog
    from decoding.guided_processor import load_guides
    from decoding.vllm_config import VLLMEngineConfig

    if guide_model._onednn() is None:
        pytest.skip("this vLLM build has no oneDNN CPU kernels")
    from transformers import AutoTokenizer

    from decoding.model_prep import prepare_default_model

    models[1].save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(prepare_default_model()).save_pretrained(tmp_path / "rm")  # the loader reads one
    guides = GuideCatalog({"rm": {"path": str(tmp_path / "rm"), "mode": "args"}})
    engine = VLLMEngineConfig(model="unused", guides=guides, guide_quantization="int8").engine_args("cpu")
    config = engine.additional_config[CONFIG_KEY]
    assert config["quantization"] == "int8"
    decoder = load_guides(config, "cpu").decoders["rm"]
    for layer in decoder.layers:
        assert all(isinstance(p, guide_model._Int8Gemm) for p in (layer.qkv, layer.o, layer.gate_up, layer.down))
    plain = load_guides({**config, "quantization": None}, "cpu").decoders["rm"]
    assert not isinstance(plain.layers[0].qkv, guide_model._Int8Gemm)


def test_the_warm_up_runs_every_guide_and_leaves_nothing_behind(models, monkeypatch):
    from decoding import guided_processor

    guides = guide_set(models)
    steps = []
    real_apply = GuidedState.apply
    monkeypatch.setattr(GuidedState, "apply", lambda self, logits: steps.append(
        {i: (r.guide, r.k) for i, r in self.rows.items()}) or real_apply(self, logits))
    guided_processor.warm_up(guides, VOCAB, "cpu")
    assert [s[0] for s in steps] == [("arm", 1)] + [("rm", min(k, VOCAB)) for k in guided_processor.WARM_UP_K]
    assert all(d.free_slots == d.max_slots for d in guides.decoders.values())
