"""Pairs of encoded conversations into training batches.

The conversation encoder itself (`PairEncoder`) lives in `aligner.rewards.encoding`: the one
the server's reward scorer uses too, so a reward model is served the inputs it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aligner.rewards.encoding import PairEncoder, fit, render_turns

__all__ = ["PairCollator", "PairEncoder", "fit", "pad_sequences", "render_turns"]


@dataclass
class PairCollator:
    """Pads pairs into one batch: the chosen sequences first, then the rejected ones.

    `completion_mask` marks response tokens (what an autoregressive reward model scores);
    `margin` is kept when the examples carry one.

    >>> collator = PairCollator(pad_token_id=0)
    >>> batch = collator([
    ...     {"chosen_ids": [5, 6, 7], "chosen_start": 1, "rejected_ids": [5, 8], "rejected_start": 1},
    ...     {"chosen_ids": [4, 9], "chosen_start": 1, "rejected_ids": [4, 3, 2, 1], "rejected_start": 2},
    ... ])
    >>> batch["input_ids"]
    tensor([[5, 6, 7, 0],
            [4, 9, 0, 0],
            [5, 8, 0, 0],
            [4, 3, 2, 1]])
    >>> batch["attention_mask"]
    tensor([[1, 1, 1, 0],
            [1, 1, 0, 0],
            [1, 1, 0, 0],
            [1, 1, 1, 1]])
    >>> batch["completion_mask"]
    tensor([[0, 1, 1, 0],
            [0, 1, 0, 0],
            [0, 1, 0, 0],
            [0, 0, 1, 1]])
    """

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        seqs = [(e["chosen_ids"], e["chosen_start"]) for e in examples]
        seqs += [(e["rejected_ids"], e["rejected_start"]) for e in examples]
        batch = pad_sequences(seqs, self.pad_token_id)
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([float(e["margin"]) for e in examples], dtype=torch.float)
        return batch


def pad_sequences(seqs: list[tuple[list[int], int]], pad_token_id: int) -> dict[str, Any]:
    """Right-padded `input_ids`, `attention_mask` and `completion_mask` of (ids, response_start) rows."""
    import torch

    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (ids, start) in enumerate(seqs):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        completion_mask[i, start : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
