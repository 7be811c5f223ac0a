"""Attention of k new tokens per slot over that slot's cached prefix plus themselves.

Each candidate sees the slot's cache [0, length) and its own key/value, not the other
candidates' (ARGS scores k alternative next tokens). With k = 1 this is plain batched
decode attention. Grouped-query attention: query heads are a multiple of key/value heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels._dispatch import next_pow2, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


# Rows (candidates x query heads of a kv head) per program: k = 64 candidates with grouped
# heads would otherwise ask one program for more registers than a GPU has (OutOfResources).
MAX_BLOCK_M = 64

if triton is not None:

    @triton.jit
    def _candidate_attention_kernel(
        q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, slot_ptr, len_ptr, out_ptr,
        kc, group, head_dim, scale,
        sq0, sq1, sq2, sn0, sn1, sn2, sc0, sc1, sc2, so0, so1, so2,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)  # key/value head
        slot = tl.load(slot_ptr + b)
        length = tl.load(len_ptr + b)
        # row = candidate * group + query head in the group; a program takes BLOCK_M of them
        rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        cand = rows // group
        qh = h * group + rows % group
        rmask = rows < kc * group
        ds = tl.arange(0, BLOCK_D)
        dmask = ds < head_dim
        q = tl.load(q_ptr + b * sq0 + cand[:, None] * sq1 + qh[:, None] * sq2 + ds[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        cache = slot * sc0 + h * sc1
        # The prefix is read once per key/value head, for all k candidates and query heads.
        for start in range(0, length, BLOCK_T):
            ts = start + tl.arange(0, BLOCK_T)
            tmask = ts < length
            keys = tl.load(kc_ptr + cache + ts[:, None] * sc2 + ds[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            values = tl.load(vc_ptr + cache + ts[:, None] * sc2 + ds[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            scores = tl.dot(q, tl.trans(keys)) * scale
            scores = tl.where(tmask[None, :], scores, float("-inf"))
            new_m = tl.maximum(m_i, tl.max(scores, axis=1))
            p = tl.exp(scores - new_m[:, None])
            correction = tl.exp(m_i - new_m)
            l_i = l_i * correction + tl.sum(p, axis=1)
            acc = acc * correction[:, None] + tl.dot(p, values)
            m_i = new_m
        # Each candidate also attends to its own key/value.
        own = b * sn0 + cand[:, None] * sn1 + h * sn2 + ds[None, :]
        k_self = tl.load(kn_ptr + own, mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        v_self = tl.load(vn_ptr + own, mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        s_self = tl.sum(q * k_self, axis=1) * scale
        new_m = tl.maximum(m_i, s_self)
        correction = tl.exp(m_i - new_m)
        p_self = tl.exp(s_self - new_m)
        l_i = l_i * correction + p_self
        acc = acc * correction[:, None] + p_self[:, None] * v_self
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * so0 + cand[:, None] * so1 + qh[:, None] * so2 + ds[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def candidate_attention_triton(q, k_new, v_new, k_cache, v_cache, slots, lengths):
    """Same contract as `candidate_attention_torch`; one program per (request, kv head, tile of
    at most MAX_BLOCK_M candidate x query-head rows): the prefix is read once per tile."""
    batch, kc, hq, d = q.shape
    hkv = k_new.shape[2]
    q, k_new, v_new = q.contiguous(), k_new.contiguous(), v_new.contiguous()
    out = torch.empty_like(q)
    rows = kc * (hq // hkv)
    # tl.dot needs every tile dimension >= 16 on a GPU; the masks cover the padding.
    block_m = max(16, min(next_pow2(rows), MAX_BLOCK_M))
    if batch:
        _candidate_attention_kernel[(batch, hkv, triton.cdiv(rows, block_m))](
            q, k_new, v_new, k_cache, v_cache, slots.to(torch.int64).contiguous(), lengths.to(torch.int64).contiguous(), out,
            kc, hq // hkv, d, 1.0 / math.sqrt(d),
            q.stride(0), q.stride(1), q.stride(2), k_new.stride(0), k_new.stride(1), k_new.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1), out.stride(2),
            BLOCK_M=block_m, BLOCK_D=max(16, next_pow2(d)), BLOCK_T=32,
        )
    return out


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
    (batch, k, Hq, D). Reads each prefix once for all k candidates.

    One fused attention call (PyTorch's SDPA, in float32: its CPU kernel is faster there than
    in bf16) over [prefix | the k new keys], each candidate masked to the valid prefix and its
    own key. The prefix is a view of the cache when the slots are consecutive (the usual
    case), else a gather; grouped query heads share their key head, never repeated.
    """
    batch, kc, hq, d = q.shape
    width = int(lengths.max().item()) if batch else 0
    first = int(slots[0]) if batch else 0
    if batch and bool((slots == torch.arange(first, first + batch, device=slots.device)).all()):
        keys, values = k_cache[first : first + batch, :, :width], v_cache[first : first + batch, :, :width]
    else:
        keys, values = k_cache[slots, :, :width], v_cache[slots, :, :width]  # (batch, Hkv, width, D)
    keys = torch.cat([keys, k_new.transpose(1, 2).to(keys.dtype)], dim=2).float()
    values = torch.cat([values, v_new.transpose(1, 2).to(values.dtype)], dim=2).float()
    valid = torch.arange(width, device=q.device)[None, :] < lengths[:, None]
    own = torch.eye(kc, dtype=torch.bool, device=q.device)
    mask = torch.cat([valid[:, None, :].expand(batch, kc, width), own.expand(batch, kc, kc)], -1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2).float(), keys, values, attn_mask=mask[:, None], enable_gqa=True)
    return out.transpose(1, 2).to(q.dtype)


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
    if triton is not None and use_triton(q):
        return candidate_attention_triton(q, k_new, v_new, k_cache, v_cache, slots, lengths)
    return candidate_attention_torch(q, k_new, v_new, k_cache, v_cache, slots, lengths)
