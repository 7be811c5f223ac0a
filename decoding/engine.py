"""The small interface the server and strategies use to talk to an inference engine.

Nothing here imports vLLM: the types are plain dataclasses so that `server/` and `aligner/`
stay engine-agnostic and unit tests can drive them with a fake engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class StructuredOutput:
    """A grammar every sampled answer must follow (vLLM's structured outputs); exactly one
    of the forms is set. `param` names the request field it came from, for error messages."""

    json: dict[str, Any] | None = None  # a JSON schema
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # EBNF / Lark, as vLLM's backends read it
    param: str = "response_format"

    def __post_init__(self):
        forms = [self.json is not None, self.json_object, self.regex is not None, self.choice is not None,
                 self.grammar is not None]
        if sum(forms) != 1:
            raise ValueError("a structured output takes exactly one of json, json_object, regex, choice, grammar")


@dataclass(frozen=True)
class SamplingConfig:
    """Engine-neutral sampling settings; `decoding.vllm_convert` maps them to vLLM's."""

    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: no logprobs; k: sampled token plus top-k alternatives
    ignore_eos: bool = False
    # Per-request settings for logits processors registered at engine build.
    extra_args: dict[str, Any] | None = None
    structured: StructuredOutput | None = None
    logit_bias: dict[int, float] | None = None  # token id -> bias added to its logit
    min_tokens: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False



@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass
class SequenceDelta:
    """New output of one sample (`index` in 0..n-1) since the previous chunk."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    # Ended by the request's budget (`aligner.budget`), not by the engine: finish_reason is
    # "length", but the answer is a partial one the request did not ask to cut.
    cut: bool = False


@dataclass
class GenerationChunk:
    prompt_tokens: int
    sequences: list[SequenceDelta] = field(default_factory=list)
    finished: bool = False
    cached_tokens: int = 0  # prompt tokens served from the engine's prefix cache
    # What a guided logits processor reported of the rows it could not guide, on the last
    # chunk: [{"guided_steps", "unguided_steps", "reason", ...}] (`decoding.guided_processor`).
    guide_reports: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SequenceOutput:
    """Everything one sample produced, accumulated from its deltas."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    cut: bool = False  # see SequenceDelta.cut


@dataclass
class Generation:
    """An engine request's samples, and what its prompt cost."""

    sequences: list[SequenceOutput]
    prompt_tokens: int = 0
    cached_tokens: int = 0
    guide_reports: list[dict[str, Any]] = field(default_factory=list)  # see GenerationChunk

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)

    def add(self, chunk: GenerationChunk) -> None:
        """Fold one chunk of the stream in (the only place deltas are accumulated)."""
        self.prompt_tokens = chunk.prompt_tokens or self.prompt_tokens
        self.cached_tokens = max(self.cached_tokens, chunk.cached_tokens)
        self.guide_reports += chunk.guide_reports
        for delta in chunk.sequences:
            seq = self.sequences[delta.index]
            seq.text += delta.text
            seq.token_ids.extend(delta.token_ids)
            seq.logprobs.extend(delta.logprobs or ())
            if delta.finish_reason is not None:
                seq.finish_reason = delta.finish_reason
            seq.cut = seq.cut or delta.cut

    @classmethod
    def empty(cls, n: int, prompt_tokens: int = 0) -> Generation:
        return cls([SequenceOutput(i) for i in range(n)], prompt_tokens)


async def collect(stream: AsyncIterator[GenerationChunk], n: int, prompt_tokens: int = 0) -> Generation:
    """Drain an engine stream into one output per sample."""
    generation = Generation.empty(n, prompt_tokens)
    async for chunk in stream:
        generation.add(chunk)
    return generation


class ChatTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict] | None = None) -> list[int]:
        """Apply the model's chat template with a generation prompt (and the tools the answer
        may call, OpenAI's layout), return token ids."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    @property
    def vocab_size(self) -> int: ...


class EngineError(Exception):
    """The engine could not serve a request for a reason that is not the client's."""


class EngineDeadError(EngineError):
    """The engine process is gone; every request fails until it is restarted."""


class InvalidRequestError(ValueError):
    """The engine rejected the request's parameters (a client mistake)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


EngineState = Literal["ready", "starting", "restarting", "dead", "failed"]


class PublicStartError(RuntimeError):
    """A start failure whose message this project wrote for the operator (a failed numerics
    self-check: agreement figures, no paths nor library text), so `/ready` may quote it."""


@dataclass(frozen=True)
class EngineStatus:
    """Where an engine stands, for `/ready`. `reason`: "(ErrorType)" when it failed to start:
    its kind, not its text (paths, device names and sizes stay in the log, with the
    traceback); `numerics`: what was built and its self-check, so far."""

    state: EngineState
    reason: str | None = None
    numerics: dict[str, Any] | None = None

    @classmethod
    def of(cls, *, ready: bool, dead: bool, restarting: bool = False, start_error: BaseException | None = None,
           numerics: dict[str, Any] | None = None) -> EngineStatus:
        """The status an engine's flags mean, the most telling first.

        >>> EngineStatus.of(ready=False, dead=False, start_error=OSError("no weights in /srv/m")).problem()
        'failed to start (OSError; the server log has the detail)'
        >>> EngineStatus.of(ready=True, dead=False).problem() is None
        True
        """
        if ready:
            return cls("ready", numerics=numerics)
        if restarting:
            return cls("restarting", numerics=numerics)
        if dead:
            return cls("dead", numerics=numerics)
        if isinstance(start_error, PublicStartError):
            first = (str(start_error).splitlines() or [""])[0][:300]
            return cls("failed", f"({type(start_error).__name__}): {first}", numerics)
        if start_error is not None:
            return cls("failed", f"({type(start_error).__name__}; the server log has the detail)", numerics)
        return cls("starting", numerics=numerics)

    def problem(self) -> str | None:
        """Why the engine cannot serve, as the end of a sentence ("the engine ..."), or None."""
        return {"ready": None, "starting": "is still loading", "restarting": "is restarting after a fault",
                "dead": "is dead", "failed": f"failed to start {self.reason}"}[self.state]


class Engine(Protocol):
    """What the server needs from an engine. `decoding.vllm_engine.VLLMEngine` implements it."""

    model_name: str
    # Parameters a forward multiplies each token by (`decoding.model_refs.matmul_parameters`),
    # for answers' compute estimates; None where the checkpoint does not say.
    matmul_parameters: int | None

    @property
    def ready(self) -> bool: ...

    @property
    def dead(self) -> bool: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def tokenizer(self) -> ChatTokenizer: ...

    def status(self) -> EngineStatus:
        """Ready, starting, restarting, dead or failed (with why), and its numerics."""
        ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def restart(self) -> None:
        """Replace a dead engine with a fresh one."""
        ...

    def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingConfig
    ) -> AsyncIterator[GenerationChunk]:
        """Stream deltas; closing the iterator early aborts the request in the engine."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def num_unfinished_requests(self) -> int:
        """Requests the engine still tracks (waiting or running)."""
        ...
