"""Alignment quality: `aligner bench quality ...`.

Runs a prompt set through plain decoding and several strategies (or profiles) on the same
seeds, and judges every answer with a judge reward that is NOT the one guiding any
strategy (the tool refuses otherwise: a strategy optimised against its own judge always
looks good). Reports per strategy: mean judge reward; win rate against plain decoding with a
bootstrap 95% interval; mean answer length and a length-controlled win rate (a logistic
regression of wins on the length difference, read at zero difference); refusal rate on
harmful prompt sets; generated tokens and latency per request.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from aligner.rewards.rules import is_refusal


@dataclass
class Answer:
    prompt_set: str
    prompt: str
    strategy: str
    text: str
    tokens: int
    latency_s: float
    judge: float = 0.0


@dataclass
class QualityConfig:
    base_url: str
    model: str
    strategies: dict[str, dict]  # label -> alignment object ({} = plain)
    prompt_sets: dict[str, list[str]]  # name -> prompts
    harmful_sets: set[str] = field(default_factory=set)
    max_tokens: int = 128
    seed: int = 0
    api_key: str | None = None


def win_rate_ci(wins: np.ndarray, rounds: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-prompt outcomes (1 win, 0.5 tie, 0 loss) and its bootstrap 95% interval.

    >>> win_rate_ci(np.array([1.0, 1.0, 1.0]))
    (1.0, 1.0, 1.0)
    """
    rng = np.random.default_rng(seed)
    samples = rng.choice(wins, size=(rounds, len(wins)), replace=True).mean(axis=1)
    return float(wins.mean()), float(np.quantile(samples, 0.025)), float(np.quantile(samples, 0.975))


def length_controlled_win_rate(wins: np.ndarray, length_diff: np.ndarray, l2: float = 1e-2) -> float:
    """P(win) at zero length difference, from a logistic regression of wins on the
    (standardised) length difference, fitted by Newton's method. Ties count as half a win
    (fractional targets are valid for the logistic log-likelihood).

    >>> round(length_controlled_win_rate(np.array([1.0, 0.0, 1.0, 0.0]), np.array([10.0, -10.0, 10.0, -10.0])), 2)
    0.5
    """
    scale = length_diff.std() or 1.0
    x = np.stack([np.ones_like(length_diff), length_diff / scale], axis=1)
    beta = np.zeros(2)
    for _ in range(50):
        p = 1 / (1 + np.exp(-x @ beta))
        gradient = x.T @ (wins - p) - l2 * beta
        hessian = -(x.T * (p * (1 - p))) @ x - l2 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        beta -= step
        if np.abs(step).max() < 1e-8:
            break
    return float(1 / (1 + math.exp(-beta[0])))


def guiding_rewards(alignment: dict) -> set[str]:
    """Reward names a strategy (or each pipeline stage) is guided by."""
    stages = alignment.get("pipeline") or [alignment]
    names = set()
    for stage in stages:
        reward = stage.get("reward")
        if isinstance(reward, str):
            names.add(reward)
        elif isinstance(reward, dict):
            names.update(reward)
    return names


def check_judge_independent(judge_path: str | None, judge_name: str, cfg: QualityConfig, registered: list[dict]) -> None:
    """Refuse a judge that guides one of the strategies, by name or by checkpoint path."""
    by_name = {r["name"]: r for r in registered}
    default = next((r["name"] for r in registered if r.get("default")), None)
    for label, alignment in cfg.strategies.items():
        guides = guiding_rewards(alignment)
        if alignment and not guides and default:
            guides = {default}  # a reward-using strategy without `reward` uses the server default
        for name in guides:
            guide = by_name.get(name, {})
            same_path = judge_path is not None and guide.get("path") and Path(guide["path"]).resolve() == Path(judge_path).resolve()
            if name == judge_name or same_path:
                raise ValueError(f"the judge {judge_name!r} also guides strategy {label!r}: pick a different judge")


def collect(cfg: QualityConfig, progress=None) -> list[Answer]:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
    answers = []
    with httpx.Client(timeout=900, headers=headers) as http:
        for set_name, prompts in cfg.prompt_sets.items():
            for i, prompt in enumerate(prompts):
                for label, alignment in cfg.strategies.items():
                    body = {"model": cfg.model, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": cfg.max_tokens, "seed": cfg.seed + i, "temperature": 0.8}
                    if alignment:
                        body["alignment"] = alignment
                    start = time.perf_counter()
                    r = http.post(f"{cfg.base_url}/chat/completions", json=body)
                    r.raise_for_status()
                    data = r.json()
                    answers.append(Answer(set_name, prompt, label, data["choices"][0]["message"]["content"],
                                          data["usage"]["completion_tokens"], time.perf_counter() - start))
                    if progress is not None:
                        progress.update(1)
    return answers


def summarise(answers: list[Answer], cfg: QualityConfig, baseline: str = "plain") -> dict:
    table = {}
    base = {(a.prompt_set, a.prompt): a for a in answers if a.strategy == baseline}
    for label in cfg.strategies:
        rows = [a for a in answers if a.strategy == label]
        entry = {
            "mean_judge_reward": float(np.mean([a.judge for a in rows])),
            "mean_words": float(np.mean([len(a.text.split()) for a in rows])),
            "tokens_per_request": float(np.mean([a.tokens for a in rows])),
            "latency_s_per_request": float(np.mean([a.latency_s for a in rows])),
        }
        harmful = [a for a in rows if a.prompt_set in cfg.harmful_sets]
        if harmful:
            entry["refusal_rate_harmful"] = float(np.mean([is_refusal(a.text) for a in harmful]))
        if label != baseline:
            pairs = [(a, base[(a.prompt_set, a.prompt)]) for a in rows]
            wins = np.array([1.0 if a.judge > b.judge else 0.5 if a.judge == b.judge else 0.0 for a, b in pairs])
            diff = np.array([len(a.text.split()) - len(b.text.split()) for a, b in pairs], dtype=float)
            rate, low, high = win_rate_ci(wins)
            entry.update(win_rate=rate, win_rate_ci95=[low, high],
                         length_controlled_win_rate=length_controlled_win_rate(wins, diff))
        table[label] = entry
    return table


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, entry in table.items():
        ax.scatter(entry["tokens_per_request"], entry["mean_judge_reward"])
        ax.annotate(label, (entry["tokens_per_request"], entry["mean_judge_reward"]), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per request (cost)")
    ax.set_ylabel("mean judge reward")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(table: dict) -> str:
    lines = ["| strategy | judge reward | win rate vs plain [95% CI] | LC win rate | words | refusals (harmful) | tokens/req | s/req |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, e in table.items():
        win = f"{e['win_rate']:.2f} [{e['win_rate_ci95'][0]:.2f}, {e['win_rate_ci95'][1]:.2f}]" if "win_rate" in e else "—"
        lc = f"{e['length_controlled_win_rate']:.2f}" if "length_controlled_win_rate" in e else "—"
        refusal = f"{e['refusal_rate_harmful']:.2f}" if "refusal_rate_harmful" in e else "—"
        lines.append(f"| {label} | {e['mean_judge_reward']:.3f} | {win} | {lc} | {e['mean_words']:.0f} | {refusal} | "
                     f"{e['tokens_per_request']:.0f} | {e['latency_s_per_request']:.1f} |")
    return "\n".join(lines)


def dump(answers: list[Answer], table: dict, path: Path) -> None:
    path.write_text(json.dumps({"summary": table, "answers": [a.__dict__ for a in answers]}, indent=2))
