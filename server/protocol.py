"""Pydantic models of the OpenAI protocol subset this server speaks.

Request models validate their own fields (so FastAPI answers 400 before any logic runs)
and convert themselves to an engine-neutral `SamplingConfig`.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_serializer, model_validator

from decoding.engine import SamplingConfig, StructuredOutput
from server.protocol_base import OpenAIModel, UserId, random_id
from server.protocol_tools import (
    ChatTool,
    DeltaToolCall,
    NamedToolChoice,
    ResponseFormat,
    StructuredOutputsOptions,
    ToolCall,
    arguments_value,
)

MAX_STOP_SEQUENCES = 16
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
ALIAS_SEPARATOR = "@"  # "<model>@<strategy>": a model alias that names a strategy


def split_model(model: str) -> tuple[str, str | None]:
    """"SmolLM2@best_of_n" -> ("SmolLM2", "best_of_n"); no alias -> (model, None)."""
    base, sep, strategy = model.rpartition(ALIAS_SEPARATOR)
    return (base, strategy) if sep else (model, None)


# ---------------------------------------------------------------- errors


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
    # The HTTP status and headers are transport, not body: the router reads them.
    status_code: int = Field(default=400, exclude=True)
    headers: dict[str, str] = Field(default_factory=dict, exclude=True)


# ---------------------------------------------------------------- shared pieces


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class SamplingFields(OpenAIModel):
    """Fields shared by chat and text completions."""

    model: str
    n: int = Field(default=1, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM extension, handy for load tests
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions.
    min_tokens: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsOptions | None = None

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value):
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens")
        for token, bias in value.items():
            if not token.lstrip("-").isdigit() or int(token) < 0:
                raise ValueError(f"logit_bias keys are token ids; {token!r} is not one")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values lie in [-100, 100]; token {token} has {bias}")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_token_ids(cls, value):
        if value and any(t < 0 for t in value):
            raise ValueError("stop_token_ids are non-negative token ids")
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    @field_validator("stream_options")
    @classmethod
    def _check_stream_options(cls, value, info):
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def structured(self) -> StructuredOutput | None:
        return self.structured_outputs.to_structured() if self.structured_outputs else None

    def token_ids_in(self) -> dict[str, list[int]]:
        """Token ids the request names, by parameter (checked against the vocabulary)."""
        return {"logit_bias": [int(t) for t in self.logit_bias or ()], "stop_token_ids": list(self.stop_token_ids or ())}

    def to_sampling_config(self, max_tokens: int, logprobs: int | None) -> SamplingConfig:
        return SamplingConfig(
            max_tokens=max_tokens,
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k in (None, -1) else self.top_k,
            stop=self.stop_list,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logprobs=logprobs,
            ignore_eos=self.ignore_eos,
            structured=self.structured(),
            logit_bias={int(t): b for t, b in self.logit_bias.items()} if self.logit_bias else None,
            min_tokens=self.min_tokens,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            include_stop_str_in_output=self.include_stop_str_in_output,
        )


# ---------------------------------------------------------------- chat completions


class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    # "developer" is OpenAI's newer name for "system".
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    @model_validator(mode="after")
    def _check_content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def as_template_message(self) -> dict[str, Any]:
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        else:
            text = self.content or ""
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": text}
        if self.tool_calls:
            # Hugging Face chat templates take arguments as an object.
            message["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": arguments_value(call.function.arguments)}}
                for call in self.tool_calls
            ]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ChatTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI's deprecated function calling: refused, with a pointer to `tools`.
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: ResponseFormat | None = None
    # Extension: every alignment option lives in this one object ({"strategy": ..., params}).
    alignment: dict[str, Any] | None = None
    # OpenAI's end-user id: stored with the answer's trace, so a user's data can be deleted.
    user: UserId = None

    # Field validators (not one model validator) so that each error names its field; a
    # field's validator sees the fields declared before it in `info.data`.
    @field_validator("functions", "function_call")
    @classmethod
    def _refuse_legacy_functions(cls, value):
        if value:
            raise ValueError("functions and function_call are deprecated by OpenAI; send tools and tool_choice")
        return value

    @field_validator("tools")
    @classmethod
    def _check_tools(cls, value):
        names = [tool.function.name for tool in value or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools name the same function twice")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _check_tool_choice(cls, value, info):
        tools = info.data.get("tools") or []
        if value not in (None, "none") and not tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(value, NamedToolChoice) and value.function.name not in [t.function.name for t in tools]:
            raise ValueError(f"tool_choice names function {value.function.name!r}, which is not in tools")
        if (isinstance(value, NamedToolChoice) or value == "required") and info.data.get("structured_outputs"):
            raise ValueError("structured_outputs and a named or required tool_choice each constrain the answer: "
                             "give one")
        return value

    @field_validator("response_format")
    @classmethod
    def _one_constraint(cls, value, info):
        if value is None or value.type == "text":
            return value
        if info.data.get("structured_outputs") is not None:
            raise ValueError("response_format and structured_outputs each constrain the answer: give one")
        if isinstance(info.data.get("tool_choice"), NamedToolChoice) or info.data.get("tool_choice") == "required":
            raise ValueError("response_format and a named or required tool_choice each constrain the answer: give one")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, value, info):
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens is OpenAI's newer name; it wins when both are given.
        return self.max_completion_tokens or self.max_tokens

    @property
    def tool_names(self) -> list[str]:
        return [tool.function.name for tool in self.tools or ()]

    @property
    def tool_kind(self) -> Literal["named", "required", "auto"] | None:
        """How the answer relates to the tools: a call of one named function, at least one
        call (`required`), the model's choice (`auto`, OpenAI's default with tools), or no tools."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template sees them; none when the answer may not call them."""
        if self.tool_kind is None:
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def structured(self) -> StructuredOutput | None:
        if self.response_format is not None and self.response_format.type != "text":
            return self.response_format.to_structured()
        if self.tool_kind == "named":
            tool = next(t for t in self.tools if t.function.name == self.tool_choice.function.name)
            return StructuredOutput(json=tool.function.schema_or_empty(), param="tool_choice")
        if self.tool_kind == "required":
            return StructuredOutput(json=self.required_calls_schema(), param="tool_choice")
        return super().structured()

    def required_calls_schema(self) -> dict[str, Any]:
        """A JSON list of calls, each `{"name": ..., "parameters": {...}}` of one of the tools
        (vLLM's layout for `tool_choice: required`); one call if parallel calls are off."""
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
            {"properties": {"name": {"type": "string", "enum": [tool.function.name]},
                            "parameters": tool.function.schema_or_empty()},
             "required": ["name", "parameters"]}
            for tool in self.tools]}}
        if self.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return schema

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, str]]:
        return [m.as_template_message() for m in self.messages]


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    alignment: dict[str, Any] | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _omit_absent_tool_calls(self, handler):
        # A delta without tool calls looks as it did before tools existed (and as OpenAI's).
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    alignment: dict[str, Any] | None = None


