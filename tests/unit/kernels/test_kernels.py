"""Each Triton kernel against its torch reference on awkward shapes. On a CPU the kernels run
in Triton's interpreter (conftest sets TRITON_INTERPRET=1 before `kernels` is imported);
bf16/fp16 and large shapes run on a GPU only."""

from __future__ import annotations

import pytest
import torch

from kernels.candidate_attention import (
    candidate_attention_expanded_torch,
    candidate_attention_torch,
    candidate_attention_triton,
)
from kernels.guide_combine import guide_combine_torch, guide_combine_triton
from kernels.reward_head import reward_head_torch, reward_head_triton
from kernels.topk_combine import topk_reward_combine_torch, topk_reward_combine_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=5e-2), torch.float16: dict(rtol=5e-3, atol=5e-3)}
# `tl.dot` on float32 runs as TF32 on NVIDIA GPUs (10-bit mantissa): products lose ~5e-4
# relative, sums of them over the head dimension more; the interpreter computes in full float32.
TOL_DOT = {**TOL, torch.float32: dict(rtol=3e-3, atol=3e-3) if DEVICE == "cuda" else TOL[torch.float32]}


@pytest.mark.parametrize("batch, vocab", [(1, 1), (1, 7), (3, 1000), (2, 4097)])
def test_guide_combine_matches_reference(batch, vocab):
    torch.manual_seed(vocab)
    base, guide = torch.randn(batch, vocab, device=DEVICE) * 5, torch.randn(batch, vocab, device=DEVICE) * 5
    alpha = torch.linspace(0, 2, batch, device=DEVICE)
    out = guide_combine_triton(base, guide, alpha)
    torch.testing.assert_close(out, guide_combine_torch(base, guide, alpha), **TOL[torch.float32])
    assert torch.equal(out[0], base[0])  # alpha = 0: untouched


@pytest.mark.parametrize("batch, vocab, k", [(1, 5, 1), (3, 1001, 10), (2, 300, 64)])
def test_topk_combine_matches_reference(batch, vocab, k):
    torch.manual_seed(k)
    base = torch.randn(batch, vocab, device=DEVICE)
    candidates = torch.topk(base, k, dim=-1).indices
    rewards, weight = torch.randn(batch, k, device=DEVICE), torch.rand(batch, device=DEVICE) * 3
    out = topk_reward_combine_triton(base, candidates, rewards, weight)
    expected = topk_reward_combine_torch(base, candidates, rewards, weight)
    # Outside the candidates: -inf, exactly. On them: base + weight * reward, which a GPU's Triton
    # fuses into one multiply-add (one rounding, not two), so equal within float32's rounding.
    outside = torch.ones_like(base, dtype=torch.bool).scatter_(1, candidates, False)
    assert torch.equal(out[outside], expected[outside]) and bool(torch.isinf(out[outside]).all())
    torch.testing.assert_close(out.gather(1, candidates), expected.gather(1, candidates), **TOL[torch.float32])


@pytest.mark.parametrize(
    "batch, k, heads, kv_heads, head_dim, lengths",
    [(1, 1, 1, 1, 8, [0]), (1, 1, 4, 4, 8, [1]), (2, 10, 6, 2, 16, [33, 0]), (3, 3, 9, 3, 64, [5, 70, 1]), (1, 7, 4, 1, 24, [40]),
     (2, 64, 8, 2, 8, [9, 37])],  # 64 candidates x 4 grouped heads: 256 rows, four tiles
)
def test_candidate_attention_matches_reference(batch, k, heads, kv_heads, head_dim, lengths):
    torch.manual_seed(batch * 100 + k)
    slots_total, max_len = 5, 80
    kc = torch.randn(slots_total, kv_heads, max_len, head_dim, device=DEVICE)
    vc = torch.randn(slots_total, kv_heads, max_len, head_dim, device=DEVICE)
    q = torch.randn(batch, k, heads, head_dim, device=DEVICE)
    kn, vn = torch.randn(batch, k, kv_heads, head_dim, device=DEVICE), torch.randn(batch, k, kv_heads, head_dim, device=DEVICE)
    slots = torch.tensor([4, 1, 2][:batch], device=DEVICE)
    lens = torch.tensor(lengths, device=DEVICE)
    expected = candidate_attention_expanded_torch(q, kn, vn, kc, vc, slots, lens)
    torch.testing.assert_close(candidate_attention_torch(q, kn, vn, kc, vc, slots, lens), expected, **TOL[torch.float32])
    torch.testing.assert_close(candidate_attention_triton(q, kn, vn, kc, vc, slots, lens), expected, **TOL_DOT[torch.float32])


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 33), (4, 10, 576)])
def test_reward_head_matches_reference(shape):
    torch.manual_seed(shape[-1])
    hidden = torch.randn(*shape, device=DEVICE) * 3
    norm_w, head_w = torch.randn(shape[-1], device=DEVICE), torch.randn(1, shape[-1], device=DEVICE)
    torch.testing.assert_close(reward_head_triton(hidden, norm_w, head_w, 1e-5), reward_head_torch(hidden, norm_w, head_w, 1e-5),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_in_half_precision_on_large_shapes(dtype):
    base = torch.randn(32, 151_936, device="cuda", dtype=dtype)
    guide = torch.randn_like(base)
    alpha = torch.rand(32, device="cuda")
    torch.testing.assert_close(guide_combine_triton(base, guide, alpha).float(),
                               guide_combine_torch(base, guide, alpha).float(), **TOL[dtype])
    q = torch.randn(32, 10, 32, 128, device="cuda", dtype=dtype)
    kn, vn = torch.randn(32, 10, 8, 128, device="cuda", dtype=dtype), torch.randn(32, 10, 8, 128, device="cuda", dtype=dtype)
    kc, vc = torch.randn(32, 8, 4096, 128, device="cuda", dtype=dtype), torch.randn(32, 8, 4096, 128, device="cuda", dtype=dtype)
    slots, lens = torch.arange(32, device="cuda"), torch.randint(1, 4096, (32,), device="cuda")
    torch.testing.assert_close(candidate_attention_triton(q, kn, vn, kc, vc, slots, lens).float(),
                               candidate_attention_torch(q, kn, vn, kc, vc, slots, lens).float(), **TOL[dtype])


def test_the_switch_selects_triton(monkeypatch):
    """The engine process chooses kernels with this same function and environment."""
    import torch

    from kernels._dispatch import use_triton

    monkeypatch.setenv("ALIGNER_KERNELS", "triton")
    assert use_triton(torch.empty(1))
    monkeypatch.setenv("ALIGNER_KERNELS", "torch")
    assert not use_triton(torch.empty(1))
    monkeypatch.setenv("ALIGNER_KERNELS", "auto")
    assert use_triton(torch.empty(1)) == torch.cuda.is_available()
