"""In-memory engines for fast unit tests of the HTTP layer and of strategies (no model).

`FakeEngine()` keeps the HTTP tests' script: sample i emits "w<i>_0 ", "w<i>_1 ", ... and never
ends early. `FakeEngine(lm=PrefixLM())` behaves like a small language model instead: each token
is a function of every token before it, the sample index and the seed, and answers end on
their own. Both engines honour the parts of `SamplingConfig` strategies use, keep a prefix
cache, and record every request, its outputs and its aborts.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import struct
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from decoding.engine import EngineStatus, GenerationChunk, SamplingConfig, SequenceDelta, TokenLogprob, TopLogprob
from decoding.guide_spec import guide_report_key

EOS_ID = 2  # end of answer: counted as a token, decoded as nothing (as vLLM skips special tokens)
GENERATION_PROMPT = "assistant:"  # the last token of a chat prompt; the answer starts after it


class WordTokenizer:
    """One token per whitespace-separated word, decoded as the word and a space, which is the
    text the engines stream for it: `decode(ids)` equals the concatenated delta texts."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self._words: dict[int, str] = {}

    def _id(self, word: str) -> int:
        if word not in self.vocab:
            self.vocab[word] = len(self.vocab) + 10
            self._words[self.vocab[word]] = word
        return self.vocab[word]

    def encode(self, text: str) -> list[int]:
        return [self._id(w) for w in text.split()]

    def encode_chat(self, messages: Sequence[dict[str, str]], tools=None) -> list[int]:
        tool_names = " ".join(t["function"]["name"] for t in tools or ())
        text = " ".join(f"{m['role']}: {m['content']}" for m in messages) + f" {tool_names} {GENERATION_PROMPT}"
        return self.encode(text)

    def token_text(self, token_id: int) -> str:
        return "" if token_id == EOS_ID else self._words.get(token_id, "?") + " "

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(self.token_text(t) for t in token_ids)

    @property
    def generation_prompt_id(self) -> int:
        return self._id(GENERATION_PROMPT)

    @property
    def vocab_size(self) -> int:
        return 1000


@dataclass(frozen=True)
class Draw:
    """Where a sample stands when its next token is drawn."""

    prefix: Sequence[int]  # every token so far: prompt, then this sample's output
    index: int  # sample index in the request
    step: int  # tokens this sample has produced in this request
    answer_tokens: int  # tokens since the last generation prompt (the answer so far)
    salt: bytes  # sample index and seed (unseeded: the request's own randomness); empty if greedy


class StepWords:
    """The HTTP tests' script: "w<index>_<step>", whatever the prompt; never ends early."""

    def next_token(self, draw: Draw) -> str | None:
        return f"w{draw.index}_{draw.step}"

    def top_logprobs(self, draw: Draw, token: str, k: int) -> tuple[float, tuple[TopLogprob, ...]]:
        return -0.5, tuple(TopLogprob(f"alt{j}", -1.0 - j) for j in range(k))


