"""The chat tokenizer the server tokenizes prompts with (`decoding.engine.ChatTokenizer`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from decoding.chat_format import fold_tools, template_knows_tools


class HFChatTokenizer:
    """`ChatTokenizer` over a Hugging Face tokenizer, loaded here from the model directory
    vLLM serves (its own copy: vLLM's tokenizer lives in its engine process)."""

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer
        self._knows_tools = template_knows_tools(hf_tokenizer.chat_template)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def encode_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict] | None = None) -> list[int]:
        if not self._knows_tools:
            messages, tools = fold_tools(messages, tools), None
        ids = self._tok.apply_chat_template(
            list(messages), tools=list(tools) if tools else None, add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)
