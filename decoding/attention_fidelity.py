"""How far vLLM's CPU engine decodes from float32 transformers, with the attention kernel this
process gets (after the aligner plugin, or vLLM's own choice with ALIGNER_CPU_AMX_ATTENTION=1),
and how fast: the measurement behind the AMX attention choice (`bench/amx_attention.py`).

    python -m decoding.attention_fidelity OUTPUT.json [--no-fidelity] [--throughput] [--repeatability]

Fidelity: greedy decoding of short and long chat prompts with vLLM's top-5 logprobs at every
generated position, teacher-forced through the checkpoint's float32 Hugging Face forward over
the same tokens. Reported: mean and 99th percentile of |engine logprob - float32 logprob| over
those top-5 tokens; positions where the engine's greedy token is not float32's top-1 ("flips"),
and those of them where float32's top-1 led its runner-up by at least 1 nat ("confident flips":
a healthy bf16 engine has none; a broken kernel has many). Also the answer to "What is the
capital of France?", whose first token is a near-tie in float32.

Throughput: 8 prompts x 128 tokens in one `generate` (c = 8) and one prompt (c = 1),
`ignore_eos`, after a warm-up; and prefill, 16 distinct ~360-token prompts, one token each, in
one `generate` (prompt tokens/s). The offline engine, the serving engine's settings.

Repeatability: each of 8 questions answered greedily (64 tokens) three times in a row, prefix
caching on as the server runs: the first run prefills the whole prompt, the later ones only
the part past the cached blocks. Reported: how many questions got the same answer all three
times.

The result goes to OUTPUT.json because vLLM logs to standard output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from decoding.hf_tokenizer import HFChatTokenizer

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about autumn.", "Explain photosynthesis to a child.",
    "How do I reverse a list in Python?", "Give me three tips for better sleep.", "What causes rain?",
    "Translate 'good morning' into Spanish.", "Who wrote Pride and Prejudice?", "What is 17 times 23?",
    "Describe the water cycle.", "Why is the sky blue?", "Name three planets.", "How do vaccines work?",
    "What is a prime number?", "Suggest a name for a pet cat.", "What is the boiling point of water?",
]
SHORT_TOKENS = 32
LONG_TOKENS = 48
CONFIDENT_MARGIN = 1.0  # nats, as the start-up self-check counts positions


def long_question(i: int) -> str:
    """About 360 tokens in SmolLM2's template: twelve 32-token KV blocks before decoding starts."""
    rotated = QUESTIONS[i + 1:] + QUESTIONS[:i + 1]
    return " ".join(rotated) * 3 + " Answer only the last question."


def chat_ids(tokenizer, question: str) -> list[int]:
    return HFChatTokenizer(tokenizer).encode_chat([{"role": "user", "content": question}])


def fidelity(llm, model_dir: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out: dict = {}
    for name, questions, tokens in (("short", QUESTIONS, SHORT_TOKENS),
                                    ("long", [long_question(i) for i in range(len(QUESTIONS))], LONG_TOKENS)):
        prompts = [chat_ids(tokenizer, q) for q in questions]
        params = SamplingParams(max_tokens=tokens, temperature=0.0, logprobs=5, ignore_eos=True)
        results = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        diffs, positions, flips, confident, confident_flips = [], 0, 0, 0, 0
        for prompt, result in zip(prompts, results):
            completion = result.outputs[0]
            generated = list(completion.token_ids)
            with torch.inference_mode():
                logits = reference(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1:-1]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for j, (token, top) in enumerate(zip(generated, completion.logprobs)):
                best = torch.topk(logprobs[j], 2)
                margin = float(best.values[0] - best.values[1])
                flipped = int(best.indices[0]) != token
                positions += 1
                flips += flipped
                if margin >= CONFIDENT_MARGIN:
                    confident += 1
                    confident_flips += flipped
                diffs.extend(abs(lp.logprob - float(logprobs[j, t])) for t, lp in top.items())
        diffs.sort()
        out[name] = {"prompts": len(prompts), "prompt_tokens_mean": round(statistics.mean(map(len, prompts)), 1),
                     "positions": positions, "flips": flips, "confident": confident,
                     "confident_flips": confident_flips, "mean_abs_logprob_diff": round(statistics.mean(diffs), 4),
                     "p99_abs_logprob_diff": round(diffs[int(0.99 * (len(diffs) - 1))], 4),
                     "max_abs_logprob_diff": round(diffs[-1], 4)}
    france = chat_ids(tokenizer, QUESTIONS[0])
    answer = llm.generate([{"prompt_token_ids": france}], SamplingParams(max_tokens=12, temperature=0.0),
                          use_tqdm=False)[0].outputs[0].text
    with torch.inference_mode():
        first = torch.log_softmax(reference(torch.tensor([france])).logits[0, -1].float(), dim=-1)
    top = torch.topk(first, 2)
    out["france"] = {"answer": answer, "float32_first_tokens": [tokenizer.decode([int(t)]) for t in top.indices],
                     "float32_first_margin": round(float(top.values[0] - top.values[1]), 3)}
    return out


def throughput(llm) -> dict:
    from vllm import SamplingParams

    prompt = chat_ids(llm.get_tokenizer(), "Write a long story about a lighthouse keeper.")
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    out = {}
    for concurrency in (1, 8):
        started = time.perf_counter()
        results = llm.generate([{"prompt_token_ids": prompt}] * concurrency, params, use_tqdm=False)
        wall = time.perf_counter() - started
        out[f"c{concurrency}_tokens_per_s"] = round(sum(len(r.outputs[0].token_ids) for r in results) / wall, 1)
    return out


def prefill_rate(llm) -> float:
    from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    prompts = [chat_ids(tokenizer, f"Question set {i}. " + long_question(i)) for i in range(16)]
    started = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=1), use_tqdm=False)
    return round(sum(map(len, prompts)) / (time.perf_counter() - started), 1)


def repeatability(llm) -> dict:
    from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    params = SamplingParams(max_tokens=64, temperature=0.0)
    same, examples = 0, []
    for question in QUESTIONS[1:9]:
        prompt = {"prompt_token_ids": chat_ids(tokenizer, "Repeatability. " + question)}
        answers = [llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].text for _ in range(3)]
        same += len(set(answers)) == 1
        if len(set(answers)) > 1 and len(examples) < 2:
            examples.append(answers[:2])
    return {"questions": len(QUESTIONS[1:9]), "same_all_three": same, "examples": examples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--no-fidelity", action="store_true")
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--repeatability", action="store_true")
    args = parser.parse_args()

    import torch
    from vllm import LLM

    from decoding.model_prep import prepare_default_model

    model_dir = str(prepare_default_model())
    # The serving engine's CPU settings (decoding/vllm_config.py): bf16, eager, 32-token blocks,
    # chunked prefill off.
    llm = LLM(model=model_dir, dtype="bfloat16", enforce_eager=True, block_size=32, enable_chunked_prefill=False,
              max_model_len=1024, kv_cache_memory_bytes=512 << 20, seed=0)
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    result = {"attention": _get_attn_isa(torch.bfloat16, 32, 64),
              "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())}
    if not args.no_fidelity:
        result["fidelity"] = fidelity(llm, model_dir)
    if args.throughput:
        result["throughput"] = {**throughput(llm), "prefill_tokens_per_s": prefill_rate(llm)}
    if args.repeatability:
        result["repeatability"] = repeatability(llm)
    with open(args.output, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
