"""A guide model with one KV-cache slot per guided request, run beside the vLLM engine.

`SlotDecoder` holds a Llama-family decoder's weights (taken from a Hugging Face model:
`*ForCausalLM` for GenARM guides, `*ForSequenceClassification` for ARGS reward models) and a
preallocated cache of `max_slots` x `max_len` tokens. Each engine step it appends the token
the engine accepted for every active slot in one batched forward (ragged lengths, per-row
positions) and returns next-token logits (GenARM), or - in that same forward - scores k
candidate next tokens per slot against the cached prefix without copying it (ARGS). The
projections are fused (q/k/v, gate/up) and, on CPU, run on vLLM's prepacked oneDNN GEMM.
Attention goes through the dispatchers in `kernels/`, so Triton kernels can replace the
torch references.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from decoding.model_refs import GUIDE_MODEL_TYPES as SUPPORTED_TYPES
from decoding.guide_spec import MAX_K
from kernels.candidate_attention import candidate_attention
from kernels.reward_head import reward_head


class SlotsFull(RuntimeError):
    pass


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(..., H) -> (..., H); statistics in fp32 like the reference models."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (T, 1, D) in `dtype`, for positions (T,): computed once per forward
    and used by every layer (angles in float32, applied in the model's dtype, as Hugging Face does)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[:, None, :].to(dtype), emb.sin()[:, None, :].to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding. x: (T, heads, D); cos, sin from `rope_tables` -> (T, heads, D)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _onednn():
    """vLLM's CPU GEMM ops when this build has them, else None."""
    try:
        import vllm._custom_ops as ops
    except ImportError:  # pragma: no cover - vLLM is a dependency; kept importable without it
        return None
    return ops if getattr(ops, "_supports_onednn", False) else None


def fused_linear(projections: list[torch.nn.Linear], quantize: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """One GEMM for several projections of the same input (q/k/v, gate/up): their weights
    concatenated along the outputs, the result split by the caller. On CPU the weight is
    prepacked for vLLM's oneDNN GEMM, the kernel the engine's own linears use (about twice
    `F.linear` at decode batch sizes); elsewhere it is `F.linear`.

    `quantize`: W8A8 int8 on vLLM's oneDNN int8 GEMM (CPU only): the weight rounded to int8
    with one scale per output channel, each input row quantized on the fly with its own scale
    (what vLLM's dynamic w8a8 linears do); about 1.8x the bf16 GEMM on a CPU with AVX-512 VNNI.
    Without VNNI the weights keep 7 bits (`int8_weight_max`)."""
    weight = torch.cat([p.weight.detach() for p in projections])
    biases = [p.bias for p in projections]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.detach() if b is not None else weight.new_zeros(p.out_features) for b, p in zip(biases, projections)])
    ops = _onednn() if weight.device.type == "cpu" else None
    if quantize:
        if ops is None:
            raise ValueError("int8 guide quantization needs vLLM's oneDNN CPU kernels (a CPU guide)")
        gemm = _Int8Gemm(ops, weight)
    elif ops is None:
        return lambda x: F.linear(x, weight, bias)
    else:
        try:
            handle = ops.create_onednn_mm(weight.t(), 32)  # packs its own copy of the weight
        except RuntimeError:  # a dtype oneDNN does not pack: vLLM falls back the same way
            return lambda x: F.linear(x, weight, bias)
        gemm = lambda x: ops.onednn_mm(handle, x.contiguous(), None)  # noqa: E731
    if bias is None:
        return gemm
    return lambda x: gemm(x) + bias  # bias added in the model's dtype, like F.linear


