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

from aligner.rewards.base import Messages, Reward, checkpoint_version
from aligner.rewards.encoding import PairEncoder, read_reward_meta

logger = logging.getLogger(__name__)

STATS_FILE = "reward_stats.json"


class SequenceClassifierReward(Reward):
    kind = "model"

    def __init__(
        self,
        name: str,
        path: str | Path,
        *,
        max_length: int = 1024,
        max_batch_size: int = 16,
        # float32: what `eval-rm` measured the shipped models' accuracy in; a bf16 checkpoint
        # (the causal starter model's base) would otherwise load, and score, in bf16.
        dtype: str = "float32",
        # Where the forward runs: the policy's device (the server passes it), so that scoring
        # N candidates on a GPU is one batched forward there, not a CPU bottleneck.
        device: str = "cpu",
    ):
        from decoding.model_refs import load_sequence_classifier

        self.name = name
        self.path = Path(path)
        self.checkpoint = self.path
        self.version = checkpoint_version(self.path)  # before loading: a file replaced meanwhile is a new version
        self.model, self.tokenizer = load_sequence_classifier(self.path, dtype=dtype)
        self.device = device
        self.model.to(device)
        limit = min(max_length, getattr(self.tokenizer, "model_max_length", max_length) or max_length)
        # A model `aligner train` wrote is scored exactly as it was trained and evaluated.
        self.encoder = PairEncoder.for_model(self.tokenizer, self.path, limit)
        meta = read_reward_meta(self.path)
        if meta.get("kind") == "classifier":
            # A request classifier (`aligner train-classifier`): scored with response "" against
            # its recorded threshold; its own kind keeps it from becoming the default reward.
            self.kind = "classifier"
        self.threshold = meta.get("threshold")
        self.max_length = self.encoder.max_length
        self.max_batch_size = max_batch_size
        self.mean, self.std = 0.0, 1.0
        stats = self.path / STATS_FILE
        if stats.is_file():
            data = json.loads(stats.read_text())
            self.mean, self.std = float(data["mean"]), float(data["std"]) or 1.0
        self.description = f"sequence reward model at {self.path}"
        self._lock = threading.Lock()  # one forward at a time per model
        self.matmul_parameters = loaded_matmul_parameters(self.model)

    def describe(self) -> dict:
        # The checkpoint's folder name, not its path: the listing is public, the layout is not.
        described = {**super().describe(), "checkpoint": self.path.name, "device": self.device}
        return described if self.threshold is None else {**described, "threshold": self.threshold}

    @property
    def truncated(self) -> int:
        """Pairs cut to fit max_length so far."""
        return self.encoder.truncated

    def encode(self, messages: Messages, response: str) -> list[int]:
        """Token ids of the scored conversation, laid out and cut as in training
        (`aligner.rewards.encoding.PairEncoder`): the prompt loses its oldest tokens first and
        keeps at least a quarter of the budget; the response keeps its start."""
        prompt_ids, response_ids = self.encoder.encode(list(messages), response)
        return prompt_ids + response_ids

    def score(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        return self.score_counted(prompts, responses)[0]

    def score_counted(self, prompts: Sequence[Messages], responses: Sequence[str]) -> tuple[list[float], int]:
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
                logits = self._forward(ids.to(self.device), mask.to(self.device)).cpu()
                for row, i in enumerate(batch):
                    scores[i] = (float(logits[row]) - self.mean) / self.std
        return scores, sum(len(e) for e in encoded)

    def _forward(self, ids, mask):
        """(batch, seq) ids and mask -> (batch,) scores, as training and `eval-rm` compute them."""
        return classifier_scores(self.model, ids, mask)


def loaded_matmul_parameters(model) -> int:
    """Parameters of the loaded model a forward multiplies each token by: all but the 2-D
    embedding tables (lookups), as `decoding.model_refs.matmul_parameters` counts a checkpoint."""
    from decoding.model_refs import is_lookup

    return sum(p.numel() for name, p in model.named_parameters() if not is_lookup(name, p.dim()))


def classifier_scores(model, ids, mask):
    """A one-output sequence classifier's scores of right-padded rows, (batch,) float: the
    model's own pooling (the last non-padding token for causal models), which is what TRL's
    reward trainer optimised, so serving and `eval-rm` read the score the same way."""
    return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
