"""A router learned from the feedback store: a contextual bandit that picks an experiment's arm
(a profile version) per request.

    experiments:                     # in the profiles file
      route-by-prompt:
        unit: router                 # each request's arm is chosen by the router below
        router: prompt-router        # <models-dir>/prompt-router/aligner_router.json (aligner train-router)
        explore: 0.1                 # at least this share of requests is spread evenly over the arms
        arms:
          - {profile: helpful@1}
          - {profile: concise@1}

Until `aligner train-router` has written the router (or while its file is missing), the arms
are drawn by their weights, which is the first data's logging policy. Every choice's
probability (its *propensity*) is returned with the answer (`alignment.experiment.propensity`)
and stored in the trace, so that any other policy can be estimated from the logs before it
serves (`offline_estimates`).

**Context** (`features`): the last user turn as signed hashed unigrams and bigrams
(`HASH_DIM` buckets, L2-normalised; the hashing trick of Weinberger et al. 2009), a bias, and
the turn's length in words on a log scale. No model runs: it costs microseconds and train and
serve compute it identically.

**Policy**: linear Thompson sampling (Agrawal & Goyal 2013). Each arm has a Bayesian linear
model of the reward (the user's rating on [0, 1], less the logs' mean): posterior mean
`mean = A^-1 b` and covariance `noise^2 A^-1`, with `A = prior I + sum x x^T` over that arm's
rated requests. For a request x every arm's sampled reward is a normal N(x.mean, noise^2
x^T A^-1 x): the router draws `DRAWS` joint samples, takes one at random and plays its best arm,
so the probability of each arm given those draws is exactly the share of draws it wins. With
probability `explore` it plays an arm uniformly instead (the exploration floor):

    propensity(a) = explore / K + (1 - explore) * wins(a) / DRAWS

**Offline estimates** (`offline_estimates`, in the router's card): the value of a policy from
logged (context, arm, propensity, reward): inverse propensity scoring, its self-normalised form,
and the doubly robust estimate (Dudik et al. 2011) with a reward model cross-fitted on the other
half of the logs; percentile bootstrap intervals.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROUTER_META_FILE = "aligner_router.json"
ROUTER_WEIGHTS_FILE = "router.npz"
HASH_DIM = 256
DIM = HASH_DIM + 2  # hashed n-grams, bias, length
DRAWS = 4096
WORD_RE = re.compile(r"[\w']+")
MAX_WORDS = 2000  # a long prompt's first words; the rest cost time and say little of its kind


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The last user turn's text (content parts' text joined), or "" without one."""
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(p.get("text", "") for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str))
        return ""
    return ""


def _bucket(token: str) -> tuple[int, float]:
    digest = hashlib.blake2b(token.encode(), digest_size=8).digest()
    value = int.from_bytes(digest, "big")
    return value % HASH_DIM, 1.0 if (value >> 63) & 1 else -1.0


