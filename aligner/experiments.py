"""A/B experiments on profile versions: which arm a request gets, and the report per arm.

    experiments:                     # in the profiles file, beside `profiles:`
      tone-test:
        description: does the refined pipeline read better?
        unit: user                   # user (the request's `user`; random without one) | random
        arms:
          - {profile: helpful@1, weight: 1}
          - {profile: helpful@2, weight: 1}

An arm is a pinned profile version (`name@version`): an arm that followed "the latest" would
change under a running experiment when a version is added.

Assignment (`assign`) hashes (experiment, user) onto the arms' weights: the same user gets the
same arm on every replica, with or without a store, and the shares approach the weights. A
store, when the server has one, also keeps each user's first arm, so that a user stays on it
when the weights later change (the server's side). A request without a `user`, or any request
of a `unit: random` experiment, draws an arm at random by the weights.

The report (`experiment_report`) is computed from the experiment's traces and the feedback on
them; `aligner.stats` holds the statistics. The server keeps an `ExperimentTally` per report
and adds only the rows written since its last read.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aligner import stats

MAX_ARMS = 16
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
UNITS = ("user", "random", "router")
# Ratings on one [0, 1] scale: thumbs down 0, up 1; stars 1..5 as (stars - 1) / 4. The report
# also gives each scale in its own terms (`by_scale`: the share of thumbs up, the mean stars).
RATING_SCALES = {"thumbs": lambda r: (r + 1) / 2, "stars": lambda r: (r - 1) / 4}
LATENCY_QUANTILES = {"p50": 0.5, "p95": 0.95}
SRM_THRESHOLD = 0.001  # a sample-ratio p-value below this is a broken split, not chance


class ExperimentArm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile: str = Field(min_length=3, max_length=255)
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)


class Experiment(BaseModel):
    """One experiment from the profiles file; `name` is its key there."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    description: str = ""
    unit: Literal["user", "random", "router"] = "user"
    # `unit: router`: a learned router (`aligner.bandit`, in the models directory) picks each
    # request's arm; `explore` is its floor of uniform exploration.
    router: str | None = Field(default=None, pattern=NAME_RE.pattern)
    explore: float = Field(default=0.1, ge=0.0, lt=1.0, allow_inf_nan=False)
    arms: list[ExperimentArm] = Field(min_length=2, max_length=MAX_ARMS)

    @model_validator(mode="after")
    def _router_with_its_unit(self) -> Experiment:
        if (self.unit == "router") != (self.router is not None):
            raise ValueError("`router: NAME` goes with `unit: router`, and `unit: router` needs a router")
        return self

    @property
    def arm_names(self) -> list[str]:
        return [arm.profile for arm in self.arms]

    def shares(self) -> dict[str, float]:
        """{arm: its weight's share of all weights}.

        >>> Experiment(arms=[{"profile": "a@1", "weight": 1}, {"profile": "a@2", "weight": 3}]).shares()
        {'a@1': 0.25, 'a@2': 0.75}
        """
        total = math.fsum(arm.weight for arm in self.arms)
        return {arm.profile: arm.weight / total for arm in self.arms}

    def pick(self, u: float) -> str:
        """The arm at `u` in [0, 1) on the weights' cumulative scale."""
        total = math.fsum(arm.weight for arm in self.arms)
        edge = 0.0
        for arm in self.arms:
            edge += arm.weight / total
            if u < edge:
                return arm.profile
        return self.arms[-1].profile  # u within float noise of 1

    def public(self) -> dict[str, Any]:
        router = {"router": self.router, "explore": self.explore} if self.unit == "router" else {}
        return {"name": self.name, "description": self.description, "unit": self.unit, **router,
                "arms": [{"profile": a.profile, "weight": a.weight, "share": s}
                         for a, s in zip(self.arms, self.shares().values(), strict=True)]}


@dataclass(frozen=True)
class Assignment:
    """A request's arm: `unit` says how it was chosen ("user": by its user, sticky; "random";
    "router": by a learned router, `router` its name@version, None before it is trained).
    `propensity` is the probability this request had of getting this arm (a user's share
    under `unit: user`), what an offline estimate of another policy weighs the logs by."""

    experiment: str
    arm: str
    unit: Literal["user", "random", "router"]
    user: str | None = None
    propensity: float | None = None
    router: str | None = None

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.experiment, "arm": self.arm, "unit": self.unit}
        if self.propensity is not None:
            out["propensity"] = round(self.propensity, 6)
        if self.unit == "router":
            out["router"] = self.router
        return out


