"""How a (prompt, response) conversation becomes a reward model's input: one encoder for
training, evaluation and serving, so a reward model always sees text laid out the way it was
trained on (its `aligner_reward.json` records the layout and the length).

- a tokenizer with a chat template (SmolLM2): the template of prompt + response; the
  response is what follows the template of the prompt with the generation prompt;
- an encoder with [CLS]/[SEP] (MiniLM): ``[CLS] prompt [SEP] response [SEP]`` with the turns
  written as ``Role: text``;
- anything else: ``Role: text`` turns, ``Assistant:``, the response and EOS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REWARD_META_FILE = "aligner_reward.json"


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the shared prefix of two token lists (where a prompt ends inside its chat)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def render_turns(messages: list[dict]) -> str:
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def response_text(response: list[dict] | str) -> str:
    """The response's text: a string as is, assistant messages joined by newlines."""
    return response if isinstance(response, str) else "\n".join(m["content"] for m in response)


def fit(prompt: list[int], response: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Cut a prompt (from the left) and a response (from the right) to `budget` tokens.

    A long response may not push a long prompt below a quarter of the budget: the last user
    turn is what the response is judged against.

    >>> fit([1, 2, 3, 4], [5, 6, 7, 8, 9, 10], 8)
    ([3, 4], [5, 6, 7, 8, 9, 10])
    >>> fit([1, 2, 3, 4], [5, 6, 7, 8, 9, 10], 4)
    ([4], [5, 6, 7])
    """
    keep_prompt = min(len(prompt), budget // 4)
    response = response[: max(budget - keep_prompt, 0)]
    keep_prompt = min(len(prompt), budget - len(response))
    return prompt[len(prompt) - keep_prompt :], response


def read_reward_meta(model_dir: str | Path) -> dict[str, Any]:
    """What `aligner train` recorded about a reward model (kind, layout, max_length...); {} if none."""
    meta = Path(model_dir) / REWARD_META_FILE
    return json.loads(meta.read_text()) if meta.is_file() else {}


class PairEncoder:
    """Encodes one conversation as ``prompt_ids + response_ids`` of at most `max_length` tokens."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncated = 0  # conversations cut to fit max_length
        if getattr(tokenizer, "chat_template", None):
            self.layout = "chat_template"
        elif tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None:
            self.layout = "encoder_pair"
        else:
            self.layout = "plain"

    @classmethod
    def for_model(cls, tokenizer, model_dir: str | Path, default_length: int, *,
                  length: int | None = None) -> PairEncoder:
        """The encoder a model was trained with: `length` if given, else its recorded length,
        else `default_length`; its recorded layout, which must be the one its tokenizer gives."""
        meta = read_reward_meta(model_dir)
        encoder = cls(tokenizer, int(length or meta.get("max_length") or default_length))
        if meta.get("layout") and meta["layout"] != encoder.layout:
            raise ValueError(f"{model_dir}: trained with the {meta['layout']!r} layout, but its tokenizer gives "
                             f"{encoder.layout!r}")
        return encoder

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, prompt: list[dict], response: list[dict] | str) -> tuple[list[int], list[int]]:
        """(prompt_ids, response_ids) for one conversation; `response` is assistant messages or text."""
        tok = self.tokenizer
        if self.layout == "chat_template":
            turns = [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
            head = tok.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True, return_dict=True)
            full = tok.apply_chat_template(list(prompt) + turns, tokenize=True, return_dict=True)
            head, full = list(head["input_ids"]), list(full["input_ids"])
            # Templates may render the prompt alone slightly differently from prompt + response
            # (whitespace merges); the response starts where the two diverge.
            start = common_prefix(head, full)
            return self._fit(full[:start], full[start:], self.max_length)
        if self.layout == "encoder_pair":
            p, r = self._fit(self._ids(render_turns(prompt)), self._ids(response_text(response)), self.max_length - 3)
            return [tok.cls_token_id, *p, tok.sep_token_id], [*r, tok.sep_token_id]
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        p = self._ids(render_turns(prompt) + "\n\nAssistant:")
        r = self._ids(" " + response_text(response))
        p, r = self._fit(p, r, self.max_length - len(bos) - len(eos))
        return bos + p, r + eos

    def _fit(self, prompt: list[int], response: list[int], budget: int) -> tuple[list[int], list[int]]:
        if len(prompt) + len(response) > budget:
            self.truncated += 1
        return fit(prompt, response, budget)

    def encode_pair(self, row: dict, margin_scale: float = 0.0) -> dict[str, Any]:
        """Token ids of a clean preference row, the columns `PairCollator` reads."""
        cp, cr = self.encode(row["prompt"], row["chosen"])
        rp, rr = self.encode(row["prompt"], row["rejected"])
        strength = row.get("strength")
        margin = margin_scale * strength if margin_scale > 0 and strength is not None else 0.0
        return {
            "chosen_ids": cp + cr,
            "chosen_start": len(cp),
            "rejected_ids": rp + rr,
            "rejected_start": len(rp),
            "margin": float(margin),
        }