class PrefixLM:
    """A deterministic stand-in for a language model.

    The next token is a hash of (the full token prefix, the sample index, the seed): a request
    that continues from prompt + accepted tokens, with the same index and seed, continues the
    same answer; a seeded request is reproducible; greedy requests (temperature 0) ignore the
    index and seed. After `min_answer` answer tokens, a token ends the answer with probability
    1/`end_every`, so short budgets finish with "length" and long ones mostly with "stop".
    About one position in three is "uncertain": a flat top-k, high next-token entropy.
    """

    WORDS = (
        "the", "sky", "is", "blue", "and", "water", "flows", "down", "a", "river", "to", "sea",
        "sure", "here", "answer", "I'm", "sorry", "I", "can't", "help", "with", "that", "yes", "no",
    )

    def __init__(self, min_answer: int = 3, end_every: int = 8, words: Sequence[str] = WORDS):
        self.min_answer = min_answer
        self.end_every = end_every
        self.words = tuple(words)

    @staticmethod
    def _hash(draw: Draw, what: bytes) -> int:
        h = hashlib.blake2b(digest_size=8)
        h.update(struct.pack(f"<{len(draw.prefix)}q", *draw.prefix))
        h.update(what + draw.salt)
        return int.from_bytes(h.digest(), "little")

    def next_token(self, draw: Draw) -> str | None:
        h = self._hash(draw, b"token")
        if draw.answer_tokens >= self.min_answer and h % self.end_every == 0:
            return None
        return self.words[(h // self.end_every) % len(self.words)]

    def top_logprobs(self, draw: Draw, token: str, k: int) -> tuple[float, tuple[TopLogprob, ...]]:
        if k == 0:
            return -0.1, ()
        others = [w for w in self.words if w != token][: k - 1]
        if self._hash(draw, b"entropy") % 3 == 0:
            flat = -math.log(k + 1)  # k alternatives and the tail share the mass evenly
            return flat, tuple(TopLogprob(w + " ", flat) for w in [token, *others])
        return -0.05, (TopLogprob(token + " ", -0.05), *(TopLogprob(w + " ", -8.0) for w in others))


@dataclass
class EngineRequest:
    """One `generate` call as the engine saw it."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingConfig
    cached_tokens: int
    outputs: list[list[int]] = field(default_factory=list)  # token ids per sample
    finish_reasons: list[str | None] = field(default_factory=list)
    aborted: bool = False
    started_ns: int = field(default_factory=time.perf_counter_ns)  # orders requests across engines

    @property
    def completion_tokens(self) -> int:
        return sum(map(len, self.outputs))


class FakeEngine:
    """An `Engine` over a token script (`lm`; default: `StepWords`); one token per sample per chunk.

    Records `calls` (request id, prompt ids, sampling), `requests` (`EngineRequest`s, with
    outputs), `aborted` request ids (closed early or `abort()`ed) and the ids `running` now.
    """

    model_name = "fake-model"

    def __init__(self, max_model_len: int = 64, ready: bool = True, lm=None, matmul_parameters: int | None = None):
        self.matmul_parameters = matmul_parameters
        self._ready = ready
        self._max_model_len = max_model_len
        self.tokenizer = WordTokenizer()
        self.lm = lm or StepWords()
        self.calls: list[tuple[str, list[int], SamplingConfig]] = []
        self.requests: list[EngineRequest] = []
        self.aborted: list[str] = []
        self.running: set[str] = set()
        self.step_delay = 0.0
        self._abort_requested: set[str] = set()
        self._seen: list[list[int]] = []  # token sequences whose KV the prefix cache holds
        self.start_error: BaseException | None = None
        self.numerics: dict | None = None
        # What a guided request's last chunk reports unguided, as vLLM's guided processor would.
        self.guide_reports: list[dict] = []

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def dead(self) -> bool:
        return False

    def status(self) -> EngineStatus:
        return EngineStatus.of(ready=self.ready, dead=self.dead, start_error=self.start_error, numerics=self.numerics)

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
        if request_id not in self.aborted:
            self.aborted.append(request_id)
        if request_id in self.running:
            self._abort_requested.add(request_id)

    def _cached(self, prompt: list[int]) -> int:
        """Longest prefix shared with an earlier prompt or prompt + output; as in vLLM, the
        last prompt token is always computed."""
        best = 0
        for seen in self._seen:
            n = 0
            for a, b in zip(seen, prompt):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return min(best, max(len(prompt) - 1, 0))

    def _salt(self, sampling: SamplingConfig) -> bytes:
        """What a sample's tokens depend on besides the prefix and the sample index."""
        if sampling.temperature == 0:
            return b""
        if sampling.seed is not None:
            return b"seed" + struct.pack("<q", sampling.seed)
        return b"call" + struct.pack("<q", len(self.calls))  # unseeded: differs per request

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingConfig
    ) -> AsyncIterator[GenerationChunk]:
        prompt = list(prompt_token_ids)
        record = EngineRequest(request_id, prompt, sampling, self._cached(prompt),
                               [[] for _ in range(sampling.n)], [None] * sampling.n)
        self.calls.append((request_id, prompt, sampling))
        self.requests.append(record)
        self._seen.append(prompt)
        self.running.add(request_id)
        salt = self._salt(sampling)
        marker = self.tokenizer.generation_prompt_id
        answer_start = max((i + 1 for i, t in enumerate(prompt) if t == marker), default=len(prompt))
        texts = [""] * sampling.n
        finished = False
        try:
            for step in range(sampling.max_tokens):
                await asyncio.sleep(self.step_delay)
                if request_id in self._abort_requested:
                    deltas = [SequenceDelta(i, "", [], [] if sampling.logprobs is not None else None, "abort")
                              for i in range(sampling.n) if record.finish_reasons[i] is None]
                    record.aborted, finished = True, True
                    yield GenerationChunk(len(prompt), deltas, finished=True, cached_tokens=record.cached_tokens)
                    return
                deltas = []
                for i in range(sampling.n):
                    if record.finish_reasons[i] is not None:
                        continue
                    deltas.append(self._step(record, i, step, salt, answer_start, texts))
                finished = all(r is not None for r in record.finish_reasons)
                reports = list(self.guide_reports) if finished and guide_report_key(sampling.extra_args) else []
                yield GenerationChunk(len(prompt), deltas, finished=finished, cached_tokens=record.cached_tokens,
                                      guide_reports=reports)
                if finished:
                    return
        finally:
            self.running.discard(request_id)
            self._abort_requested.discard(request_id)
            self._seen += [prompt + out for out in record.outputs if out]
            if not finished:
                record.aborted = True
                if request_id not in self.aborted:
                    self.aborted.append(request_id)

    def _step(self, record: EngineRequest, i: int, step: int, salt: bytes, answer_start: int,
              texts: list[str]) -> SequenceDelta:
        sampling = record.sampling
        out = record.outputs[i]
        prefix = record.prompt_ids + out
        draw = Draw(prefix, i, step, len(prefix) - answer_start, salt and salt + struct.pack("<q", i))
        word = self.lm.next_token(draw)
        if sampling.structured is not None and sampling.structured.choice:
            # The one grammar this engine knows: a single word among the choices, then the end.
            choices = sampling.structured.choice
            word = choices[int.from_bytes(hashlib.sha256(repr((prefix, i)).encode() + salt).digest()[:4], "little")
                           % len(choices)] if not out else None
        if word is None and sampling.ignore_eos:
            word = "eos"
        token_id = EOS_ID if word is None else self.tokenizer._id(word)
        text = self.tokenizer.token_text(token_id)
        out.append(token_id)
        finish = "stop" if token_id == EOS_ID else None
        for stop in sampling.stop:
            # As vLLM does: the answer ends before the stop string, which is not returned.
            at = (texts[i] + text).find(stop)
            if stop and at >= 0:
                text, finish = (texts[i] + text)[:at][len(texts[i]):], "stop"
                break
        texts[i] += text
        if finish is None and len(out) >= sampling.max_tokens:
            finish = "length"
        record.finish_reasons[i] = finish
        logprobs = None
        if sampling.logprobs is not None:
            chosen, top = self.lm.top_logprobs(draw, word or "", sampling.logprobs)
            logprobs = [TokenLogprob(token_id, self.tokenizer.token_text(token_id), chosen, top)]
        return SequenceDelta(i, text, [token_id], logprobs, finish)


def internal_detail(text: str) -> list[str]:
    """What an error body must not hold (issue 38): this checkout's or the interpreter's paths,
    a traceback's lines. Empty when the body is clean."""
    import sys
    from pathlib import Path

    markers = [str(Path(__file__).resolve().parents[1]), sys.prefix, "site-packages", "Traceback (most recent",
               'File "/']
    return [m for m in markers if m in text]

