"""The learned router against each fixed arm, with a simulated user whose preference differs by
prompt type (issue 42, item 2):

    python -m bench.router_loop --output bench/raw/router_loop      # about 12 minutes on 2 CPU cores

One server, a temporary SQLite store and models directory, two arms of best-of-4 at 128 tokens:
`brief@1` is the shipped `concise` recipe (a terse in-context template, then the shortest
sample), `full@1` keeps the longest sample (`words`, a regex reward counting words). The
experiment `route` (`unit: router`, exploration floor 0.1) serves both.

The user (`TypeUser`) asked either a *quick* question ("In a few words, what is {topic}?") and
rates short answers best, or a *detailed* one ("Write a detailed explanation of {topic} ...")
and rates long answers best; each arm is therefore best on one type and worst on the other, so
no fixed arm can be best everywhere. It is a rule on word counts, transparent, and the only
judge; the router never sees it, only the ratings it posts.

Rounds (`--rounds`, default 3): 48 feedback prompts through the experiment (the first round
before any router exists: arms drawn 50/50), rated; `aligner train-router` on every rating so
far; reload. After each training, the held-out prompts
(topics no feedback prompt used, and per type one template no feedback prompt used) are asked
through the experiment; they are also asked of each fixed arm, with the same seeds. Nothing
about held-out prompts is rated or stored as feedback.

Reported: the user's mean rating (1-5) on held-out prompts per policy with a bootstrap 95%
interval over prompts, per prompt type, and the paired difference router - best fixed arm;
and the oracle: each prompt answered by the better fixed arm for its type (the ceiling).
Raw answers, ratings and the router cards go to `--output`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from bench.launch import start_server, stop_server
from bench.loop import ask_all, bootstrap_ci, words

MODEL = "SmolLM2-135M-Instruct"
QUICK = ["In a few words, what is {topic}?", "Give a one-line definition of {topic}.",
         "Quick question: what is {topic}?", "Briefly, what does {topic} mean?"]
DETAILED = ["Write a detailed explanation of {topic}, with examples.", "Explain {topic} in depth, step by step.",
            "Write a long, thorough guide to {topic}.", "Describe {topic} at length, covering its history and uses."]
TOPICS = ["photosynthesis", "inflation", "a black hole", "the immune system", "machine learning", "a volcano",
          "democracy", "the water cycle", "compound interest", "a rainbow", "gravity", "the internet",
          "a vaccine", "climate change", "the French Revolution", "an earthquake", "a neural network",
          "the stock market", "recycling", "a solar eclipse", "DNA", "a bicycle gear", "the moon's phases",
          "jazz music", "a credit score", "the Roman Empire", "a hurricane", "coffee roasting",
          "the printing press", "electric cars", "a marathon", "origami", "the Olympic Games", "a telescope",
          "public libraries", "chess openings", "a sourdough starter", "bird migration", "the piano",
          "a wind turbine"]
PROFILES = """\
templates:
  terse:
    system: >-
      You are a concise assistant. Answer in at most three sentences, or a short list when
      steps are needed. No preamble, no repetition.
    examples:
      - ["What is the boiling point of water?", "100 °C (212 °F) at sea level; lower at altitude."]
      - ["How do I undo my last git commit but keep the changes?", "Run `git reset --soft HEAD~1`: the commit is removed and its changes stay staged."]
profiles:
  brief:
    - version: 1
      description: The shipped `concise` recipe - a terse in-context template, then the shortest of four.
      alignment:
        pipeline:
          - {strategy: urial, template: terse}
          - {strategy: best_of_n, n: 4, reward: {length_penalty: 1.0}}
  full:
    - version: 1
      description: Best of four samples, the longest.
      alignment: {strategy: best_of_n, n: 4, reward: {words: 1.0}}
experiments:
  route:
    unit: router
    router: route-router
    explore: 0.1
    arms:
      - {profile: brief@1}
      - {profile: full@1}
