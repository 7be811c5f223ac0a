"""GenARM combine: adjusted = (1 + α) · (base + α · log_softmax(guide)), per row.

The (1 + α) factor makes vLLM's later division by the request temperature T sample at
T / (1 + α), as GenARM prescribes; α = 0 leaves a row exactly as it was.
"""

from __future__ import annotations

import torch

from kernels._dispatch import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None


if triton is not None:

    @triton.jit
    def _guide_combine_kernel(base_ptr, guide_ptr, alpha_ptr, out_ptr, vocab, stride_b, stride_g, stride_o,
                              BLOCK: tl.constexpr):
        row = tl.program_id(0)
        alpha = tl.load(alpha_ptr + row).to(tl.float32)
        base_row = base_ptr + row * stride_b
        out_row = out_ptr + row * stride_o
        if alpha == 0.0:
            for start in range(0, vocab, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < vocab
                tl.store(out_row + offs, tl.load(base_row + offs, mask=mask), mask=mask)
        else:
            guide_row = guide_ptr + row * stride_g
            # Online logsumexp: one read of the guide row for the normaliser.
            m = tl.full([BLOCK], float("-inf"), tl.float32)
            s = tl.zeros([BLOCK], tl.float32)
            for start in range(0, vocab, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                g = tl.load(guide_row + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
                new_m = tl.maximum(m, g)
                # Lanes that have only seen -inf keep s = 0 (exp(-inf - -inf) would be NaN).
                s = s * tl.where(m == new_m, 1.0, tl.exp(m - new_m)) + tl.where(g == float("-inf"), 0.0, tl.exp(g - new_m))
                m = new_m
            top = tl.max(m, axis=0)
            lse = top + tl.log(tl.sum(s * tl.exp(m - top), axis=0))
            for start in range(0, vocab, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < vocab
                b = tl.load(base_row + offs, mask=mask).to(tl.float32)
                g = tl.load(guide_row + offs, mask=mask).to(tl.float32)
                out = (1.0 + alpha) * (b + alpha * (g - lse))
                tl.store(out_row + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def guide_combine_triton(base: torch.Tensor, guide: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """base, guide: (batch, vocab); alpha: (batch,) -> new (batch, vocab) tensor."""
    out = torch.empty_like(base)
    batch, vocab = base.shape
    if batch:
        _guide_combine_kernel[(batch,)](base, guide, alpha.to(torch.float32).contiguous(), out, vocab,
                                        base.stride(0), guide.stride(0), out.stride(0), BLOCK=1024)
    return out


def guide_combine_torch(base: torch.Tensor, guide: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """base, guide: (batch, vocab); alpha: (batch,) -> (batch, vocab) in base's dtype."""
    a = alpha.to(torch.float32).unsqueeze(-1)
    guide_logprobs = torch.log_softmax(guide.to(torch.float32), dim=-1)
    out = (1.0 + a) * (base.to(torch.float32) + a * guide_logprobs)
    # Rows with α = 0 stay bit-identical (0 · -inf would otherwise give NaN).
    out = torch.where(a == 0, base.to(torch.float32), out)
    return out.to(base.dtype)


def guide_combine(base: torch.Tensor, guide: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    if triton is not None and use_triton(base):
        return guide_combine_triton(base, guide, alpha)
    return guide_combine_torch(base, guide, alpha)