def hashed_arm(experiment: Experiment, unit_id: str) -> str:
    """The arm a unit gets: sha256 of (experiment, unit) as a point in [0, 1) on the weights.
    Deterministic (every replica agrees, no store needed) and independent across experiments.

    >>> tone = Experiment(name="tone", arms=[{"profile": "a@1"}, {"profile": "a@2"}])
    >>> hashed_arm(tone, "alice") == hashed_arm(tone, "alice")
    True
    """
    digest = hashlib.sha256(f"{experiment.name}\x00{unit_id}".encode()).digest()
    return experiment.pick(int.from_bytes(digest[:8], "big") / 2**64)


UNIT_SEPARATOR = "\x1f"  # no user id holds it (`server.protocol_base.check_plain_id`)


def tenant_unit(tenant: str | None, user: str | None) -> str | None:
    """A user as an experiment's unit: one name in two tenants is two people. The default
    tenant's users are their plain name (as before tenants); a named tenant's carry it.

    >>> tenant_unit(None, "alice"), tenant_unit("team-a", "alice") == tenant_unit("team-b", "alice")
    ('alice', False)
    """
    if not user:
        return None
    return user if tenant is None else f"{tenant}{UNIT_SEPARATOR}{user}"


def assign(experiment: Experiment, user: str | None, rng: random.Random) -> Assignment:
    """The arm for a request: by its user when the experiment's unit is `user` and it has one,
    else at random by the weights."""
    shares = experiment.shares()
    if experiment.unit == "user" and user:
        arm = hashed_arm(experiment, user)
        return Assignment(experiment.name, arm, "user", user, shares[arm])
    arm = experiment.pick(rng.random())
    return Assignment(experiment.name, arm, "router" if experiment.unit == "router" else "random",
                      propensity=shares[arm])


class ExperimentError(ValueError):
    """Why an `experiments:` entry cannot run; `arm` is the index of the arm at fault, if one is."""

    def __init__(self, message: str, arm: int | None = None):
        super().__init__(message)
        self.arm = arm


