"""Candidate reward head: final RMSNorm and a linear one-output head, fused, for the k
candidates' last hidden states -> (batch, k) rewards."""

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
    def _reward_head_kernel(h_ptr, norm_ptr, head_ptr, out_ptr, hidden, eps, stride_h, BLOCK_H: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_H)
        mask = cols < hidden
        x = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / hidden + eps)
        w = tl.load(norm_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(head_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row, tl.sum(x * rstd * w * v, axis=0))


def reward_head_triton(hidden: torch.Tensor, norm_weight: torch.Tensor, head_weight: torch.Tensor, eps: float) -> torch.Tensor:
    shape = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=hidden.device)
    if flat.shape[0]:
        _reward_head_kernel[(flat.shape[0],)](flat, norm_weight.contiguous(), head_weight.reshape(-1).contiguous(), out,
                                              flat.shape[1], eps, flat.stride(0), BLOCK_H=next_pow2(flat.shape[1]))
    return out.view(shape)


def reward_head_torch(hidden: torch.Tensor, norm_weight: torch.Tensor, head_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """hidden: (batch, k, H); norm_weight: (H,); head_weight: (1, H) or (H,) -> (batch, k) fp32."""
    x = hidden.float()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * norm_weight.float()) @ head_weight.reshape(-1).float()


def reward_head(hidden, norm_weight, head_weight, eps):
    if triton is not None and use_triton(hidden):
        return reward_head_triton(hidden, norm_weight, head_weight, eps)
    return reward_head_torch(hidden, norm_weight, head_weight, eps)