# ---------------------------------------------------------------- text completions


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    response_format: ResponseFormat | None = None  # vLLM's completions take it too
    alignment: dict[str, Any] | None = None

    @field_validator("response_format")
    @classmethod
    def _one_constraint(cls, value, info):
        if value is not None and value.type != "text" and info.data.get("structured_outputs") is not None:
            raise ValueError("response_format and structured_outputs each constrain the answer: give one")
        return value

    def structured(self) -> StructuredOutput | None:
        if self.response_format is not None and self.response_format.type != "text":
            return self.response_format.to_structured()
        return super().structured()

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be empty")
            if any(isinstance(p, list) and not p for p in value):
                raise ValueError("token-id prompts must not be empty")
            if any(isinstance(t, int) and t < 0 for t in value):
                raise ValueError("token ids must be non-negative")
        return value

    @field_validator("suffix")
    @classmethod
    def _refuse_suffix(cls, value):
        if value:
            raise ValueError("suffix is not supported by this server")
        return value

    @field_validator("best_of")
    @classmethod
    def _refuse_best_of(cls, value, info):
        if value is not None and value != info.data.get("n"):
            raise ValueError("best_of is not supported; use an alignment strategy instead")
        return value

    @field_validator("echo")
    @classmethod
    def _refuse_streamed_echo(cls, value, info):
        if value and info.data.get("stream"):
            raise ValueError("echo is not supported together with stream")
        return value

    @field_validator("alignment")
    @classmethod
    def _refuse_alignment(cls, value):
        if value:
            raise ValueError("alignment strategies need chat messages: use /v1/chat/completions")
        return value

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        value = self.prompt
        if isinstance(value, str):
            return [value]
        if value and all(isinstance(t, int) for t in value):
            return [list(value)]
        return list(value)


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------- models


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "aligner"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- scoring


class ScoreRequest(OpenAIModel):
    """Score answers to one conversation with the registered rewards (extension endpoint)."""

    messages: list[ChatMessage] = Field(min_length=1)
    responses: list[str] = Field(min_length=1)
    reward: str | dict[str, float] | None = None


class ScoreResponse(BaseModel):
    object: Literal["alignment.scores"] = "alignment.scores"
    reward: dict[str, float]
    scores: list[float]
    per_reward: dict[str, list[float]]