def features(messages: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """The request's context vector (`DIM` floats): hashed n-grams of its last user turn, a bias
    and a length term.

    >>> x = features([{"role": "user", "content": "Write a Python function"}])
    >>> x.shape, float(np.linalg.norm(x[:HASH_DIM])).__round__(6), float(x[HASH_DIM])
    ((258,), 1.0, 1.0)
    """
    words = WORD_RE.findall(last_user_text(messages).lower())[:MAX_WORDS]
    x = np.zeros(DIM)
    for token in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
        index, sign = _bucket(token)
        x[index] += sign
    norm = float(np.linalg.norm(x[:HASH_DIM]))
    if norm > 0:
        x[:HASH_DIM] /= norm
    x[HASH_DIM] = 1.0
    x[HASH_DIM + 1] = math.log1p(len(words)) / 5.0
    return x


@dataclass
class Choice:
    arm: str
    propensity: float


@dataclass
class BanditRouter:
    """A trained router: per arm, the posterior of a linear reward model."""

    name: str
    arms: list[str]
    mean: np.ndarray  # (K, DIM) posterior means of the centred reward's weights
    cov: np.ndarray  # (K, DIM, DIM) A^-1 (times noise^2: the posterior covariance)
    offset: float = 0.0  # the logs' mean reward, added back to every prediction
    noise: float = 0.25
    explore: float = 0.1
    version: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Each arm's expected reward for context x (the posterior mean)."""
        return self.offset + self.mean @ x

    def probabilities(self, x: np.ndarray, rng: np.random.Generator, explore: float | None = None,
                      draws: int = DRAWS) -> tuple[np.ndarray, np.ndarray]:
        """(each arm's probability of being played for x, the winning arm of each draw)."""
        explore = self.explore if explore is None else explore
        k = len(self.arms)
        mu = self.predict(x)
        sd = self.noise * np.sqrt(np.maximum(np.einsum("i,kij,j->k", x, self.cov, x), 0.0))
        samples = mu[None, :] + sd[None, :] * rng.standard_normal((draws, k))
        winners = samples.argmax(axis=1)
        wins = np.bincount(winners, minlength=k) / draws
        return explore / k + (1.0 - explore) * wins, winners

    def choose(self, x: np.ndarray, rng: np.random.Generator, explore: float | None = None) -> Choice:
        explore = self.explore if explore is None else explore
        probs, winners = self.probabilities(x, rng, explore)
        if rng.random() < explore:
            index = int(rng.integers(len(self.arms)))
        else:
            index = int(winners[rng.integers(len(winners))])
        return Choice(self.arms[index], float(probs[index]))

    # -- files ------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write the router into `directory` (created), files aside then renamed into place."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(4)
        weights = directory / f".{ROUTER_WEIGHTS_FILE}.{token}.npz"
        np.savez(weights, mean=self.mean, cov=self.cov)
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
        meta = {"kind": "router", "arms": self.arms, "dim": DIM, "hash_dim": HASH_DIM, "offset": self.offset,
                "noise": self.noise, "explore": self.explore, "version": digest, **self.meta}
        os.replace(weights, directory / ROUTER_WEIGHTS_FILE)
        tmp = directory / f".{ROUTER_META_FILE}.{token}"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, directory / ROUTER_META_FILE)
        self.version = digest
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> BanditRouter:
        directory = Path(directory)
        meta = json.loads((directory / ROUTER_META_FILE).read_text())
        if meta.get("kind") != "router" or meta.get("dim") != DIM or meta.get("hash_dim") != HASH_DIM:
            raise ValueError(f"{directory / ROUTER_META_FILE}: not a router of this version (kind router, dim {DIM})")
        raw = (directory / ROUTER_WEIGHTS_FILE).read_bytes()
        # The weights are renamed in before the metadata: a reader between the two renames sees
        # weights of another version, and refuses them (a later reload reads both new).
        if hashlib.sha256(raw).hexdigest()[:12] != meta.get("version"):
            raise ValueError(f"{directory}: the weights are not those of version {meta.get('version')!r} "
                             "(written while being read, or edited)")
        with np.load(io.BytesIO(raw)) as data:
            mean, cov = np.array(data["mean"], dtype=float), np.array(data["cov"], dtype=float)
        arms = [str(a) for a in meta["arms"]]
        if len(arms) < 1 or len(set(arms)) != len(arms):
            raise ValueError(f"{directory}: the arms must be distinct and at least one")
        if mean.shape != (len(arms), DIM) or cov.shape != (len(arms), DIM, DIM):
            raise ValueError(f"{directory}: the weights do not match {len(arms)} arms of dimension {DIM}")
        offset, noise, explore = (float(meta[k]) for k in ("offset", "noise", "explore"))
        if not (np.isfinite(mean).all() and np.isfinite(cov).all() and math.isfinite(offset)
                and math.isfinite(noise) and noise > 0 and 0 <= explore < 1):
            raise ValueError(f"{directory}: weights, offset, noise (> 0) and explore ([0, 1)) must be finite numbers")
        known = {"kind", "arms", "dim", "hash_dim", "offset", "noise", "explore", "version"}
        return cls(directory.name, arms, mean, cov, offset, noise, explore, str(meta["version"]),
                   {k: v for k, v in meta.items() if k not in known})


def load_routers(models_dir: str | Path | None) -> dict[str, BanditRouter]:
    """{name: router} for every subdirectory of `models_dir` with an `aligner_router.json`."""
    if models_dir is None:
        return {}
    return {path.parent.name: BanditRouter.load(path.parent)
            for path in sorted(Path(models_dir).glob(f"*/{ROUTER_META_FILE}"))}


# -- learning from logs -------------------------------------------------------------------------


@dataclass(frozen=True)
class Logged:
    """One logged request: its context, the arm played, that arm's probability, the reward."""

    x: np.ndarray
    arm: str
    propensity: float
    reward: float


def fit(rows: Sequence[Logged], arms: Sequence[str], name: str = "router", prior: float = 1.0,
        noise: float = 0.25, explore: float = 0.1) -> BanditRouter:
    """The posterior of each arm's linear reward model from the rows that played it (the direct
    method: rows are not reweighted; the propensities serve the offline estimates)."""
    if not arms:
        raise ValueError("a router needs at least one arm")
    offset = float(np.mean([r.reward for r in rows])) if rows else 0.5
    index = {arm: i for i, arm in enumerate(arms)}
    precision = np.stack([prior * np.eye(DIM) for _ in arms])
    b = np.zeros((len(arms), DIM))
    for row in rows:
        if row.arm not in index:
            continue
        i = index[row.arm]
        precision[i] += np.outer(row.x, row.x)
        b[i] += (row.reward - offset) * row.x
    cov = np.linalg.inv(precision)
    mean = np.einsum("kij,kj->ki", cov, b)
    return BanditRouter(name, list(arms), mean, cov, offset, noise, explore)