def check_experiment(name: Any, body: Any, resolve_profile) -> Experiment:
    """Parse one `experiments:` entry; raises ExperimentError saying what is wrong.
    `resolve_profile(reference)` raises KeyError for a profile version that does not exist."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ExperimentError("the name must be 1-128 letters, digits, '.', '_' or '-' (it goes in URLs)")
    if not isinstance(body, dict):
        raise ExperimentError("needs a mapping with 'arms'")
    try:
        experiment = Experiment.model_validate({**body, "name": name})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = err["loc"]
        where = ".".join(str(p) for p in loc)
        arm = loc[1] if len(loc) > 1 and loc[0] == "arms" and isinstance(loc[1], int) else None
        raise ExperimentError(f"{where}: {err['msg']}" if where else err["msg"], arm) from None
    seen: set[str] = set()
    for i, arm in enumerate(experiment.arms):
        base, at, version = arm.profile.partition("@")
        if not at or not version.isdigit():
            raise ExperimentError(f"arms.{i}.profile: pin a version, e.g. '{base}@1' (an arm that follows the "
                                  "latest version would change under a running experiment)", i)
        try:
            resolve_profile(arm.profile)
        except KeyError as exc:
            raise ExperimentError(f"arms.{i}.profile: {exc.args[0]}", i) from None
        if arm.profile in seen:
            raise ExperimentError(f"arms.{i}.profile: {arm.profile} is already an arm", i)
        seen.add(arm.profile)
    return experiment


# -- the report -----------------------------------------------------------------------------------

@dataclass
class ArmSample:
    """What one arm's traces and feedback hold: counts, the moments of each mean, and the
    latencies kept sorted (for their quantiles)."""

    requests: int = 0
    users: set[str] = field(default_factory=set)
    anonymous: int = 0  # requests without a user: each drew its arm on its own
    rewards: stats.Moments = field(default_factory=stats.Moments)
    tokens: stats.Moments = field(default_factory=stats.Moments)
    latency: stats.Moments = field(default_factory=stats.Moments)
    latencies: list[float] = field(default_factory=list)  # sorted
    ratings: stats.Moments = field(default_factory=stats.Moments)
    by_scale: dict[str, stats.Moments] = field(default_factory=dict)
    wins: int = 0
    losses: int = 0


def trace_reward(candidates: list[dict] | None, selected: list[int | None] | None) -> float | None:
    """The mean combined score of the returned candidates that have one; None when none has
    (a strategy without a reward).

    >>> trace_reward([{"score": 0.5}, {"score": 2.0}, {"score": None}], [1])
    2.0
    >>> trace_reward([{"score": None}], [0]) is None
    True
    """
    scores = [candidates[i].get("score") for i in (selected or ())
              if i is not None and candidates and 0 <= i < len(candidates)]
    scores = [s for s in scores if isinstance(s, (int, float)) and math.isfinite(s)]
    return math.fsum(scores) / len(scores) if scores else None


def normalised_rating(rating: float, scale: str) -> float:
    """A rating on [0, 1]: thumbs down 0 and up 1, stars (s - 1) / 4.

    >>> normalised_rating(-1, "thumbs"), normalised_rating(4, "stars")
    (0.0, 0.75)
    """
    return float(RATING_SCALES[scale](rating))


def add_trace(samples: dict[str, ArmSample], trace: Mapping[str, Any]) -> None:
    """A trace (a row with `aligner.store.EXPERIMENT_TRACE_COLUMNS`) into its arm's requests,
    users, reward, tokens and latency; an arm met in the store but not in the file (one since
    removed) is added."""
    sample = samples.setdefault(trace["arm"], ArmSample())
    sample.requests += 1
    if trace.get("user"):
        sample.users.add(tenant_unit(trace.get("tenant"), trace["user"]))
    else:
        sample.anonymous += 1
    if (reward := trace_reward(trace.get("candidates"), trace.get("selected"))) is not None:
        sample.rewards.add(reward)
    if isinstance(tokens := (trace.get("usage") or {}).get("completion_tokens"), (int, float)):
        sample.tokens.add(float(tokens))
    if isinstance(latency := (trace.get("timings") or {}).get("total_s"), (int, float)):
        sample.latency.add(float(latency))
        sample.latencies.append(float(latency))  # the caller sorts (ExperimentTally.add_traces)


def judgement_key(row: Mapping[str, Any]) -> tuple:
    """What one judgement is of: (the answer, the kind, who judged); a pairwise judgement's
    answer is the pair, in either order."""
    answer = (frozenset((row["trace_id"], row.get("other_trace_id"))) if row["kind"] == "pairwise"
              else row["trace_id"])
    return answer, row["kind"], row.get("user")


def sample_ratio(samples: Mapping[str, ArmSample], shares: Mapping[str, float], unit: str) -> dict[str, Any] | None:
    """The sample-ratio-mismatch check: are the arms' assignment units split as the weights
    say? Units are what drew an arm: each distinct user (and each request without one) under
    `unit: user`, each request under `unit: random`. Pearson's chi-square against the
    configured shares; `mismatch` below p 0.001, where the split is a bug (a broken hash, a
    sticky arm from earlier weights, lost traces of one arm), not chance. None without two
    configured arms or units, and under `unit: router`, whose split follows the requests."""
    if unit == "router":
        return None
    arms = [arm for arm in shares if arm in samples]
    if unit == "user":
        observed = [len(samples[arm].users) + samples[arm].anonymous for arm in arms]
    else:
        observed = [samples[arm].requests for arm in arms]
    test = stats.chi_square_test(observed, [shares[arm] for arm in arms])
    if test is None:
        return None
    return {**test, "units": dict(zip(arms, observed, strict=True)), "threshold": SRM_THRESHOLD,
            "mismatch": test["p_value"] < SRM_THRESHOLD}


def arm_report(arm: str, sample: ArmSample, share: float | None, total_requests: int) -> dict[str, Any]:
    latencies = sample.latencies
    contests = sample.wins + sample.losses
    return {
        "arm": arm,
        "configured_share": share,
        "requests": sample.requests,
        "share": sample.requests / total_requests if total_requests else None,
        "users": len(sample.users),
        "rating": {**stats.mean_interval(sample.ratings),
                   "by_scale": {scale: stats.mean_interval(values) for scale, values in sorted(sample.by_scale.items())}},
        "win_rate": {"wins": sample.wins, "n": contests, "rate": sample.wins / contests if contests else None,
                     "ci95": stats.wilson_interval(sample.wins, contests)},
        "reward": stats.mean_interval(sample.rewards),
        "completion_tokens": stats.mean_interval(sample.tokens),
        "latency_s": {"n": len(latencies), "mean": stats.mean_interval(sample.latency)["mean"],
                      **{name: {"value": stats.quantile(latencies, q), "ci95": stats.quantile_interval(latencies, q)}
                         for name, q in LATENCY_QUANTILES.items()}},
    }


def comparison(arm: str, baseline: str, samples: dict[str, ArmSample],
               pairs: dict[tuple[str, str], int]) -> dict[str, Any]:
    """`arm` against `baseline`: Welch's test of each mean (arm minus baseline), and the
    pairwise preferences between the two with an exact binomial test against 1/2."""
    a, b = samples[baseline], samples[arm]
    wins, losses = pairs.get((arm, baseline), 0), pairs.get((baseline, arm), 0)
    contests = wins + losses
    p50 = [stats.quantile(s.latencies, 0.5) for s in (a, b)]
    return {
        "arm": arm,
        "baseline": baseline,
        "rating": stats.welch(a.ratings, b.ratings),
        "reward": stats.welch(a.rewards, b.rewards),
        "completion_tokens": stats.welch(a.tokens, b.tokens),
        "latency_s": {**stats.welch(a.latency, b.latency),
                      "p50_difference": p50[1] - p50[0] if None not in p50 else None},
        "win_rate": {"wins": wins, "n": contests, "rate": wins / contests if contests else None,
                       "ci95": stats.wilson_interval(wins, contests), "p_value": stats.binomial_test(wins, contests)},
    }


def experiment_report(name: str, experiment: Experiment | None, traces: Iterable[Mapping[str, Any]],
                      feedback: Iterable[Mapping[str, Any]], since: float | None = None) -> dict[str, Any]:
    """The report of one experiment: per arm its numbers with 95% intervals, and each arm
    against the first (the baseline). `experiment` is the file's (None once removed from it:
    the arms are then those its traces name)."""
    tally = ExperimentTally()
    tally.add_traces(traces)
    tally.add_feedback(feedback)
    return tally.report(name, experiment, since)


class ExperimentTally:
    """An experiment's report kept up to date by the rows written since the last one: per arm
    what its traces hold, each judgement's latest row and its share of the arms' ratings and
    wins (a later judgement takes the earlier one's share back), and where reading stopped
    (the last trace `seq` and feedback `id`), so a report reads only new rows. `deletions` is
    the store's deletion count when the tally began: once it moves, rows it counted may be
    gone and the caller starts a new tally. One report at a time (`lock`)."""

    def __init__(self, deletions: int | None = None) -> None:
        self.deletions = deletions
        self.seq = 0
        self.feedback_id = 0
        self.samples: dict[str, ArmSample] = {}  # from the traces only
        self.judgements: dict[tuple, tuple] = {}  # key -> (kind, arm, rating, scale, other arm)
        self.feedback_rows = 0
        # Per arm, the counted ratings (a count per value: replaced ones come back out exactly),
        # and per scale in its own terms; the pairwise counts (winner's arm, loser's arm).
        self.ratings: dict[str, stats.ValueCounts] = {}
        self.by_scale: dict[str, dict[str, stats.ValueCounts]] = {}
        self.pairs: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()

    @property
    def repeats(self) -> int:
        """Judgements after the first of one user on one answer and kind: the latest counts."""
        return self.feedback_rows - len(self.judgements)

    def add_traces(self, rows: Iterable[Mapping[str, Any]]) -> None:
        touched = set()
        for row in rows:
            add_trace(self.samples, row)
            touched.add(row["arm"])
            self.seq = max(self.seq, row.get("seq") or 0)
        for arm in touched:  # appended, then sorted once: a sorted run and a short tail, linear
            self.samples[arm].latencies.sort()

    def scanned_feedback(self, last_id: int) -> None:
        """Feedback up to `last_id` was read (the experiment's or not): read after it next."""
        self.feedback_id = max(self.feedback_id, last_id)

    def add_feedback(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Rows oldest first: a judgement replaces the one before it on its key, and moves to
        the end, so the kept rows stay in the order of their latest. Thumbs up then down on one
        answer counts once, as down; a thousand votes from one user on one answer count once;
        preferring B over A after A over B counts once, as B.

        >>> tally = ExperimentTally()
        >>> tally.add_feedback([{"id": i, "kind": "rating", "trace_id": "a", "arm": "x@1", "user": user,
        ...                      "rating": rating, "rating_scale": "thumbs"}
        ...                     for i, (user, rating) in enumerate([("u", 1), ("u", -1), ("v", 1)])])
        >>> tally.ratings["x@1"].counts, tally.repeats  # u's down and v's up
        ({0.0: 1, 1.0: 1}, 1)
        """
        for row in rows:
            self.feedback_rows += 1
            key = judgement_key(row)
            earlier = self.judgements.pop(key, None)
            if earlier is not None:
                self._count(earlier, -1)
            judgement = (row["kind"], row["arm"], row.get("rating"), row.get("rating_scale"), row.get("other_arm"))
            self.judgements[key] = judgement  # what counting needs, not the row: a tally stays small
            self._count(judgement, 1)
            self.feedback_id = max(self.feedback_id, row.get("id") or 0)

    def _count(self, judgement: tuple, sign: int) -> None:
        kind, arm, rating, scale, other_arm = judgement
        if kind == "rating":
            value = normalised_rating(rating, scale)
            # Per scale in its own terms: the share of thumbs up, the mean number of stars.
            own = value if scale == "thumbs" else float(rating)
            overall = self.ratings.setdefault(arm, stats.ValueCounts())
            in_scale = self.by_scale.setdefault(arm, {}).setdefault(scale, stats.ValueCounts())
            for counts, x in ((overall, value), (in_scale, own)):
                (counts.add if sign > 0 else counts.remove)(x)
        elif kind == "pairwise" and arm != other_arm:  # within one arm: no contest
            self.pairs[(arm, other_arm)] = self.pairs.get((arm, other_arm), 0) + sign

    def report(self, name: str, experiment: Experiment | None, since: float | None = None) -> dict[str, Any]:
        configured = experiment.arm_names if experiment is not None else []
        pairs = {pair: count for pair, count in self.pairs.items() if count}
        judged = {arm for arm, rated in self.ratings.items() if rated.counts} | {arm for pair in pairs for arm in pair}
        samples = {arm: ArmSample() for arm in configured}
        for arm in [*self.samples, *sorted(judged - set(self.samples))]:
            samples[arm] = replace(
                self.samples.get(arm) or ArmSample(),  # its traces' numbers, shared, not copied
                ratings=self.ratings[arm].moments() if arm in self.ratings else stats.Moments(),
                by_scale={scale: rated.moments() for scale, rated in self.by_scale.get(arm, {}).items() if rated.counts},
                wins=sum(count for (winner, _), count in pairs.items() if winner == arm),
                losses=sum(count for (_, loser), count in pairs.items() if loser == arm))
        arms = configured + sorted(a for a in samples if a not in configured)
        shares = experiment.shares() if experiment is not None else {}
        total = sum(s.requests for s in samples.values())
        return {
            "object": "alignment.experiment_report",
            "name": name,
            "experiment": experiment.public() if experiment is not None else None,
            "since": since,
            "requests": total,
            "repeats_ignored": self.repeats,
            "sample_ratio": sample_ratio(samples, shares, experiment.unit) if experiment is not None else None,
            "arms": [arm_report(arm, samples[arm], shares.get(arm), total) for arm in arms],
            "comparisons": [comparison(arm, arms[0], samples, pairs) for arm in arms[1:]],
        }


class ExperimentReports:
    """Reports kept up to date, one tally per (experiment, since), the least recently read
    dropped beyond `max_tallies`. `report` reads only the rows written since the tally's last
    read from a `aligner.store.Store` (`experiment_traces` / `experiment_feedback` after a
    seq and an id), and starts a tally over when rows were deleted since it began (a user, a
    trace, retention; on any replica sharing the database): its cost is the new rows, not the
    experiment's size, save the statistics over the numbers kept in memory."""

    def __init__(self, max_tallies: int = 8) -> None:
        self.max_tallies = max_tallies
        self._tallies: OrderedDict[tuple[str, float | None], ExperimentTally] = OrderedDict()
        self._lock = threading.Lock()

    def report(self, store: Any, name: str, experiment: Experiment | None, since: float | None) -> dict[str, Any]:
        tally = self.tally(name, since, store.deletions())
        with tally.lock:
            tally.add_traces(store.experiment_traces(name, since, after_seq=tally.seq))
            tally.add_feedback(store.experiment_feedback(name, since, after_id=tally.feedback_id,
                                                         scanned=tally.scanned_feedback))
            return tally.report(name, experiment, since)

    def tally(self, name: str, since: float | None, deletions: int) -> ExperimentTally:
        key = (name, since)
        with self._lock:
            tally = self._tallies.get(key)
            # A caller that read the count before another started anew keeps the newer tally.
            if tally is None or tally.deletions < deletions:
                tally = self._tallies[key] = ExperimentTally(deletions)
            self._tallies.move_to_end(key)
            while len(self._tallies) > self.max_tallies:
                self._tallies.popitem(last=False)
            return tally
