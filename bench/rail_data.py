"""Training pairs for the output rail's model (`models/harmful-response`), from the policy's own
answers to the *training* sources of the request classifier:

    python -m bench.rail_data --data ../shared/data --sets safety-sets --output rail-data

Starts the server as `make serve` does and answers a seeded `--per-source` prompts of each
source plainly (temperature 0.7,
`--max-tokens` 96, seed = its index). A pair is (request, answer) or (request, the answer's
first `HEAD_WORDS` words), as the rail scores a stream's window:

- positive: a request from a harmful source whose answer does not refuse
  (`aligner.rewards.rules.is_refusal`): what the policy says when it complies;
- negative: every answer to a benign source (AlpacaEval's training split, the contrast
  training set), a harmful request's answer that refuses, and a harmful request paired with
  one of `REFUSALS` (so a refusal is never what the rail learns to flag).

Nothing here reads HarmBench, the past-tense set, the second contrast set, MT-Bench or
AlpacaEval's validation split: the rail is measured on those (`bench.safety`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

HEAD_WORDS = 24
PER_SOURCE = 250  # prompts answered per source at most (a seeded sample)
# Do-Not-Answer areas whose answers are content a rail should stop; the chatbot-interaction
# and misinformation areas are mostly about opinions, which a compliant answer is not harmful in.
DNA_AREAS = ("information_hazard", "malicious_uses", "discrimination_exclusion_toxicity_hateful_offensive")
REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I can't help with that request. If you're in danger, please contact local emergency services.",
    "I won't provide that. I'd be happy to help with something else.",
    "Sorry, I am unable to assist with this.",
    "I cannot help with this because it could hurt people. Please consider talking to a professional.",
    "I'm not able to share that information.",
    "I must decline this request.",
    "I'm sorry, but I can't continue with this.",
]


def sources(data: Path, sets: Path, seed: int, per_source: int = PER_SOURCE,
            with_pairs: bool = False) -> dict[str, tuple[str, list[str]]]:
    """name -> (class, a seeded sample of at most `per_source` prompts); `with_pairs` adds the
    minimal pairs (`bench/sets/pairs_*.jsonl`), the request classifier's own two sources of that form."""
    from aligner.training import prompt_sets as ps

    dna = [json.loads(line) for line in (data / "prompts/do_not_answer.jsonl").read_text().splitlines() if line]
    hh = ps.load_prompts(ps.PromptSource(str(data / "prefs/hh_harmless.jsonl.gz")), seed)
    alpaca = ps.load_prompts(ps.PromptSource(str(data / "prefs/alpaca_eval_gpt4turbo.jsonl.gz"), "train", "0.1"), seed)
    contrast = ps.load_prompts(ps.PromptSource(str(Path(__file__).parent / "sets/contrast_train.jsonl")), seed)
    named = {
        "do_not_answer": ("positive", [r["prompt"] for r in dna if r["category"] in DNA_AREAS]),
        "advbench": ("positive", ps.load_prompts(ps.PromptSource(str(sets / "advbench.jsonl")), seed)),
        "hh_harmless": ("positive", hh),
        "alpaca_train": ("negative", alpaca),
        "contrast_train": ("negative", contrast),
    }
    if with_pairs:
        for label, name in (("positive", "pairs_harmful"), ("negative", "pairs_benign")):
            named[name] = (label, ps.load_prompts(ps.PromptSource(str(Path(__file__).parent / f"sets/{name}.jsonl")), seed))
    for _, prompts in named.values():
        random.Random(seed).shuffle(prompts)
        del prompts[per_source:]
    return named


def wrapped_share(prompts: list[str], templates: list[str], fraction: float, seed: int) -> list[str]:
    """A seeded `fraction` of `prompts`, each inside the training wrapper `with_wrapped_copies`
    picks for it (the request classifier's wrappers: never `bench.safety`'s jailbreak forms).

    >>> wrapped_share(["a", "b", "c", "d"], ["W: {request}"], 0.5, 0)
    ['W: b']
    """
    from aligner.training.data import _key
    from aligner.training.prompt_sets import with_wrapped_copies

    chosen = [p for p in prompts if int(_key(seed, "rail-wrap", p), 16) % 1000 < fraction * 1000]
    return with_wrapped_copies(chosen, templates, seed)[len(chosen):]


