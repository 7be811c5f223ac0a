"""A small in-memory engine for fast unit tests of the HTTP layer (no model)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from decoding.engine import GenerationChunk, SamplingConfig, SequenceDelta, TokenLogprob, TopLogprob


class WordTokenizer:
    """One token per whitespace-separated word; the chat template joins role: content lines."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def _id(self, word: str) -> int:
        return self.vocab.setdefault(word, len(self.vocab) + 10)

    def encode(self, text: str) -> list[int]:
        return [self._id(w) for w in text.split()]

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        text = " ".join(f"{m['role']}: {m['content']}" for m in messages) + " assistant:"
        return self.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        words = {v: k for k, v in self.vocab.items()}
        return " ".join(words.get(t, "?") for t in token_ids)

    @property
    def vocab_size(self) -> int:
        return 1000


class FakeEngine:
    """Sample i emits tokens "w<i>_0", "w<i>_1", ... one per chunk; records every call."""

    model_name = "fake-model"

    def __init__(self, max_model_len: int = 64, ready: bool = True):
        self._ready = ready
        self._max_model_len = max_model_len
        self.tokenizer = WordTokenizer()
        self.calls: list[tuple[str, list[int], SamplingConfig]] = []
        self.aborted: list[str] = []
        self.running: set[str] = set()
        self.step_delay = 0.0

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def dead(self) -> bool:
        return False

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    async def start(self) -> None:
        self._ready = True

    async def shutdown(self) -> None:
        self._ready = False

    async def restart(self) -> None:
        self._ready = True

    def num_unfinished_requests(self) -> int:
        return len(self.running)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingConfig
    ) -> AsyncIterator[GenerationChunk]:
        self.calls.append((request_id, list(prompt_token_ids), sampling))
        self.running.add(request_id)
        finished = False
        try:
            for step in range(sampling.max_tokens):
                await asyncio.sleep(self.step_delay)
                last = step == sampling.max_tokens - 1
                deltas = []
                for i in range(sampling.n):
                    word = f"w{i}_{step}"
                    token_id = self.tokenizer.encode(word)[0]
                    logprobs = None
                    if sampling.logprobs is not None:
                        top = tuple(TopLogprob(f"alt{j}", -1.0 - j) for j in range(sampling.logprobs))
                        logprobs = [TokenLogprob(token_id, word + " ", -0.5, top)]
                    deltas.append(
                        SequenceDelta(i, word + " ", [token_id], logprobs, "length" if last else None)
                    )
                finished = last
                yield GenerationChunk(len(prompt_token_ids), deltas, finished=last)
        finally:
            self.running.discard(request_id)
            if not finished:
                self.aborted.append(request_id)
