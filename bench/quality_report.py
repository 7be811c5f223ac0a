"""The quality bench's records (`Answer`, `QualityConfig`), statistics, summary and Markdown
table (`bench.quality` collects).

Every refusal rate and win rate comes with Wilson's 95% interval (sound at 0/n and n/n, where
a bootstrap collapses to a point; a tie is half a win); a failed request counts in
its arm's `errors` and in nothing else (no mean, rate or paired comparison).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Answer:
    prompt_set: str
    prompt: str
    strategy: str
    seed: int
    text: str = ""
    tokens: int = 0
    latency_s: float = 0.0
    judge: float | None = None
    # By `bench.refusal_judge`, which no profile selects or steers with:
    refusal: bool = False  # declined early, whatever came after
    strict_refusal: bool = False  # declined early and did not go on to comply
    error: str | None = None  # set when the request failed twice; nothing else then counts
    report: dict | None = None  # the answer's `alignment` object, less its candidates


@dataclass
class QualityConfig:
    base_url: str
    model: str
    strategies: dict[str, dict]  # label -> alignment object ({} = plain)
    prompt_sets: dict[str, list[str]]  # name -> prompts
    harmful_sets: set[str] = field(default_factory=set)  # a safe assistant refuses these
    benign_sets: set[str] = field(default_factory=set)  # a safe assistant answers these
    max_tokens: int = 128
    temperature: float = 0.7
    seed: int = 0
    concurrency: int = 1
    api_key: str | None = None
    system: str | None = None  # a system message sent before every prompt (as a client's own)


def win_rate_ci(wins: np.ndarray) -> tuple[float, float, float]:
    """Mean of per-prompt outcomes (1 win, 0.5 tie, 0 loss) and its Wilson 95% interval, a tie
    counting as half a win: the project's one rule for proportions, never of zero width at
    0/n or n/n (a bootstrap collapses there).

    >>> [round(x, 3) for x in win_rate_ci(np.array([1.0, 1.0, 1.0]))]
    [1.0, 0.439, 1.0]
    >>> [round(x, 3) for x in win_rate_ci(np.array([1.0, 0.5, 0.0, 0.5]))]
    [0.5, 0.15, 0.85]
    """
    from aligner.stats import wilson_interval

    low, high = wilson_interval(float(wins.sum()), len(wins))
    return float(wins.mean()), low, high


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


def rate_with_ci(flags: list[bool], key: str) -> dict:
    """{key: rate, key_ci95: Wilson's 95% interval} over 0/1 outcomes; {} when there are none.

    >>> [round(x, 3) for x in rate_with_ci([False] * 146, "r")["r_ci95"]]
    [0.0, 0.026]
    """
    from aligner.stats import wilson_interval

    if not flags:
        return {}
    return {key: sum(flags) / len(flags), f"{key}_ci95": wilson_interval(sum(flags), len(flags))}


def cost(rows: list[Answer]) -> dict:
    if not rows:
        return {}
    return {"answered": len(rows), "tokens_per_request": float(np.mean([a.tokens for a in rows])),
            "latency_s_per_request": float(np.mean([a.latency_s for a in rows]))}


def with_ratios(entry: dict, base: dict) -> dict:
    """The cost entry with its ratios to plain's (None where plain has no cost to divide by)."""
    if not entry:
        return entry
    ratio = {}
    for key, name in (("tokens_per_request", "tokens_ratio_vs_plain"),
                      ("latency_s_per_request", "latency_ratio_vs_plain")):
        ratio[name] = entry[key] / base[key] if base.get(key) else None
    return {**entry, **ratio}


def win_rate_sets(cfg: QualityConfig) -> list[str]:
    """A helpfulness judge compares answers that should both help: a refusal against a harmful
    answer is a different question, so the benign sets when there are any."""
    return sorted(cfg.benign_sets) if cfg.benign_sets else list(cfg.prompt_sets)


def paired(rows: list[Answer], base: dict, sets: list[str]) -> dict:
    pairs = [(a, base[(a.prompt_set, a.prompt)]) for a in rows
             if a.prompt_set in sets and (a.prompt_set, a.prompt) in base]
    pairs = [(a, b) for a, b in pairs if a.judge is not None and b.judge is not None]
    entry = {"win_rate_pairs": len(pairs)}
    if pairs:
        wins = np.array([1.0 if a.judge > b.judge else 0.5 if a.judge == b.judge else 0.0 for a, b in pairs])
        diff = np.array([len(a.text.split()) - len(b.text.split()) for a, b in pairs], dtype=float)
        rate, low, high = win_rate_ci(wins)
        entry.update(win_rate=rate, win_rate_ci95=[low, high],
                     length_controlled_win_rate=length_controlled_win_rate(wins, diff))
    return entry


def summarise(answers: list[Answer], cfg: QualityConfig, baseline: str = "plain") -> dict:
    """{"win_rate_sets", "harmful_sets", "benign_sets", "strategies": {label: entry}}."""
    sets = win_rate_sets(cfg)
    ok = [a for a in answers if a.error is None]
    base = {(a.prompt_set, a.prompt): a for a in ok if a.strategy == baseline}
    groups = {"harmful": cfg.harmful_sets, "benign": cfg.benign_sets}
    base_cost = {g: cost([a for a in base.values() if a.prompt_set in s]) for g, s in groups.items()}
    base_cost["all"] = cost(list(base.values()))
    strategies = {}
    for label in cfg.strategies:
        rows = [a for a in ok if a.strategy == label]
        harmful = [a for a in rows if a.prompt_set in cfg.harmful_sets]
        benign = [a for a in rows if a.prompt_set in cfg.benign_sets]
        judged = [a.judge for a in rows if a.judge is not None]
        entry = {
            "requests": sum(a.strategy == label for a in answers),
            "errors": sum(a.strategy == label and a.error is not None for a in answers),
            "mean_judge_reward": float(np.mean(judged)) if judged else None,
            "mean_words": float(np.mean([len(a.text.split()) for a in rows])) if rows else None,
            **with_ratios(cost(rows), base_cost["all"]),
            "harmful": with_ratios(cost(harmful), base_cost["harmful"]),
            "benign": with_ratios(cost(benign), base_cost["benign"]),
            **rate_with_ci([a.refusal for a in harmful], "refusal_rate"),
            **rate_with_ci([a.strict_refusal for a in harmful], "strict_refusal_rate"),
            **rate_with_ci([a.refusal for a in benign], "over_refusal_rate"),
            **rate_with_ci([a.strict_refusal for a in benign], "strict_over_refusal_rate"),
        }
        if label != baseline:
            entry.update(paired(rows, base, sets))
        strategies[label] = entry
    return {"win_rate_sets": sets, "harmful_sets": sorted(cfg.harmful_sets), "benign_sets": sorted(cfg.benign_sets),
            "strategies": strategies}


def _rate(e: dict, key: str) -> str:
    if key not in e:
        return "—"
    low, high = e[f"{key}_ci95"]
    return f"{e[key]:.2f} [{low:.2f}, {high:.2f}]"


def _num(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def format_table(summary: dict) -> str:
    """One Markdown row per strategy, and a line naming the sets the win rate is on."""
    lines = ["| strategy | judge reward | win rate vs plain [95% CI] | LC win rate | words | strict refusal (harmful) "
             "| refusal (harmful) | strict over-refusal (benign) | over-refusal (benign) | tokens/req | × plain "
             "| s/req | × plain | errors |",
             "| --- | ---: | --- | ---: | ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, e in summary["strategies"].items():
        cells = [label, _num(e["mean_judge_reward"], ".3f"), _rate(e, "win_rate"),
                 _num(e.get("length_controlled_win_rate"), ".2f"), _num(e["mean_words"], ".0f"),
                 _rate(e, "strict_refusal_rate"), _rate(e, "refusal_rate"),
                 _rate(e, "strict_over_refusal_rate"), _rate(e, "over_refusal_rate"),
                 _num(e.get("tokens_per_request"), ".0f"), _num(e.get("tokens_ratio_vs_plain"), ".2f", "×"),
                 _num(e.get("latency_s_per_request"), ".2f"), _num(e.get("latency_ratio_vs_plain"), ".2f", "×"),
                 str(e["errors"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Win rates on: {', '.join(summary['win_rate_sets'])}.")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, entry in summary["strategies"].items():
        if entry.get("tokens_per_request") is None or entry["mean_judge_reward"] is None:
            continue
        ax.scatter(entry["tokens_per_request"], entry["mean_judge_reward"])
        ax.annotate(label, (entry["tokens_per_request"], entry["mean_judge_reward"]), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per request (cost)")
    ax.set_ylabel("mean judge reward")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
