"""Does a guide in bf16, or with int8 projections, choose what a float32 guide chooses?

    python -m bench.guide_fidelity --max-tokens 64

ARGS greedy decoding (k candidates, weight w) of each prompt with the default policy and a
trained causal reward model (default: the shipped `models/helpful-harmless-causal`), the
rewards computed by guide runners side by side: float32 (the reference, which picks the
tokens), bf16 (`--guide-dtype bfloat16`, the server's default) and bf16 with int8
projections (`--guide-quantization int8`). At every step each variant scores the same
candidates after the same prefix. Prints, per variant, how often it would have picked the
reference's token, the rank correlation of its k rewards with the reference's, and its
largest reward difference relative to the rewards' spread over the k.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch

from bench.best_of_n import add_prompt_args, load_prompts
from bench.search_replay import spearman

REPO = Path(__file__).resolve().parent.parent


@torch.inference_mode()
def compare(policy, tokenizer, reference, variants: dict, prompt: str, k: int, weight: float, max_tokens: int) -> dict:
    """One prompt, ARGS-greedy under the `reference` guide -> per variant, a record per step."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_dict=True)["input_ids"]
    guides = {"reference": reference, **variants}
    slots = {name: guide.allocate() for name, guide in guides.items()}
    out = policy(torch.tensor([ids]), use_cache=True)
    cache, logits = out.past_key_values, out.logits[0, -1].float()
    new, steps = list(ids), {name: [] for name in variants}
    try:
        for _ in range(max_tokens):
            candidates = torch.topk(logits, k).indices
            rewards = {name: guide.append_and_score({slots[name]: new}, candidates[None])[0].float()
                       for name, guide in guides.items()}
            exact = rewards.pop("reference")
            pick = int(torch.argmax(logits[candidates] + weight * exact))
            for name, r in rewards.items():
                steps[name].append({
                    "same": pick == int(torch.argmax(logits[candidates] + weight * r)),
                    "rho": spearman(exact.tolist(), r.tolist()),
                    "diff": float((r - exact).abs().max() / (exact.std() + 1e-6)),
                })
            token = int(candidates[pick])
            if token == tokenizer.eos_token_id:
                break
            new = [token]
            out = policy(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[0, -1].float()
    finally:
        for name, guide in guides.items():
            guide.release(slots[name])
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward-model", type=Path, default=REPO / "models" / "helpful-harmless-causal")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    add_prompt_args(parser, count=4)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from decoding.model_prep import prepare_default_model
    from decoding.model_refs import load_sequence_classifier
    from decoding.guide_model import SlotDecoder

    policy_dir = prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.bfloat16).eval()
    runners = {}
    for name, dtype, quantize in (("reference", torch.float32, False), ("bf16", torch.bfloat16, False),
                                  ("bf16 + int8 projections", torch.bfloat16, True)):
        rm, _ = load_sequence_classifier(args.reward_model, dtype=dtype)
        runners[name] = SlotDecoder(rm, 1, 2048, dtype, quantize=quantize)
    reference = runners.pop("reference")
    steps = {name: [] for name in runners}
    for prompt in load_prompts(args):
        for name, records in compare(policy, tokenizer, reference, runners, prompt, args.k, args.weight,
                                     args.max_tokens).items():
            steps[name] += records
    print(f"ARGS k={args.k} w={args.weight}, reward model {args.reward_model}, {len(steps['bf16'])} steps over "
          f"{args.prompts} prompts, tokens picked by the float32 guide")
    print("guide | same token as float32 | Spearman of the k rewards (mean, min) | max |diff| / std (median, p90)")
    for name, records in steps.items():
        rhos = [s["rho"] for s in records if s["rho"] is not None]
        diffs = sorted(s["diff"] for s in records)
        print(f"{name} | {sum(s['same'] for s in records) / len(records):.1%} | {statistics.mean(rhos):.3f}, "
              f"{min(rhos):.3f} | {statistics.median(diffs):.3f}, {diffs[math.ceil(0.9 * len(diffs)) - 1]:.3f}")

if __name__ == "__main__":
    main()
