"""ARGS combine: logit + w · reward at each row's k candidate tokens, -inf elsewhere."""

from __future__ import annotations

import torch


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
    """Dispatcher: the torch reference everywhere for now (a Triton kernel is planned)."""
    return topk_reward_combine_torch(base, candidates, rewards, weight)
