"""A guide model with one KV-cache slot per guided request, run beside the vLLM engine.

`SlotDecoder` holds a Llama-family decoder's weights (taken from a Hugging Face model:
`*ForCausalLM` for GenARM guides, `*ForSequenceClassification` for ARGS reward models) and a
preallocated cache of `max_slots` x `max_len` tokens. Each engine step it appends the tokens
the engine accepted for every active slot in one batched forward (ragged lengths, per-row
positions), then either returns next-token logits (GenARM) or scores k candidate next tokens
per slot against the cached prefix without copying it (ARGS). Attention goes through the
dispatchers in `kernels/`, so Triton kernels can replace the torch references.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from aligner.model_refs import GUIDE_MODEL_TYPES as SUPPORTED_TYPES
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


class _Layer:
    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.q, self.k, self.v, self.o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate, self.up, self.down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.ln1, self.ln2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight


class SlotDecoder:
    def __init__(self, hf_model, max_slots: int, max_len: int, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        config = hf_model.config
        if config.model_type not in SUPPORTED_TYPES:
            raise ValueError(f"guide architecture {config.model_type!r} is not supported ({', '.join(SUPPORTED_TYPES)})")
        hf_model = hf_model.to(dtype=dtype, device=device).eval()
        base = hf_model.model
        self.embed = base.embed_tokens.weight
        self.layers = [_Layer(layer) for layer in base.layers]
        self.norm = base.norm.weight
        self.eps = config.rms_norm_eps
        self.lm_head = getattr(hf_model, "lm_head", None)
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

    # ------------------------------------------------------------------ slots

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise SlotsFull(f"all {self.max_slots} guide slots are in use")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        if slot not in self._free:
            self.lengths[slot] = 0
            self._free.append(slot)

    # ------------------------------------------------------------------ forward

    @torch.inference_mode()
    def append(self, new_tokens: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Write the new tokens of each slot into its cache; returns each slot's final hidden
        state (after the last norm), (H,), for the last appended token."""
        singles = {s: t for s, t in new_tokens.items() if len(t) == 1}
        out = {}
        if singles:
            slots = list(singles)
            hidden = self._decode(slots, [singles[s][0] for s in slots])
            out.update(zip(slots, hidden))
        for slot, tokens in new_tokens.items():
            if len(tokens) > 1:
                out[slot] = self._prefill(slot, tokens)
        return out

    def _check_room(self, slot: int, count: int) -> None:
        if int(self.lengths[slot]) + count > self.max_len:
            raise SlotsFull(f"guide slot {slot} would exceed {self.max_len} tokens")

    def _decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """One new token per slot, batched. -> (batch, H) final hidden states."""
        for s in slots:
            self._check_room(s, 1)
        slot_t = torch.tensor(slots, device=self.device)
        lengths = self.lengths[slots].to(self.device)
        x = self.embed[torch.tensor(tokens, device=self.device)]
        rope = rope_tables(lengths, self.inv_freq, self.dtype)
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.ln1, self.eps)
            q, k, v = self._qkv(layer, h, rope)
            attn = candidate_attention(q[:, None], k[:, None], v[:, None], self.k_cache[i], self.v_cache[i], slot_t, lengths)
            self.k_cache[i, slot_t, :, lengths] = k
            self.v_cache[i, slot_t, :, lengths] = v
            x = x + layer.o(attn[:, 0].reshape(len(slots), -1))
            x = x + self._mlp(layer, x)
        self.lengths[slots] += 1
        return rms_norm(x, self.norm, self.eps)

    def _prefill(self, slot: int, tokens: list[int]) -> torch.Tensor:
        """Several new tokens for one slot (a prompt, or a catch-up). -> (H,) last hidden."""
        self._check_room(slot, len(tokens))
        start = int(self.lengths[slot])
        count = len(tokens)
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
        return rms_norm(x[-1], self.norm, self.eps)

    def _qkv(self, layer: _Layer, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        t = h.shape[0]
        q = layer.q(h).view(t, self.heads, self.head_dim)
        k = layer.k(h).view(t, self.kv_heads, self.head_dim)
        v = layer.v(h).view(t, self.kv_heads, self.head_dim)
        return rotate(q, *rope), rotate(k, *rope), v

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x, layer.ln2, self.eps)
        return layer.down(F.silu(layer.gate(h)) * layer.up(h))

    # ------------------------------------------------------------------ heads

    @torch.inference_mode()
    def next_token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(batch, H) -> (batch, vocab); tied embeddings when the model has no lm_head."""
        weight = self.lm_head.weight if self.lm_head is not None else self.embed
        return (hidden @ weight.T).float()

    @torch.inference_mode()
    def score_candidates(self, slots: list[int], candidates: torch.Tensor) -> torch.Tensor:
        """Reward of (cached prefix + candidate) for k candidates per slot, without writing
        the cache. candidates: (batch, k) token ids -> (batch, k) rewards."""
        if self.score_head is None:
            raise ValueError("this guide has no reward head: use it in genarm mode")
        batch, kc = candidates.shape
        slot_t = torch.tensor(slots, device=self.device)
        lengths = self.lengths[slots].to(self.device)
        positions = lengths.repeat_interleave(kc)
        x = self.embed[candidates.reshape(-1).to(self.device)]
        rope = rope_tables(positions, self.inv_freq, self.dtype)
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.ln1, self.eps)
            q, k, v = self._qkv(layer, h, rope)
            shape = lambda t, heads: t.view(batch, kc, heads, self.head_dim)  # noqa: E731
            attn = candidate_attention(shape(q, self.heads), shape(k, self.kv_heads), shape(v, self.kv_heads),
                                       self.k_cache[i], self.v_cache[i], slot_t, lengths)
            x = x + layer.o(attn.reshape(batch * kc, -1))
            x = x + self._mlp(layer, x)
        # Final norm and the one-output head, fused.
        return reward_head(x, self.norm, self.score_head.weight, self.eps).view(batch, kc)