"""
ARMS = ["brief@1", "full@1"]


@dataclass(frozen=True)
class Prompt:
    text: str
    kind: str  # quick | detailed
    template: int
    seed: int


@dataclass(frozen=True)
class TypeUser:
    """Quick questions: 5 stars at <= 20 words, 1 at >= 60; detailed ones: 1 at <= 20 words, 5
    at >= 80; linear between. Fewer than 2 words is no answer: 1.

    >>> u = TypeUser()
    >>> [u.rating("quick", " ".join(["w"] * n)) for n in (1, 10, 40, 60)]
    [1.0, 5.0, 3.0, 1.0]
    >>> [u.rating("detailed", " ".join(["w"] * n)) for n in (10, 20, 50, 90)]
    [1.0, 1.0, 3.0, 5.0]
    """

    def rating(self, kind: str, text: str) -> float:
        n = words(text)
        if n < 2:
            return 1.0
        if kind == "quick":
            return float(np.clip(5.0 - 4.0 * (n - 20) / 40, 1.0, 5.0))
        return float(np.clip(1.0 + 4.0 * (n - 20) / 60, 1.0, 5.0))


def prompts() -> tuple[list[list[Prompt]], list[Prompt]]:
    """(three feedback rounds of 48, 48 held out): feedback prompts use the first 28 topics and
    templates 0-2; held-out prompts the last 12 topics, every template (3 unseen)."""
    feedback, held_out = [], []
    seed = 0
    for t, topic in enumerate(TOPICS):
        for kind, templates in (("quick", QUICK), ("detailed", DETAILED)):
            for k, template in enumerate(templates):
                seed += 1
                prompt = Prompt(template.format(topic=topic), kind, k, seed)
                if t >= 28:
                    held_out.append(prompt)
                elif k < 3:
                    feedback.append(prompt)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(feedback))
    feedback = [feedback[i] for i in order]
    held = [held_out[i] for i in rng.permutation(len(held_out))][:48]
    return [feedback[k:k + 48] for k in (0, 48, 96)], held


def bodies(asked: list[Prompt], alignment: dict, max_tokens: int) -> list[dict]:
    return [{"model": MODEL, "messages": [{"role": "user", "content": p.text}], "max_tokens": max_tokens,
             "temperature": 0.8, "seed": p.seed, "alignment": alignment} for p in asked]


def rate(user: TypeUser, asked: list[Prompt], answers: list[dict], policy: str, stage: str) -> list[dict]:
    rows = []
    for p, a in zip(asked, answers, strict=True):
        text = a["choices"][0]["message"]["content"] or ""
        experiment = a["alignment"].get("experiment") or {}
        rows.append({"stage": stage, "policy": policy, "prompt": p.text, "kind": p.kind, "template": p.template,
                     "seed": p.seed, "id": a["id"], "arm": experiment.get("arm", policy),
                     "propensity": experiment.get("propensity"), "router": experiment.get("router"),
                     "words": words(text), "rating": user.rating(p.kind, text), "text": text})
    return rows


def post_ratings(base: str, rows: list[dict]) -> None:
    for row in rows:
        r = httpx.post(f"{base}/alignment/feedback", json={"id": row["id"], "rating": int(round(row["rating"]))},
                       timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"feedback refused: {r.status_code} {r.text[:300]}")


def wait_for_traces(db: Path, ids: list[str], timeout_s: float = 60) -> None:
    """Until the store (this bench's own SQLite file) holds every trace: feedback needs them."""
    deadline = time.monotonic() + timeout_s
    marks = ",".join("?" * len(ids))
    while True:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            if conn.execute(f"SELECT COUNT(*) FROM traces WHERE id IN ({marks})", ids).fetchone()[0] == len(ids):
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"traces not written in {timeout_s} s")
        time.sleep(0.2)


def train(store_url: str, models: Path, base: str, output: Path, stage: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "aligner.training.cli", "train-router", "--store", store_url,
                           "--experiment", "route", "--output", str(models / "route-router")],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    shutil.copy(models / "route-router" / "README.md", output / f"router-card-{stage}.md")
    r = httpx.post(f"{base}/alignment/reload", timeout=300)
    r.raise_for_status()
    return {"train": done.stdout.strip(), "version": r.json()["routers"]["route-router"]}


