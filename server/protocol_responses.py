"""Pydantic models of OpenAI's Responses API, text in and out (with function tools and
structured text formats), and the request's translation to a chat completion request: the
Responses endpoint runs on the chat serving path (`server.serving_responses`)."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from server.protocol import ChatCompletionRequest
from server.protocol_base import OpenAIModel, UserId, random_id

# Request fields that would change the answer but have no meaning here: refused by name.
REFUSED = {
    "previous_response_id": "this server stores no responses; send the whole conversation as input",
    "conversation": "this server stores no conversations; send the whole conversation as input",
    "background": "background responses are not supported",
    "prompt": "stored prompts are not supported",
    "top_logprobs": "logprobs are not returned by /v1/responses here; use /v1/chat/completions with logprobs",
    "include": "extra output (logprobs, encrypted reasoning, ...) is not returned here",
    "max_tool_calls": "a cap on tool calls is not supported; use parallel_tool_calls: false for one call",
    "reasoning": "the served model does not reason in a separate channel",
    "truncation": "the input is never truncated here: a prompt longer than the context is a 400",
}
# Values that mean "off" for the refused fields (clients send them as defaults).
_OFF = (None, False, "", [], {}, 0, "disabled")


class InputText(OpenAIModel):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(OpenAIModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class FunctionCallItem(OpenAIModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(OpenAIModel):
    type: Literal["function_call_output"]
    call_id: str
    output: str


InputItem = InputMessage | FunctionCallItem | FunctionCallOutputItem


class FunctionTool(OpenAIModel):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(OpenAIModel):
    type: Literal["function"]
    name: str


class TextFormat(OpenAIModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(OpenAIModel):
    format: TextFormat | None = None


class ResponsesRequest(OpenAIModel):
    model_config = ConfigDict(extra="allow")

    model: str
    input: str | list[InputItem] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None  # extension, as on chat completions
    stream: bool = False
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    alignment: dict[str, Any] | None = None
    user: UserId = None  # as on chat completions
    # Declared (not left to `extra`) because it is echoed into the response: OpenAI's limits.
    metadata: dict[Annotated[str, StringConstraints(max_length=64)],
                   Annotated[str, StringConstraints(max_length=512)]] | None = Field(default=None, max_length=16)

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, value):
        # Runs before the type check, so this looks only at what it can read; anything else
        # (a number, a string, a list of non-objects) is left to pydantic to report as a 400.
        if not isinstance(value, list):
            return value
        for tool in value:
            if isinstance(tool, dict) and tool.get("type") != "function":
                raise ValueError(f"only function tools are supported here, not {tool.get('type')!r} "
                                 "(built-in tools such as web search run on OpenAI's servers)")
        return value

    def refused(self) -> tuple[str, str] | None:
        """(field, why) for a field this server cannot honour, if the request sets one."""
        for name, why in REFUSED.items():
            if (self.model_extra or {}).get(name) not in _OFF:
                return name, why
        return None

    def to_chat(self) -> ChatCompletionRequest:
        """The same request as a chat completion (validated like one)."""
        body: dict[str, Any] = {
            "model": self.model, "messages": self._messages(), "max_completion_tokens": self.max_output_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "stream": self.stream,
            "alignment": self.alignment, "parallel_tool_calls": self.parallel_tool_calls, "user": self.user,
        }
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in self.tools]
        if isinstance(self.tool_choice, NamedFunctionChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        if self.text and self.text.format and self.text.format.type != "text":
            fmt = self.text.format
            body["response_format"] = {"type": fmt.type} if fmt.type == "json_object" else {
                "type": "json_schema",
                "json_schema": {"name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}}
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})

    def _messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return messages + [{"role": "user", "content": self.input}]
        for item in self.input:
            if isinstance(item, InputMessage):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                    messages[-1]["tool_calls"].append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        return messages


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str = Field(default_factory=lambda: random_id("msg"))
    status: Literal["completed", "incomplete", "in_progress"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str = Field(default_factory=lambda: random_id("fc"))
    call_id: str
    name: str
    arguments: str
    status: Literal["completed", "in_progress"] = "completed"


class ResponsesUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})


class ResponseObject(BaseModel):
    id: str = Field(default_factory=lambda: random_id("resp"))
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["completed", "incomplete", "in_progress"] = "completed"
    model: str
    output: list[OutputMessage | OutputFunctionCall] = Field(default_factory=list)
    incomplete_details: dict[str, str] | None = None
    error: dict[str, Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    metadata: dict[str, Any] = Field(default_factory=dict)
    usage: ResponsesUsage | None = None
    alignment: dict[str, Any] | None = None

    @classmethod
    def started(cls, request: ResponsesRequest) -> ResponseObject:
        """The response's envelope before any output: echoes what the request set."""
        return cls(
            status="in_progress", model=request.model, instructions=request.instructions,
            max_output_tokens=request.max_output_tokens, temperature=request.temperature, top_p=request.top_p,
            tools=[t.model_dump(exclude_none=True) for t in request.tools or ()],
            tool_choice=(request.tool_choice.model_dump() if isinstance(request.tool_choice, BaseModel)
                         else request.tool_choice or "auto"),
            parallel_tool_calls=request.parallel_tool_calls is not False,
            text=request.text.model_dump(by_alias=True, exclude_none=True) if request.text else {"format": {"type": "text"}},
            metadata=request.metadata or {},
        )
