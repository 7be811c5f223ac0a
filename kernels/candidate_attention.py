"""Attention of k new tokens per slot over that slot's cached prefix plus themselves.

Each candidate sees the slot's cache [0, length) and its own key/value, not the other
candidates' (ARGS scores k alternative next tokens). With k = 1 this is plain batched
decode attention. Grouped-query attention: query heads are a multiple of key/value heads.
"""

from __future__ import annotations

import math

import torch


def candidate_attention_torch(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """q: (batch, k, Hq, D); k_new, v_new: (batch, k, Hkv, D);
    k_cache, v_cache: (slots_total, Hkv, max_len, D); slots, lengths: (batch,) ->
    (batch, k, Hq, D). Reads each prefix once for all k candidates."""
    batch, kc, hq, d = q.shape
    hkv = k_new.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d)
    width = int(lengths.max().item()) if batch else 0
    keys = k_cache[slots, :, :width].float()  # (batch, Hkv, width, D)
    values = v_cache[slots, :, :width].float()
    qg = q.float().view(batch, kc, hkv, group, d)
    # Scores against the shared prefix: (batch, Hkv, k, group, width).
    prefix_scores = torch.einsum("bkhgd,bhtd->bhkgt", qg, keys) * scale
    valid = torch.arange(width, device=q.device)[None, :] < lengths[:, None]  # (batch, width)
    prefix_scores = prefix_scores.masked_fill(~valid[:, None, None, None, :], float("-inf"))
    self_scores = torch.einsum("bkhgd,bkhd->bhkg", qg, k_new.float()).unsqueeze(-1) * scale
    scores = torch.cat([prefix_scores, self_scores], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhkgt,bhtd->bkhgd", probs[..., :width], values)
    out = out + probs[..., width].permute(0, 2, 1, 3).unsqueeze(-1) * v_new.float().unsqueeze(3)
    return out.reshape(batch, kc, hq, d).to(q.dtype)


def candidate_attention_expanded_torch(q, k_new, v_new, k_cache, v_cache, slots, lengths):
    """The straightforward reference that copies each prefix k times (what per-candidate
    implementations do); same result, k times the memory traffic. Used by tests and the
    benchmark."""
    batch, kc, hq, d = q.shape
    outs = []
    for b in range(batch):
        length = int(lengths[b])
        rows = []
        for c in range(kc):
            keys = torch.cat([k_cache[slots[b], :, :length], k_new[b, c].unsqueeze(1)], dim=1).float()
            values = torch.cat([v_cache[slots[b], :, :length], v_new[b, c].unsqueeze(1)], dim=1).float()
            group = hq // keys.shape[0]
            keys = keys.repeat_interleave(group, dim=0)
            values = values.repeat_interleave(group, dim=0)
            scores = torch.einsum("hd,htd->ht", q[b, c].float(), keys) / math.sqrt(d)
            rows.append(torch.einsum("ht,htd->hd", torch.softmax(scores, -1), values))
        outs.append(torch.stack(rows))
    return torch.stack(outs).to(q.dtype)


def candidate_attention(q, k_new, v_new, k_cache, v_cache, slots, lengths):
    """Dispatcher: the torch reference everywhere for now (a Triton kernel is planned)."""
    return candidate_attention_torch(q, k_new, v_new, k_cache, v_cache, slots, lengths)
