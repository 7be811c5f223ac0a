"""Token-level guidance throughput, side by side in one run:

    python -m bench.guided --concurrency 1,8 --max-tokens 128

- plain decoding, `genarm` with a guide the size of the policy (the policy checkpoint itself
  as the guide), and `args` with k = 10 (the policy backbone with a one-output head), all
  through one server (guided and unguided requests share the engine);
- a straightforward per-request Hugging Face loop doing the same ARGS computation the way
  reference implementations do: policy step with its KV cache, then the reward model over
  the k candidates with the prefix cache copied k times.

Targets: genarm >= 0.4 x plain (equal sizes: the memory-bound limit is 0.5); args (k=10) >=
0.25 x plain; both >= 5x the per-request loop at concurrency 8.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.launch import start_server, stop_server

MODEL = "SmolLM2-135M-Instruct"
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def build_args_guide(target: Path, policy_dir: Path) -> Path:
    """The policy backbone with a fresh one-output head: an ARGS reward model of the policy's size."""
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1, dtype=torch.bfloat16)
    model.config.pad_token_id = model.config.eos_token_id
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(policy_dir).save_pretrained(target)
    return target


async def stream_one(http, url, alignment, max_tokens) -> int:
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 1.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if alignment:
        body["alignment"] = alignment
    tokens = 0
    async with http.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    return tokens


async def server_tokens_per_s(url, alignment, concurrency, max_tokens) -> float:
    async with httpx.AsyncClient(timeout=1800) as http:
        await stream_one(http, url, alignment, 4)
        start = time.perf_counter()
        counts = await asyncio.gather(*(stream_one(http, url, alignment, max_tokens) for _ in range(concurrency)))
        return sum(counts) / (time.perf_counter() - start)


@torch.inference_mode()
def hf_args_loop(policy, rm, prompt_ids: list[int], max_tokens: int, k: int, weight: float = 1.0) -> int:
    """One request, token by token, ARGS the straightforward way."""
    ids = torch.tensor([prompt_ids], device=policy.device)
    out = policy(ids, use_cache=True)
    policy_cache, logits = out.past_key_values, out.logits[0, -1]
    rm_out = rm.model(ids, use_cache=True)
    rm_cache = rm_out.past_key_values
    generated = 0
    for _ in range(max_tokens):
        candidates = torch.topk(logits, k).indices
        # The reward model scores prefix + each candidate: the prefix cache copied k times.
        expanded = _repeat_cache(rm_cache, k)
        hidden = rm.model(candidates[:, None], past_key_values=expanded, use_cache=False).last_hidden_state[:, -1]
        rewards = rm.score(hidden)[:, 0].float()
        scores = logits[candidates].float() + weight * rewards
        token = candidates[int(torch.argmax(scores))].view(1, 1)
        out = policy(token, past_key_values=policy_cache, use_cache=True)
        policy_cache, logits = out.past_key_values, out.logits[0, -1]
        rm_cache = rm.model(token, past_key_values=rm_cache, use_cache=True).past_key_values
        generated += 1
    return generated


def _repeat_cache(cache, k):
    from transformers import DynamicCache

    copy = DynamicCache()
    for layer, (key, value) in enumerate(zip(cache.key_cache, cache.value_cache) if hasattr(cache, "key_cache")
                                         else ((lyr.keys, lyr.values) for lyr in cache.layers)):
        copy.update(key.repeat(k, 1, 1, 1), value.repeat(k, 1, 1, 1), layer)
    return copy


def hf_tokens_per_s(policy_dir: Path, args_dir: Path, concurrency: int, max_tokens: int, k: int) -> float:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    # The reference loop runs where the server's engine runs: the GPU when there is one.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.bfloat16).to(device).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(args_dir, dtype=torch.bfloat16).to(device).eval()
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    hf_args_loop(policy, rm, ids, 2, k)  # warm-up
    start = time.perf_counter()
    total = sum(hf_args_loop(policy, rm, ids, max_tokens, k) for _ in range(concurrency))  # one request at a time
    return total / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--guide-dtype", default="bfloat16")
    parser.add_argument("--guide-quantization", default=None, choices=["int8"])
    parser.add_argument("--hf-max-tokens", type=int, default=None, help="shorter runs for the slow loop")
    parser.add_argument("--no-hf", action="store_true", help="skip the per-request Hugging Face loop")
    parser.add_argument("--arms", default="plain,genarm,args", help="which of plain, genarm, args to run")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the arms this many times, interleaved, and report each arm's median")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    every = {"plain": ("plain", None), "genarm": ("genarm", {"strategy": "guided", "guide": "arm", "alpha": 1.0}),
             "args": (f"args k={args.k}", {"strategy": "guided", "guide": "rm", "k": args.k})}
    unknown = sorted({name.strip() for name in args.arms.split(",")} - set(every))
    if unknown:
        parser.error(f"--arms: unknown {', '.join(unknown)} (choose from {', '.join(every)})")
    arms = dict(every[name.strip()] for name in args.arms.split(","))
    from decoding.model_prep import prepare_default_model

    policy_dir = prepare_default_model()
    work = Path(tempfile.mkdtemp(prefix="bench-guided-"))
    args_dir = build_args_guide(work / "args-guide", policy_dir)
    levels = [int(c) for c in args.concurrency.split(",")]
    runs: dict[str, dict[int, list[float]]] = {name: {c: [] for c in levels} for name in arms}
    # `--self-check off`: the ARGS guide is a random one-output head, whose candidate scores are
    # near-ties that the start-up self-check is not meant for (it failed it at 88% of 8 positions,
    # in bf16 and in float32, on 2026-12-07, and the server never became ready). This bench
    # times throughput; `bench.numerics` and the self-check's own tests cover numerics.
    server = start_server(work, "--self-check", "off", "--guide", f"arm={policy_dir}", "--guide", f"rm={args_dir}",
                          "--guide-dtype", args.guide_dtype, "--guide-max-slots", str(max(levels)),
                          *(["--guide-quantization", args.guide_quantization] if args.guide_quantization else []))
    try:
        for _ in range(args.repeats):
            for c in levels:
                for name, alignment in arms.items():
                    runs[name][c].append(asyncio.run(server_tokens_per_s(f"{server.v1}/chat/completions", alignment, c, args.max_tokens)))
    finally:
        stop_server(server)
    results = {name: {c: statistics.median(values) for c, values in row.items()} for name, row in runs.items()}
    hf = {c: float("nan") for c in levels} if args.no_hf else {
        c: hf_tokens_per_s(policy_dir, args_dir, c, args.hf_max_tokens or args.max_tokens, args.k) for c in levels}
    results["HF per-request ARGS loop"] = hf
    print(f"tokens/s, {args.max_tokens} new tokens per request, guide dtype {args.guide_dtype}"
          + (f", projections {args.guide_quantization}" if args.guide_quantization else "")
          + (f", median of {args.repeats} interleaved runs" if args.repeats > 1 else ""))
    print("arm | " + " | ".join(f"c={c}" for c in levels) + " | vs plain | vs HF loop (c=max)")
    top = max(levels)
    for name, row in results.items():
        ratio_plain = row[top] / results["plain"][top] if "plain" in results else float("nan")
        ratio_hf = row[top] / hf[top]
        print(f"{name} | " + " | ".join(f"{row[c]:.1f}" for c in levels) + f" | {ratio_plain:.2f} | {ratio_hf:.1f}x")
    if args.repeats > 1:
        for name, row in runs.items():
            print(f"{name} runs at c={top}: " + ", ".join(f"{v:.1f}" for v in row[top]))
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
