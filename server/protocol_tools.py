"""Protocol models of what constrains or structures an answer: response formats, vLLM's
`structured_outputs`, tools, tool calls and their streamed deltas."""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from decoding.engine import StructuredOutput
from server.protocol_base import OpenAIModel


class StructuredOutputsOptions(OpenAIModel):
    """vLLM's `structured_outputs` extension: exactly one constraint."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = None

    @model_validator(mode="after")
    def _one_form(self):
        forms = [name for name in ("json_", "json_object", "regex", "choice", "grammar")
                 if getattr(self, name) not in (None, False)]
        if len(forms) != 1:
            raise ValueError("structured_outputs takes exactly one of json, json_object, regex, choice, grammar")
        if isinstance(self.json_, str):
            try:
                self.json_ = json.loads(self.json_)
            except ValueError:
                raise ValueError("structured_outputs.json must be a JSON schema (an object or its JSON text)") from None
            if not isinstance(self.json_, dict):
                raise ValueError("structured_outputs.json must be a JSON schema object")
        return self

    def to_structured(self) -> StructuredOutput:
        return StructuredOutput(
            json=self.json_, json_object=bool(self.json_object), regex=self.regex,
            choice=tuple(self.choice) if self.choice is not None else None, grammar=self.grammar,
            param="structured_outputs",
        )


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCall(OpenAIModel):
    id: str = Field(default_factory=tool_call_id)
    type: Literal["function"] = "function"
    function: FunctionCall


def arguments_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class FunctionDefinition(OpenAIModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def schema_or_empty(self) -> dict[str, Any]:
        return self.parameters or {"type": "object", "properties": {}}


class ChatTool(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(OpenAIModel):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    # The grammar enforces the schema whether or not `strict` is set.
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check_schema(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self

    def to_structured(self) -> StructuredOutput | None:
        if self.type == "json_object":
            return StructuredOutput(json_object=True)
        if self.type == "json_schema":
            return StructuredOutput(json=self.json_schema.schema_)
        return None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall
