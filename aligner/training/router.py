"""`aligner train-router`: a router (`aligner.bandit`) learned from an experiment's rated traces.

    aligner train-router --store URL --experiment route-by-prompt --output models/prompt-router
    curl -X POST localhost:8000/v1/alignment/reload      # the server's --models-dir holds it

Rows: each trace of the experiment that has a rating (`POST /v1/alignment/feedback` with
`rating`), its reward the mean of its ratings on [0, 1] (thumbs down 0, up 1; stars (s-1)/4),
a user's later rating of the same answer replacing their earlier one. A pairwise preference
(`other_trace_id`: this answer was preferred over another to the same conversation) between two
traces of the experiment counts as that user's rating of each, 1 for the preferred and 0 for the
other, unless the user also rated that answer (the rating wins). The context is the trace's
conversation (`aligner.bandit.features`), the arm the trace's arm, the propensity the one the
server logged with the choice (`alignment.experiment.propensity`); a trace without one (from
before propensities were logged) counts its arm's share of all the experiment's traces.

The card (`README.md`, and `training` in `aligner_router.json`) gives the offline estimates of the
router's policy, of each arm alone and of the logging policy, cross-fitted (`aligner.bandit.train_router`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from aligner.bandit import BanditRouter, Logged, features, train_router
from aligner.experiments import RATING_SCALES, normalised_rating


def logged_rows(feedback: Iterable[Mapping[str, Any]], experiment: str,
                served: Mapping[str, int] | None = None) -> tuple[list[Logged], dict[str, int]]:
    """The experiment's rated traces as `Logged` rows, from `Store.iter_feedback`'s items; and
    counts of what was skipped. `served`: how many of the experiment's traces (rated or not)
    each arm has, the base of a missing propensity (default: the rated traces')."""
    ratings: dict[str, dict[Any, float]] = {}
    compared: dict[str, dict[Any, float]] = {}  # pairwise outcomes: 1 preferred, 0 the other
    traces: dict[str, Mapping[str, Any]] = {}
    skipped: Counter = Counter()
    for item in feedback:
        row, trace = item["feedback"], item["trace"]
        who = row.get("user") or ("anonymous", row["id"])  # anonymous feedback all counts
        if row.get("kind") == "pairwise":
            other = item.get("other_trace") or {}
            inside = [t.get("experiment") == experiment for t in (trace, other)]
            if any(inside) and not all(inside):
                skipped["pairwise with an answer outside the experiment"] += 1
            if not all(inside):
                continue
            for t, outcome in ((trace, 1.0), (other, 0.0)):
                compared.setdefault(t["id"], {})[who] = outcome  # the latest wins
                traces[t["id"]] = t
            continue
        if row.get("kind") != "rating" or trace.get("experiment") != experiment:
            continue
        scale, rating = row.get("rating_scale"), row.get("rating")
        if scale not in RATING_SCALES or not isinstance(rating, (int, float)) or not math.isfinite(rating):
            skipped["unreadable rating"] += 1
            continue
        ratings.setdefault(trace["id"], {})[who] = normalised_rating(rating, scale)  # the latest wins
        traces[trace["id"]] = trace
    for trace_id, by_user in compared.items():
        ratings[trace_id] = {**by_user, **ratings.get(trace_id, {})}  # a user's own rating wins
    shares = Counter(served) if served else Counter(t.get("arm") for t in traces.values())
    total = sum(shares.values())
    rows = []
    for trace_id, by_user in ratings.items():
        trace = traces[trace_id]
        arm = trace.get("arm")
        if not arm:
            skipped["no arm"] += 1
            continue
        logged = (((trace.get("extra") or {}).get("alignment") or {}).get("experiment") or {}).get("propensity")
        if isinstance(logged, (int, float)) and 0 < logged <= 1:
            propensity = float(logged)
        else:
            propensity = shares[arm] / total if shares[arm] else 1.0 / max(len(shares), 1)
            skipped["propensity from the arm's share"] += 1
        reward = sum(by_user.values()) / len(by_user)
        rows.append(Logged(features(trace.get("conversation") or []), arm, propensity, reward))
    return rows, dict(skipped)


def write_card(output: Path, router: BanditRouter, report: dict[str, Any], command: str) -> None:
    estimates = report["estimates"]

    def cell(e: dict[str, Any], key: str) -> str:
        low, high = e[f"{key}_ci95"]
        return f"{e[key]:.3f} [{low:.3f}, {high:.3f}]" if math.isfinite(e[key]) else "-"

    lines = [
        f"# {router.name}", "",
        "A learned router (`aligner.bandit`): linear Thompson sampling over hashed n-grams of the "
        f"request's last user turn, with an exploration floor of {router.explore:g}. An experiment with "
        f"`unit: router` and `router: {router.name}` plays it.", "",
        f"Version `{router.version}`; arms: {', '.join(f'`{a}`' for a in router.arms)}.", "",
        "## Data", "",
        f"{report['rows']} rated requests of experiment `{report['experiment']}`, mean reward "
        f"{report['mean_reward']} (ratings on [0, 1]).", "",
        "| arm | rated requests | mean reward |", "| --- | ---: | ---: |",
        *[f"| `{arm}` | {a['rows']} | {a['mean_reward']} |" for arm, a in report["arms"].items()], "",
        f"Skipped or defaulted: {report['skipped'] or 'none'}.", "",
        "## Offline estimates (cross-fitted on two halves of the logs; 95% bootstrap intervals)", "",
        "Mean reward each policy would have had on these requests, estimated from the logged ones. "
        "`router`: this router's policy (each half judged by the router fitted on the other); "
        "`arm:X`: always X; `logged`: what was served.", "",
        "| policy | doubly robust | IPS | self-normalised IPS |", "| --- | --- | --- | --- |",
        *[f"| `{name}` | {cell(e, 'dr')} | {cell(e, 'ips')} | {cell(e, 'snips')} |" for name, e in estimates.items()],
        "", "## Command", "", "```", command, "```", "",
    ]
    (output / "README.md").write_text("\n".join(lines))


def run(store, experiment: str, output: Path, arms: list[str] | None = None, *, prior: float = 1.0,
        noise: float = 0.25, explore: float = 0.1, seed: int = 0, command: str = "") -> dict[str, Any]:
    served = Counter(t["arm"] for t in store.experiment_traces(experiment) if t.get("arm"))
    rows, skipped = logged_rows(store.iter_feedback(), experiment, served)
    if not rows:
        raise ValueError(f"experiment {experiment!r} has no rated requests in the store")
    arms = arms or sorted({row.arm for row in rows})
    router, report = train_router(rows, arms, output.name, prior=prior, noise=noise, explore=explore, seed=seed)
    report = {"experiment": experiment, "skipped": skipped, **report}
    router.meta = {"training": report}
    router.save(output)
    write_card(output, router, report, command)
    return {"router": router.ref, "output": str(output), **report}


def summary_line(result: Mapping[str, Any]) -> str:
    est = result["estimates"]
    best = max((k for k in est if k.startswith("arm:")), key=lambda k: est[k]["dr"], default=None)
    parts = [f"{result['router']}: {result['rows']} rated requests",
             f"router DR {est['router']['dr']:.3f}", f"logged {est['logged']['dr']:.3f}"]
    if best:
        parts.append(f"best single arm {best[4:]} DR {est[best]['dr']:.3f}")
    return ", ".join(parts) + f" -> {result['output']}"