def summarise(rows: list[dict]) -> dict:
    held = [r for r in rows if r["stage"].startswith("held-out")]
    policies = sorted({r["stage"] for r in held})
    out: dict = {}
    by_prompt = {}
    for stage in policies:
        mine = sorted((r for r in held if r["stage"] == stage), key=lambda r: r["seed"])
        by_prompt[stage] = [r["rating"] for r in mine]
        cell = {"all": bootstrap_ci([r["rating"] for r in mine])}
        for kind in ("quick", "detailed"):
            cell[kind] = bootstrap_ci([r["rating"] for r in mine if r["kind"] == kind])
        cell["unseen_templates"] = bootstrap_ci([r["rating"] for r in mine if r["template"] == 3])
        cell["arm_shares"] = {kind: {arm: sum(r["arm"] == arm for r in mine if r["kind"] == kind) for arm in ARMS}
                              for kind in ("quick", "detailed")}
        out[stage] = cell
    fixed = [s for s in policies if s.startswith("held-out fixed")]
    best = max(fixed, key=lambda s: out[s]["all"][0])
    # The oracle: each prompt's better fixed arm for its type (what a router that knew the
    # user's rule would play, without exploration).
    by_kind = {kind: max(fixed, key=lambda s: out[s][kind][0]) for kind in ("quick", "detailed")}
    kinds = [r["kind"] for r in sorted((r for r in held if r["stage"] == best), key=lambda r: r["seed"])]
    oracle = [by_prompt[by_kind[k]][i] for i, k in enumerate(kinds)]
    out["oracle (the better arm per type)"] = {"all": bootstrap_ci(oracle), "arms": by_kind}
    for stage in policies:
        if "router" in stage:
            diff = np.array(by_prompt[stage]) - np.array(by_prompt[best])
            out[stage]["minus_best_fixed"] = {"best_fixed": best, "diff": bootstrap_ci(list(diff))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("bench/raw/router_loop"))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, choices=(1, 2, 3), help="feedback rounds of 48")
    parser.add_argument("--smoke", action="store_true",
                        help="toy size, for CI: one round of 8 feedback prompts, 8 held out, 8 tokens")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="router-loop-"))
    models = work / "models"
    models.mkdir()
    (work / "profiles.yaml").write_text(PROFILES)
    store_url = f"sqlite:///{work / 'store.db'}"
    user = TypeUser()
    rounds, held = prompts()
    if args.smoke:
        rounds, held, args.rounds, args.max_tokens = [r[:8] for r in rounds], held[:8], 1, 8
    started = time.monotonic()
    server = start_server(work, "--max-model-len", "1024", "--reward-model", r"words=regex:\S+",
                          "--models-dir", str(models), "--store", store_url, "--store-traces",
                          "--profiles", str(work / "profiles.yaml"))
    base = server.v1
    rows: list[dict] = []
    stages = {}
    try:
        def run(asked, alignment, policy, stage):
            t0 = time.monotonic()
            answers = asyncio.run(ask_all(base, bodies(asked, alignment, args.max_tokens), args.concurrency))
            got = rate(user, asked, answers, policy, stage)
            rows.extend(got)
            stages[stage] = round(time.monotonic() - t0, 1)
            return got

        for arm in ARMS:
            run(held, {"profile": arm}, arm, f"held-out fixed {arm}")
        trained = {}
        for k, asked in enumerate(rounds[:args.rounds], start=1):
            how = "untrained: by the weights" if k == 1 else "routed"
            got = run(asked, {"experiment": "route"}, "experiment", f"feedback {k} ({how})")
            wait_for_traces(work / "store.db", [r["id"] for r in got])
            post_ratings(base, got)
            trained[str(k)] = train(store_url, models, base, args.output, str(k))
            run(held, {"experiment": "route"}, "router", f"held-out router after {len(asked) * k} ratings")
    finally:
        stop_server(server)
    summary = {"summary": summarise(rows), "training": trained, "stage_seconds": stages,
               "total_seconds": round(time.monotonic() - started, 1), "max_tokens": args.max_tokens,
               "held_out_prompts": len(held)}
    with open(args.output / "answers.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
