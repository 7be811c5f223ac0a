"""Hugging Face sequence-classification reward models (Skywork-Reward, OpenAssistant DeBERTa,
our own `bt` checkpoints): one scalar output, their own tokenizer and chat template.

Normalisation: if the checkpoint directory holds `reward_stats.json` with `{"mean": m,
"std": s}` (scores of the model on held-out answers), scores are reported as (r - m) / s,
so that several reward models can be weighted on one scale.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from aligner.rewards.base import Messages, Reward

logger = logging.getLogger(__name__)

STATS_FILE = "reward_stats.json"


def plain_format(messages: Messages, response: str) -> str:
    """Fallback for tokenizers without a chat template (e.g. plain encoders)."""
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(turns + [f"Assistant: {response}"])


class SequenceClassifierReward(Reward):
    kind = "model"

    def __init__(
        self,
        name: str,
        path: str | Path,
        *,
        max_length: int = 1024,
        max_batch_size: int = 16,
        dtype: str = "auto",
    ):
        from aligner.model_refs import load_sequence_classifier

        self.name = name
        self.path = Path(path)
        self.model, self.tokenizer = load_sequence_classifier(self.path, dtype=dtype)
        self.max_length = min(max_length, getattr(self.tokenizer, "model_max_length", max_length) or max_length)
        self.max_batch_size = max_batch_size
        self.mean, self.std = 0.0, 1.0
        stats = self.path / STATS_FILE
        if stats.is_file():
            data = json.loads(stats.read_text())
            self.mean, self.std = float(data["mean"]), float(data["std"]) or 1.0
        self.description = f"sequence reward model at {self.path}"
        self.truncated = 0  # pairs whose prompt was cut to fit max_length
        self._lock = threading.Lock()  # one forward at a time per model

    def describe(self) -> dict:
        return {**super().describe(), "path": str(self.path.resolve())}

    def encode(self, messages: Messages, response: str) -> list[int]:
        """Token ids of the scored conversation, cut from the prompt's left to fit.

        The response is never dropped: if it alone exceeds the limit, its start is kept.
        """
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            convo = list(messages) + [{"role": "assistant", "content": response}]
            full = _ids(tok.apply_chat_template(convo, tokenize=True))
            prefix = _ids(tok.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=True))
            split = common_prefix(prefix, full)
        else:
            prompt_text = plain_format(messages, "")
            full = _ids(tok(plain_format(messages, response), add_special_tokens=True))
            split = len(_ids(tok(prompt_text, add_special_tokens=True))) - 1  # keep the closing token
            split = max(0, min(split, len(full)))
        excess = len(full) - self.max_length
        if excess <= 0:
            return full
        self.truncated += 1
        head = 1 if split > 0 else 0  # keep a leading BOS/CLS token
        removable = max(0, split - head)
        cut = min(excess, removable)
        ids = full[:head] + full[head + cut :]
        return ids[: self.max_length]

    def score(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        import torch

        encoded = [self.encode(m, r) for m, r in zip(prompts, responses)]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        scores = [0.0] * len(encoded)
        pad = self.tokenizer.pad_token_id
        with self._lock, torch.inference_mode():
            # Length-sorted buckets: each batch pads only to its own longest member.
            for start in range(0, len(order), self.max_batch_size):
                batch = order[start : start + self.max_batch_size]
                width = max(len(encoded[i]) for i in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                    mask[row, : len(encoded[i])] = 1
                logits = self._forward(ids, mask)
                for row, i in enumerate(batch):
                    scores[i] = (float(logits[row]) - self.mean) / self.std
        return scores

    def _forward(self, ids, mask):
        """(batch, seq) ids and mask -> (batch,) scores at each row's last real token."""
        import torch

        config = self.model.config
        if getattr(config, "is_decoder", False) or _is_causal(self.model):
            # Causal classifiers pool the last non-pad token; a pad id that also appears
            # inside the text (e.g. <|im_end|>) would confuse that, so pool by the mask.
            out = self.model.base_model(input_ids=ids, attention_mask=mask)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            last = mask.sum(dim=1) - 1
            pooled = hidden[torch.arange(ids.shape[0]), last]
            head = getattr(self.model, "score", None) or self.model.classifier
            return head(pooled.to(head.weight.dtype)).squeeze(-1).float()
        return self.model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()


def _is_causal(model) -> bool:
    return hasattr(model, "score") and not hasattr(model, "classifier")


def _ids(value) -> list[int]:
    if hasattr(value, "keys"):
        value = value["input_ids"]
    return list(value)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the shared prefix of two token lists (where a prompt ends inside its chat)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
