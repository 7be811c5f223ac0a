"""ARGS combine: logit + w · reward at each row's k candidate tokens, -inf elsewhere."""

from __future__ import annotations

import torch

from kernels._dispatch import next_pow2, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


if triton is not None:

    @triton.jit
    def _topk_combine_kernel(base_ptr, cand_ptr, reward_ptr, weight_ptr, out_ptr, vocab, k,
                             stride_b, stride_c, stride_r, stride_o, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
        row = tl.program_id(0)
        out_row = out_ptr + row * stride_o
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            tl.store(out_row + offs, tl.full([BLOCK], float("-inf"), tl.float32).to(out_ptr.dtype.element_ty),
                     mask=offs < vocab)
        # The candidates overwrite some of those -inf: without a barrier another warp's fill
        # could land after a candidate's write on a GPU (the interpreter, sequential, never shows it).
        tl.debug_barrier()
        ks = tl.arange(0, BLOCK_K)
        kmask = ks < k
        ids = tl.load(cand_ptr + row * stride_c + ks, mask=kmask, other=0)
        picked = tl.load(base_ptr + row * stride_b + ids, mask=kmask, other=0.0).to(tl.float32)
        rewards = tl.load(reward_ptr + row * stride_r + ks, mask=kmask, other=0.0).to(tl.float32)
        weight = tl.load(weight_ptr + row).to(tl.float32)
        tl.store(out_row + ids, (picked + weight * rewards).to(out_ptr.dtype.element_ty), mask=kmask)


def topk_reward_combine_triton(base, candidates, rewards, weight):
    out = torch.empty_like(base)
    batch, vocab = base.shape
    k = candidates.shape[1]
    if batch:
        _topk_combine_kernel[(batch,)](base, candidates.contiguous(), rewards.contiguous(), weight.to(torch.float32).contiguous(),
                                       out, vocab, k, base.stride(0), candidates.contiguous().stride(0),
                                       rewards.contiguous().stride(0), out.stride(0), BLOCK=1024, BLOCK_K=next_pow2(k))
    return out


def topk_reward_combine_torch(
    base: torch.Tensor, candidates: torch.Tensor, rewards: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """base: (batch, vocab); candidates: (batch, k) token ids; rewards: (batch, k);
    weight: (batch,) -> (batch, vocab)."""
    out = torch.full_like(base, float("-inf"))
    picked = base.gather(1, candidates).to(torch.float32)
    adjusted = picked + weight.to(torch.float32).unsqueeze(-1) * rewards.to(torch.float32)
    out.scatter_(1, candidates, adjusted.to(base.dtype))
    return out


def topk_reward_combine(base, candidates, rewards, weight):
    if triton is not None and use_triton(base):
        return topk_reward_combine_triton(base, candidates, rewards, weight)
    return topk_reward_combine_torch(base, candidates, rewards, weight)
