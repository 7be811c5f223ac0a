"""Autoregressive reward models (GenARM): the reward is beta * sum_t log pi_r(y_t | x, y_<t).

Training uses the reference-free DPO-style loss
``-log sigmoid(beta * (log pi_r(y_w | x) - log pi_r(y_l | x)) - margin)``. TRL's DPOTrainer
always subtracts a reference model's log-probs, so the loss lives in a small
`transformers.Trainer` subclass that keeps the Trainer's loop, progress bars, checkpoints and
resume.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from transformers import Trainer


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def response_logprobs(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """Summed log-probability of the response tokens of each row.

    Args:
        input_ids, attention_mask, completion_mask: `(rows, seq)`, right-padded; the mask is 1
            on the response tokens.
    Returns:
        `(rows,)` float32 sums of ``log p(token | everything before it)`` over response tokens.

    Runs the backbone, then the LM head on the response positions only: the 49k-word
    vocabulary projection of every prompt and pad position would cost as much memory as the
    rest of the model and is thrown away.
    """
    causal = _unwrap(model)
    hidden = causal.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
    targets_mask = completion_mask[:, 1:].bool()  # position t predicts token t + 1
    picked = hidden[:, :-1][targets_mask]  # (n_response_tokens, hidden)
    logits = causal.get_output_embeddings()(picked).float()
    token_logps = -F.cross_entropy(logits, input_ids[:, 1:][targets_mask], reduction="none")
    rows = torch.arange(input_ids.size(0), device=input_ids.device)[:, None].expand_as(targets_mask)
    out = torch.zeros(input_ids.size(0), dtype=torch.float32, device=input_ids.device)
    return out.index_add(0, rows[targets_mask], token_logps)


def genarm_loss(chosen_logps, rejected_logps, beta: float, margin=None) -> torch.Tensor:
    """Mean of ``-log sigmoid(beta * (chosen - rejected) - margin)``; inputs are `(pairs,)`."""
    logits = beta * (chosen_logps - rejected_logps)
    if margin is not None:
        logits = logits - margin
    return -F.logsigmoid(logits).mean()


class GenARMTrainer(Trainer):
    """`Trainer` whose loss is `genarm_loss` over `PairCollator` batches (chosen rows first)."""

    loss_is_scaled_for_ga = False

    def __init__(self, *args, beta: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta = beta
        self._metrics = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logps = response_logprobs(
            model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        )
        chosen, rejected = logps.chunk(2)
        loss = genarm_loss(chosen, rejected, self.beta, inputs.get("margin"))
        with torch.no_grad():
            gap = self.beta * (chosen - rejected)
            self._metrics["accuracy"].append((gap > 0).float().mean().item())
            self._metrics["margin"].append(gap.mean().item())
        return (loss, {"rewards": self.beta * logps}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update({k: sum(v) / len(v) for k, v in self._metrics.items() if v})
        self._metrics.clear()
        super().log(logs, start_time)
