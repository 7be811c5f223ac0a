"""GenARM combine: adjusted = (1 + α) · (base + α · log_softmax(guide)), per row.

The (1 + α) factor makes vLLM's later division by the request temperature T sample at
T / (1 + α), as GenARM prescribes; α = 0 leaves a row exactly as it was.
"""

from __future__ import annotations

import torch


def guide_combine_torch(base: torch.Tensor, guide: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """base, guide: (batch, vocab); alpha: (batch,) -> (batch, vocab) in base's dtype."""
    a = alpha.to(torch.float32).unsqueeze(-1)
    guide_logprobs = torch.log_softmax(guide.to(torch.float32), dim=-1)
    out = (1.0 + a) * (base.to(torch.float32) + a * guide_logprobs)
    # Rows with α = 0 stay bit-identical (0 · -inf would otherwise give NaN).
    out = torch.where(a == 0, base.to(torch.float32), out)
    return out.to(base.dtype)


def guide_combine(base: torch.Tensor, guide: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Dispatcher: the torch reference everywhere for now (a Triton kernel is planned)."""
    return guide_combine_torch(base, guide, alpha)