def _bootstrap(values: np.ndarray, rng: np.random.Generator, resamples: int = 1000,
               statistic: Callable[[np.ndarray], float] = np.mean) -> tuple[float, float]:
    if len(values) == 0:
        return (math.nan, math.nan)
    stats = np.array([statistic(values[rng.integers(0, len(values), size=len(values))]) for _ in range(resamples)])
    return float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975))


def offline_estimates(rows: Sequence[Logged], arms: Sequence[str],
                      policies: Mapping[str, Callable[[np.ndarray, int], np.ndarray]],
                      reward_models: Sequence[BanditRouter], folds: np.ndarray,
                      seed: int = 0) -> dict[str, dict[str, Any]]:
    """Each policy's estimated mean reward from the logs. A policy maps (context, row index) to
    probabilities over `arms` (the index lets a cross-fitted policy use the model not fitted on
    that row). `reward_models[f]` predicts rewards for the rows of fold f (fitted on the others).

    IPS: mean of w r, w = pi(a|x) / propensity. SNIPS: sum w r / sum w. DR: mean of
    sum_a pi(a|x) r^(x, a) + w (r - r^(x, a_logged)). 95% percentile bootstrap over rows."""
    rng = np.random.default_rng(seed)
    index = {arm: i for i, arm in enumerate(arms)}
    r = np.array([row.reward for row in rows])
    p = np.array([row.propensity for row in rows])
    played = np.array([index[row.arm] for row in rows], dtype=int)
    predicted = np.stack([reward_models[folds[i]].predict(row.x) for i, row in enumerate(rows)]) if rows else np.zeros((0, len(arms)))
    out = {}
    for name, policy in policies.items():
        pi = np.stack([policy(row.x, i) for i, row in enumerate(rows)]) if rows else np.zeros((0, len(arms)))
        w = pi[np.arange(len(rows)), played] / p
        ips = w * r
        dr = (pi * predicted).sum(axis=1) + w * (r - predicted[np.arange(len(rows)), played])
        both = np.stack([w, r], axis=1)
        out[name] = {
            "ips": float(ips.mean()) if len(rows) else math.nan, "ips_ci95": _bootstrap(ips, rng),
            "snips": float(ips.sum() / w.sum()) if w.sum() > 0 else math.nan,
            "snips_ci95": _bootstrap(both, rng, statistic=lambda v: float((v[:, 0] * v[:, 1]).sum() / max(v[:, 0].sum(), 1e-12))),
            "dr": float(dr.mean()) if len(rows) else math.nan, "dr_ci95": _bootstrap(dr, rng),
            "mean_weight": float(w.mean()) if len(rows) else math.nan,
        }
    return out


def train_router(rows: Sequence[Logged], arms: Sequence[str], name: str, *, prior: float = 1.0,
                 noise: float = 0.25, explore: float = 0.1, seed: int = 0) -> tuple[BanditRouter, dict[str, Any]]:
    """The router fitted on every row, and its card's evaluation: the router's policy, each arm
    alone and the logging policy, estimated offline with the router and the reward model
    cross-fitted on two halves of the rows (each row judged by models that never saw it)."""
    rows = [row for row in rows if row.arm in arms]
    rng = np.random.default_rng(seed)
    folds = rng.permutation(np.arange(len(rows)) % 2) if rows else np.zeros(0, dtype=int)
    halves = [fit([row for i, row in enumerate(rows) if folds[i] != f], arms, name, prior, noise, explore)
              for f in (0, 1)]
    draw = np.random.default_rng(seed + 1)
    if not rows:
        raise ValueError("no rated requests on these arms")
    policies: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
        "router": lambda x, i: halves[folds[i]].probabilities(x, draw)[0],
    }
    for k, arm in enumerate(arms):
        policies[f"arm:{arm}"] = lambda x, i, k=k: np.eye(len(arms))[k]
    estimates = offline_estimates(rows, arms, policies, halves, folds, seed)
    # What was served is measured, not estimated: its mean reward (every field says the same).
    served = np.array([row.reward for row in rows])
    interval = _bootstrap(served, np.random.default_rng(seed))
    estimates["logged"] = {"ips": float(served.mean()), "ips_ci95": interval, "snips": float(served.mean()),
                           "snips_ci95": interval, "dr": float(served.mean()), "dr_ci95": interval, "mean_weight": 1.0}
    router = fit(rows, arms, name, prior, noise, explore)
    per_arm = {arm: {"rows": sum(row.arm == arm for row in rows),
                     "mean_reward": _mean([row.reward for row in rows if row.arm == arm])} for arm in arms}
    report = {"rows": len(rows), "arms": per_arm, "mean_reward": _mean([row.reward for row in rows]),
              "estimates": estimates, "prior": prior, "noise": noise, "explore": explore, "seed": seed}
    return router, report


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return round(float(np.mean(values)), 4) if values else None