def pairs_of(prompt: str, answer: str, harmful: bool) -> list[dict]:
    """The labelled pairs one answer gives.

    >>> [p["label"] for p in pairs_of("q", "Sure. " + "word " * 30, True)]
    ['positive', 'positive']
    >>> [p["label"] for p in pairs_of("q", "I'm sorry, but I can't help with that.", True)]
    ['negative']
    """
    from aligner.rewards.rules import is_refusal

    label = "positive" if harmful and not is_refusal(answer) else "negative"
    words = answer.split()
    texts = [answer] + ([" ".join(words[:HEAD_WORDS])] if len(words) > HEAD_WORDS else [])
    return [{"prompt": prompt, "response": t, "label": label} for t in texts if t.strip()]


def answer_all(base_url: str, prompts: list[str], max_tokens: int, concurrency: int) -> list[str]:
    import httpx
    from concurrent.futures import ThreadPoolExecutor

    def one(item):
        i, prompt = item
        body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "temperature": 0.7, "seed": i}
        reply = http.post(f"{base_url}/chat/completions", json=body)
        return reply.json()["choices"][0]["message"]["content"] or "" if reply.status_code == 200 else ""

    with httpx.Client(timeout=600) as http, ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, enumerate(prompts)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--sets", type=Path, default=Path("safety-sets"))
    parser.add_argument("--output", type=Path, default=Path("rail-data"))
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--per-source", type=int, default=PER_SOURCE, help="prompts answered per source at most")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-url", default=None, help="a running server's /v1 (default: start one)")
    parser.add_argument("--pairs", action="store_true", help="also answer the minimal pairs (bench/sets/pairs_*.jsonl)")
    parser.add_argument("--wrappers", type=Path, default=None,
                        help="a wrapper file (bench/sets/wrappers_train.jsonl): a share of every source's prompts is "
                             "also answered inside one of its wrappers, labelled as the bare prompt")
    parser.add_argument("--wrapped-fraction", type=float, default=0.33)
    parser.add_argument("--wrapped-only", action="store_true",
                        help="answer only the wrapped share (pairs to add to an earlier run's)")
    args = parser.parse_args(argv)
    if args.wrapped_only and args.wrappers is None:
        parser.error("--wrapped-only needs --wrappers")

    from bench.launch import start_server, stop_server

    named = sources(args.data, args.sets, args.seed, args.per_source, with_pairs=args.pairs)
    if args.wrappers is not None:
        from aligner.training.prompt_sets import load_wrappers

        templates = load_wrappers(str(args.wrappers))
        for name, (label, prompts) in list(named.items()):
            named[f"{name}+wrapped"] = (label, wrapped_share(prompts, templates, args.wrapped_fraction, args.seed))
            if args.wrapped_only:
                del named[name]
    server = None
    base_url = args.base_url
    if base_url is None:
        server = start_server(Path(tempfile.mkdtemp(prefix="rail-data-")))
        base_url = server.v1
    rows = {"positive": [], "negative": []}
    rng = random.Random(args.seed)
    try:
        for name, (label, prompts) in named.items():
            answers = answer_all(base_url, prompts, args.max_tokens, args.concurrency)
            for prompt, answer in zip(prompts, answers):
                for pair in pairs_of(prompt, answer, label == "positive"):
                    rows[pair["label"]].append({**pair, "source": name})
                if label == "positive" and rng.random() < 0.5:
                    rows["negative"].append({"prompt": prompt, "response": rng.choice(REFUSALS), "label": "negative",
                                             "source": f"{name}+refusal"})
            print(f"{name}: {len(prompts)} answered", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            stop_server(server)
    args.output.mkdir(parents=True, exist_ok=True)
    for label, items in rows.items():
        (args.output / f"{label}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
        print(f"{label}: {len(items)} pairs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
