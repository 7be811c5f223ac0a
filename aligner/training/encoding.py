"""Turn a (prompt, response) conversation into token ids, and pairs of them into batches.

One encoder serves training, evaluation and (through `encode`) anyone scoring at serve time,
so a reward model always sees text laid out the way it was trained on:

- a tokenizer with a chat template (SmolLM2): the template of prompt + response; the
  response is what follows the template of the prompt with the generation prompt;
- an encoder with [CLS]/[SEP] (MiniLM): ``[CLS] prompt [SEP] response [SEP]`` with the turns
  written as ``Role: text``;
- anything else: ``Role: text`` turns, ``Assistant:``, the response and EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aligner.rewards.hf import common_prefix
from aligner.training.data import response_text


def render_turns(messages: list[dict]) -> str:
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def fit(prompt: list[int], response: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Cut a prompt (from the left) and a response (from the right) to `budget` tokens.

    A long response may not push a long prompt below a quarter of the budget: the last user
    turn is what the response is judged against.

    >>> fit([1, 2, 3, 4], [5, 6, 7, 8, 9, 10], 8)
    ([3, 4], [5, 6, 7, 8, 9, 10])
    >>> fit([1, 2, 3, 4], [5, 6, 7, 8, 9, 10], 4)
    ([4], [5, 6, 7])
    """
    keep_prompt = min(len(prompt), budget // 4)
    response = response[: max(budget - keep_prompt, 0)]
    keep_prompt = min(len(prompt), budget - len(response))
    return prompt[len(prompt) - keep_prompt :], response


class PairEncoder:
    """Encodes one conversation as ``prompt_ids + response_ids`` of at most `max_length` tokens."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        if getattr(tokenizer, "chat_template", None):
            self.layout = "chat_template"
        elif tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None:
            self.layout = "encoder_pair"
        else:
            self.layout = "plain"

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, prompt: list[dict], response: list[dict]) -> tuple[list[int], list[int]]:
        """(prompt_ids, response_ids) for one conversation."""
        tok = self.tokenizer
        if self.layout == "chat_template":
            head = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
            full = tok.apply_chat_template(prompt + response, tokenize=True, return_dict=True)
            head, full = list(head["input_ids"]), list(full["input_ids"])
            # Templates may render the prompt alone slightly differently from prompt + response
            # (whitespace merges); the response starts where the two diverge.
            start = common_prefix(head, full)
            return fit(full[:start], full[start:], self.max_length)
        if self.layout == "encoder_pair":
            p, r = fit(self._ids(render_turns(prompt)), self._ids(response_text(response)), self.max_length - 3)
            return [tok.cls_token_id, *p, tok.sep_token_id], [*r, tok.sep_token_id]
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        p = self._ids(render_turns(prompt) + "\n\nAssistant:")
        r = self._ids(" " + response_text(response))
        p, r = fit(p, r, self.max_length - len(bos) - len(eos))
        return bos + p, r + eos

    def encode_pair(self, row: dict, margin_scale: float = 0.0) -> dict[str, Any]:
        """Token ids of a clean preference row, the columns `PairCollator` reads."""
        cp, cr = self.encode(row["prompt"], row["chosen"])
        rp, rr = self.encode(row["prompt"], row["rejected"])
        strength = row.get("strength")
        margin = margin_scale * strength if margin_scale > 0 and strength is not None else 0.0
        return {
            "chosen_ids": cp + cr,
            "chosen_start": len(cp),
            "rejected_ids": rp + rr,
            "rejected_start": len(rp),
            "margin": float(margin),
        }


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