def int8_weight_max() -> int:
    """Largest int8 weight magnitude the CPU's int8 GEMM multiplies without overflow.

    Without VNNI (AVX2, AVX-512 before Cascade Lake) oneDNN multiplies u8 activations by s8
    weights with `vpmaddubsw`, which adds two products into a saturating int16: 255 * 127 * 2
    overflows, and measured W8A8 outputs were 20-26% off (AMD EPYC, AVX2 only). Weights held to
    7 bits (|w| <= 63) cannot overflow there; VNNI and AMX accumulate in int32 and take 8 bits."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        flags = []
    return 127 if {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags) else 63


class _Int8Gemm:
    """x (T, K) in the model's dtype -> x @ weight.T (T, N), int8 weights and activations."""

    def __init__(self, ops, weight: torch.Tensor):
        w = weight.float()
        qmax = int8_weight_max()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / qmax  # per output channel, symmetric
        w_q = torch.round(w / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
        # The handle packs its own copy of the weight but reads the scales from this tensor,
        # which must live as long as it does (vLLM keeps them as a layer parameter).
        self.scale = scale.view(-1, 1)
        self.handle = ops.create_onednn_scaled_mm(w_q.t(), self.scale, weight.dtype, True, False, 32)
        self.ops, self.n = ops, weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x_q, x_scale, _ = self.ops.onednn_scaled_int8_quant(x.contiguous(), None, None, True)  # per row
        out = torch.empty((x.shape[0], self.n), dtype=x.dtype, device=x.device)
        self.ops.onednn_scaled_mm(self.handle, x_q, out, x_scale, None, None, None)
        return out


class _Layer:
    def __init__(self, layer, quantize: bool):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = fused_linear([attn.q_proj, attn.k_proj, attn.v_proj], quantize)
        self.o = fused_linear([attn.o_proj], quantize)
        self.gate_up = fused_linear([mlp.gate_proj, mlp.up_proj], quantize)
        self.down = fused_linear([mlp.down_proj], quantize)
        self.ln1, self.ln2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight


class SlotDecoder:
    def __init__(self, hf_model, max_slots: int, max_len: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 quantize: bool = False):
        """`quantize`: the decoder layers' projections in int8 (see `fused_linear`); embeddings,
        norms, attention, the cache and the heads stay in `dtype`."""
        config = hf_model.config
        if config.model_type not in SUPPORTED_TYPES:
            raise ValueError(f"guide architecture {config.model_type!r} is not supported ({', '.join(SUPPORTED_TYPES)})")
        hf_model = hf_model.to(dtype=dtype, device=device).eval()
        base = hf_model.model
        self.embed = base.embed_tokens.weight
        self.layers = [_Layer(layer, quantize) for layer in base.layers]
        self.norm = base.norm.weight
        self.eps = config.rms_norm_eps
        lm_head = getattr(hf_model, "lm_head", None)  # GenARM guides; ARGS reward models have `score`
        self.lm_head = fused_linear([lm_head]) if lm_head is not None else None
        self.score_head = getattr(hf_model, "score", None)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(config, "rope_theta", 10000.0)
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim))
        self.max_slots, self.max_len = max_slots, max_len
        shape = (len(self.layers), max_slots, self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(max_slots, dtype=torch.long)
        self._free = list(range(max_slots - 1, -1, -1))
        self.device, self.dtype = device, dtype
        # ARGS: the keys/values of the candidates last scored for each slot, at every layer, so
        # that the one the engine then accepts is copied into the cache, not computed again.
        self._scored: dict[int, list[int]] = {}  # slot -> candidate ids at position lengths[slot]
        self.copied_tokens = 0
        if self.score_head is not None:
            shape = (len(self.layers), max_slots, MAX_K, self.kv_heads, self.head_dim)
            self.cand_k = torch.zeros(shape, dtype=dtype, device=device)
            self.cand_v = torch.zeros(shape, dtype=dtype, device=device)

    # ------------------------------------------------------------------ slots

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise SlotsFull(f"all {self.max_slots} guide slots are in use")
        slot = self._free.pop()
        self.lengths[slot] = 0
        self._scored.pop(slot, None)
        return slot

    def release(self, slot: int) -> None:
        if slot not in self._free:
            self.lengths[slot] = 0
            self._scored.pop(slot, None)
            self._free.append(slot)

    # ------------------------------------------------------------------ forward

    @torch.inference_mode()
    def append(self, new_tokens: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Write the new tokens of each slot into its cache; returns each slot's final hidden
        state (after the last norm), (H,), for the last appended token."""
        slots, last = self._prefill_all_but_last(new_tokens)
        hidden, _ = self._step(slots, last)
        return dict(zip(slots, rms_norm(hidden, self.norm, self.eps)))

    @torch.inference_mode()
    def append_and_score(self, new_tokens: dict[int, list[int]], candidates: torch.Tensor) -> torch.Tensor:
        """Write the new tokens of each slot into its cache and, in the same forward, score k
        candidate next tokens per slot: the reward of (prefix + new tokens + candidate), the
        candidates never written. candidates: (batch, k) token ids, rows in `new_tokens`'
        order -> (batch, k) rewards."""
        if self.score_head is None:
            raise ValueError("this guide has no reward head: use it in genarm mode")
        copied = self._copy_accepted(new_tokens)
        slots, last = self._prefill_all_but_last({s: t for s, t in new_tokens.items() if s not in copied})
        _, scored = self._step(slots, last, candidates.to(self.device), scored_slots=list(new_tokens))
        # Final norm and the one-output head, fused.
        return reward_head(scored, self.norm, self.score_head.weight, self.eps).view(candidates.shape)

    def _copy_accepted(self, new_tokens: dict[int, list[int]]) -> set[int]:
        """Append, without a forward, each slot's one new token that was among the candidates
        scored for it at the previous step: their keys/values, kept from that pass, are exactly
        what appending it would compute (same prefix, same position). -> the slots done."""
        picks = [(slot, self._scored[slot].index(tokens[0])) for slot, tokens in new_tokens.items()
                 if len(tokens) == 1 and tokens[0] in self._scored.get(slot, ())]
        if not picks:
            return set()
        slots = [slot for slot, _ in picks]
        for slot in slots:
            self._check_room(slot, 1)
            del self._scored[slot]
        slot_t = torch.tensor(slots, device=self.device)
        which = torch.tensor([j for _, j in picks], device=self.device)
        at = self.lengths[slots].to(self.device)
        # (layers, n, Hkv, D) from the side buffers into (n, layers, Hkv, D) cache positions.
        self.k_cache[:, slot_t, :, at] = self.cand_k[:, slot_t, which].transpose(0, 1)
        self.v_cache[:, slot_t, :, at] = self.cand_v[:, slot_t, which].transpose(0, 1)
        self.lengths[slots] += 1
        self.copied_tokens += len(slots)
        return set(slots)

    def _check_room(self, slot: int, count: int) -> None:
        if int(self.lengths[slot]) + count > self.max_len:
            raise SlotsFull(f"guide slot {slot} would exceed {self.max_len} tokens")

    def _prefill_all_but_last(self, new_tokens: dict[int, list[int]]) -> tuple[list[int], list[int]]:
        """Prefill each slot's new tokens but the last, which the batched step then appends for
        all slots together. -> (slots, last token of each)."""
        for slot, tokens in new_tokens.items():
            self._check_room(slot, len(tokens))
            if len(tokens) > 1:
                self._prefill(slot, tokens[:-1])
        return list(new_tokens), [tokens[-1] for tokens in new_tokens.values()]

    def _step(self, slots: list[int], tokens: list[int], candidates: torch.Tensor | None = None,
              scored_slots: list[int] | None = None):
        """One batched forward: a new token for each of `slots`, written to its cache, and
        optionally k candidates for each of `scored_slots` (default `slots`; rows of
        `candidates`) placed after that slot's last token, reading the cache, never written.
        -> (new tokens' hidden (len(slots), H), candidates' hidden (len(scored_slots) * k, H)
        or None), before the final norm. One pass over the weights for both."""
        n = len(slots)
        kc = 0 if candidates is None else candidates.shape[1]
        slot_t = torch.tensor(slots, dtype=torch.long, device=self.device)
        lengths = self.lengths[slots].to(self.device)
        ids, positions = [torch.tensor(tokens, dtype=torch.long, device=self.device)], [lengths]
        for slot in slots:
            self._scored.pop(slot, None)
        if kc:
            scored_slots = slots if scored_slots is None else scored_slots
            scored_t = torch.tensor(scored_slots, device=self.device)
            after = self.lengths[scored_slots].to(self.device) + torch.isin(scored_t, slot_t)  # the candidates' position
            keep = kc <= MAX_K  # keys/values kept for the next step's copy (ARGS guides have the buffers)
            ids.append(candidates.reshape(-1))
            positions.append(after.repeat_interleave(kc))
        x = self.embed[torch.cat(ids)]
        rope = rope_tables(torch.cat(positions), self.inv_freq, self.dtype)
        rows = lambda t, heads, k: t.view(-1, k, heads, self.head_dim)  # noqa: E731
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.ln1, self.eps)
            q, k, v = self._qkv(layer, h, rope)
            parts = []
            if n:
                kn, vn = rows(k[:n], self.kv_heads, 1), rows(v[:n], self.kv_heads, 1)
                parts.append(candidate_attention(rows(q[:n], self.heads, 1), kn, vn, self.k_cache[i], self.v_cache[i],
                                                 slot_t, lengths).reshape(n, -1))
                self.k_cache[i, slot_t, :, lengths] = kn[:, 0]
                self.v_cache[i, slot_t, :, lengths] = vn[:, 0]
            if kc:
                kn, vn = rows(k[n:], self.kv_heads, kc), rows(v[n:], self.kv_heads, kc)
                parts.append(candidate_attention(rows(q[n:], self.heads, kc), kn, vn, self.k_cache[i], self.v_cache[i],
                                                 scored_t, after).reshape(-1, self.heads * self.head_dim))
                if keep:
                    self.cand_k[i, scored_t, :kc] = kn
                    self.cand_v[i, scored_t, :kc] = vn
            attn = parts[0] if len(parts) == 1 else torch.cat(parts)
            x = x + layer.o(attn)
            x = x + self._mlp(layer, x)
        self.lengths[slots] += 1
        if kc and keep:
            self._scored.update(zip(scored_slots, candidates.tolist()))
        return x[:n], (x[n:] if kc else None)

    def _prefill(self, slot: int, tokens: list[int]) -> None:
        """Several new tokens for one slot (a prompt, or a catch-up), written to its cache; the
        caller (`_prefill_all_but_last`) has checked that they fit."""
        start = int(self.lengths[slot])
        count = len(tokens)
        self._scored.pop(slot, None)
        positions = torch.arange(start, start + count, device=self.device)
        x = self.embed[torch.tensor(tokens, device=self.device)]
        group = self.heads // self.kv_heads
        rope = rope_tables(positions, self.inv_freq, self.dtype)
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.ln1, self.eps)
            q, k, v = self._qkv(layer, h, rope)
            self.k_cache[i, slot, :, start : start + count] = k.transpose(0, 1)
            self.v_cache[i, slot, :, start : start + count] = v.transpose(0, 1)
            keys = self.k_cache[i, slot, :, : start + count].repeat_interleave(group, dim=0)
            values = self.v_cache[i, slot, :, : start + count].repeat_interleave(group, dim=0)
            mask = torch.arange(start + count, device=self.device)[None, :] <= positions[:, None]
            attn = F.scaled_dot_product_attention(
                q.transpose(0, 1).float(), keys.float(), values.float(), attn_mask=mask,
                scale=1.0 / math.sqrt(self.head_dim),
            ).to(x.dtype)
            x = x + layer.o(attn.transpose(0, 1).reshape(count, -1))
            x = x + self._mlp(layer, x)
        self.lengths[slot] += count

    def _qkv(self, layer: _Layer, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        t = h.shape[0]
        q, k, v = layer.qkv(h).split([self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], -1)
        q = q.view(t, self.heads, self.head_dim)
        k = k.view(t, self.kv_heads, self.head_dim)
        v = v.view(t, self.kv_heads, self.head_dim)
        return rotate(q, *rope), rotate(k, *rope), v

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x, layer.ln2, self.eps)
        gate, up = layer.gate_up(h).chunk(2, -1)
        return layer.down(F.silu(gate) * up)

    # ------------------------------------------------------------------ heads

    @torch.inference_mode()
    def next_token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(batch, H) -> (batch, vocab)."""
        if self.lm_head is None:
            raise ValueError("this guide has no language-model head: use it in args mode")
        return self.lm_head(hidden).float()
