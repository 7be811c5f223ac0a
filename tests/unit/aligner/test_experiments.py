"""A/B experiments: the `experiments:` section of the profiles file and its errors, assignment
(sticky per user, shares close to the weights), and the report, by hand and recounted from a
real SQLite store."""

from __future__ import annotations

import math
import random

import pytest

from aligner import stats
from aligner.alignment import check_profile_alignment
from aligner.experiments import Experiment, assign, experiment_report, hashed_arm
from aligner.profiles import ProfileError, ProfileStore
from aligner.store import Store

PROFILES = """\
profiles:
  tone:
    - version: 1
      alignment: {strategy: none}
    - version: 2
      alignment: {strategy: best_of_n, n: 2}
    - version: 3
      alignment: {strategy: best_of_n, n: 4}
"""


def load(tmp_path, experiments: str) -> ProfileStore:
    path = tmp_path / "p.yaml"
    path.write_text(PROFILES + experiments)
    return ProfileStore.load(path, check_profile_alignment)


def refused(tmp_path, experiments: str) -> str:
    with pytest.raises(ProfileError) as info:
        load(tmp_path, experiments)
    return str(info.value)


def test_experiments_load_with_their_arms(tmp_path):
    store = load(tmp_path, """\
experiments:
  tone-test:
    description: n=2 against none
    arms:
      - {profile: tone@1, weight: 1}
      - {profile: tone@2, weight: 3}
  triple:
    unit: random
    arms: [{profile: tone@1}, {profile: tone@2}, {profile: tone@3}]
""")
    tone = store.experiments["tone-test"]
    assert (tone.name, tone.unit, tone.arm_names) == ("tone-test", "user", ["tone@1", "tone@2"])
    assert tone.shares() == {"tone@1": 0.25, "tone@2": 0.75}
    assert store.experiments["triple"].unit == "random"
    assert [e["name"] for e in store.describe_experiments()] == ["tone-test", "triple"]
    assert store.describe_experiments()[0]["arms"][1] == {"profile": "tone@2", "weight": 3.0, "share": 0.75}


# Lines: the profiles take 1-8, `experiments:` is 9, the experiment's name 10, its first key 11.
@pytest.mark.parametrize("experiments, line, says", [
    ("experiments:\n  t:\n    arms:\n      - {profile: tone@1}\n      - {profile: tone}\n", 13, "pin a version"),
    ("experiments:\n  t:\n    arms:\n      - {profile: tone@1}\n      - {profile: tone@9}\n", 13, "has no version '9'"),
    ("experiments:\n  t:\n    arms:\n      - {profile: tone@1}\n      - {profile: nope@1}\n", 13, "unknown profile 'nope'"),
    ("experiments:\n  t:\n    arms:\n      - {profile: tone@1}\n      - {profile: tone@1}\n", 13, "already an arm"),
    ("experiments:\n  t:\n    arms:\n      - {profile: tone@1}\n      - {profile: tone@2, weight: 0}\n", 13,
     "arms.1.weight: Input should be greater than 0"),
    ("experiments:\n  t:\n    arms:\n      - {profile: tone@1, weight: .nan}\n      - {profile: tone@2}\n", 12,
     "arms.0.weight"),
    ("experiments:\n  t:\n    arms:\n      - {profile: tone@1}\n", 11, "arms: List should have at least 2 items"),
    ("experiments:\n  t:\n    unit: session\n    arms: [{profile: tone@1}, {profile: tone@2}]\n", 11,
     "unit: Input should be"),
    ("experiments:\n  t:\n    arms: [{profile: tone@1}, {profile: tone@2}]\n    colour: red\n", 11,
     "colour: Extra inputs"),
    ("experiments:\n  bad/name:\n    arms: [{profile: tone@1}, {profile: tone@2}]\n", 11, "name must be 1-128"),
    ("experiments:\n  t: [tone@1, tone@2]\n", 10, "experiment 't': needs a mapping with 'arms'"),
    ("experiments: [t]\n", 1, "'experiments' must map names"),
])
def test_a_bad_experiment_names_the_file_line_and_field(tmp_path, experiments, line, says):
    message = refused(tmp_path, experiments)
    assert message.startswith(f"{tmp_path / 'p.yaml'}:{line}: "), message
    assert says in message


def test_an_experiment_cannot_name_a_profile_of_a_later_file_section(tmp_path):
    # Arms are checked against the profiles of the same file, wherever the section sits.
    path = tmp_path / "p.yaml"
    path.write_text("experiments:\n  t:\n    arms: [{profile: tone@1}, {profile: tone@2}]\n" + PROFILES)
    assert ProfileStore.load(path, check_profile_alignment).experiments["t"].arm_names == ["tone@1", "tone@2"]


def experiment(*weights: float, unit: str = "user", name: str = "tone-test") -> Experiment:
    return Experiment(name=name, unit=unit, arms=[{"profile": f"tone@{i + 1}", "weight": w} for i, w in enumerate(weights)])


def test_assignment_is_sticky_per_user_and_independent_of_order():
    tone = experiment(1, 1)
    rng = random.Random(0)
    first = {f"user-{i}": assign(tone, f"user-{i}", rng).arm for i in range(50)}
    for user in reversed(list(first)):
        again = assign(tone, user, rng)
        assert (again.arm, again.unit, again.user) == (first[user], "user", user)
    assert assign(tone, "user-3", rng).public() == {"name": "tone-test", "arm": first["user-3"], "unit": "user",
                                                    "propensity": 0.5}
    # The probability a request had of its arm is the arm's share (its user's hash is uniform).
    uneven = experiment(1, 3)
    assert {a.arm: a.propensity for a in (assign(uneven, f"user-{i}", rng) for i in range(40))} == \
        {"tone@1": 0.25, "tone@2": 0.75}


@pytest.mark.parametrize("weights", [(1, 1), (1, 3), (2, 1, 1)])
def test_shares_follow_the_weights_within_a_binomial_bound(weights):
    tone = experiment(*weights)
    n = 2000
    counts = {arm: 0 for arm in tone.arm_names}
    for i in range(n):
        counts[hashed_arm(tone, f"u{i}")] += 1
    for arm, share in tone.shares().items():
        sigma = math.sqrt(share * (1 - share) / n)
        assert abs(counts[arm] / n - share) < 4.5 * sigma, (arm, counts)


def test_experiments_assign_independently():
    # Another experiment's arm says nothing about this one's (the name is in the hash).
    a, b = experiment(1, 1, name="a"), experiment(1, 1, name="b")
    same = sum(hashed_arm(a, f"u{i}")[-1] == hashed_arm(b, f"u{i}")[-1] for i in range(1000))
    assert abs(same / 1000 - 0.5) < 4.5 * math.sqrt(0.25 / 1000)


def test_requests_without_a_user_and_random_units_draw_by_the_weights():
    rng = random.Random(7)
    tone = experiment(1, 3)
    drawn = [assign(tone, None, rng) for _ in range(2000)]
    assert {d.unit for d in drawn} == {"random"} and {d.user for d in drawn} == {None}
    share = sum(d.arm == "tone@2" for d in drawn) / 2000
    assert abs(share - 0.75) < 4.5 * math.sqrt(0.75 * 0.25 / 2000)
    coin = experiment(1, 1, unit="random")
    arms = {assign(coin, "alice", rng).arm for _ in range(40)}
    assert arms == {"tone@1", "tone@2"}  # a random unit ignores the user


def trace_row(id: str, arm: str, user: str | None, score: float | None, tokens: int, seconds: float) -> dict:
    return {"id": id, "arm": arm, "user": user, "candidates": [{"score": -1.0}, {"score": score}], "selected": [1],
            "usage": {"completion_tokens": tokens}, "timings": {"total_s": seconds}}


def test_the_report_by_hand():
    traces = [
        trace_row("a1", "tone@1", "ann", 1.0, 10, 0.5),
        trace_row("a2", "tone@1", "ann", 3.0, 20, 1.5),
        trace_row("b1", "tone@2", "bob", 2.0, 30, 1.0),
        trace_row("b2", "tone@2", None, None, 40, 2.0),
        trace_row("b3", "tone@2", "cat", 5.0, 50, 3.0),
        trace_row("x1", "tone@9", "dan", 0.0, 1, 0.1),  # an arm since removed from the file
    ]
    feedback = [
        {"kind": "rating", "arm": "tone@1", "rating": 1, "rating_scale": "thumbs"},
        {"kind": "rating", "arm": "tone@1", "rating": -1, "rating_scale": "thumbs"},
        {"kind": "rating", "arm": "tone@2", "rating": 5, "rating_scale": "stars"},
        {"kind": "rating", "arm": "tone@2", "rating": 3, "rating_scale": "stars"},
        {"kind": "rating", "arm": "tone@2", "rating": 1, "rating_scale": "thumbs"},
        {"kind": "pairwise", "arm": "tone@2", "other_arm": "tone@1"},
        {"kind": "pairwise", "arm": "tone@2", "other_arm": "tone@1"},
        {"kind": "pairwise", "arm": "tone@1", "other_arm": "tone@2"},
        {"kind": "pairwise", "arm": "tone@2", "other_arm": "tone@2"},  # within one arm: not counted
        {"kind": "pairwise", "arm": "tone@9", "other_arm": "tone@2"},
    ]
    feedback = [{**row, "trace_id": f"answer-{i}", "user": "judge"} for i, row in enumerate(feedback)]  # no repeats
    report = experiment_report("tone-test", experiment(1, 1), traces, feedback, since=12.0)
    assert (report["name"], report["since"], report["requests"]) == ("tone-test", 12.0, 6)
    assert report["repeats_ignored"] == 0
    one, two, gone = report["arms"]
    assert [one["arm"], two["arm"], gone["arm"]] == ["tone@1", "tone@2", "tone@9"]
    assert (one["requests"], one["users"], one["configured_share"], one["share"]) == (2, 1, 0.5, 2 / 6)
    assert (two["requests"], two["users"], gone["configured_share"]) == (3, 2, None)
    # Ratings on [0, 1]: thumbs 1, 0; stars 5 -> 1, 3 -> 0.5; thumbs up -> 1.
    assert one["rating"]["mean"] == 0.5 and one["rating"]["n"] == 2
    assert one["rating"]["by_scale"] == {"thumbs": stats.mean_interval([1.0, 0.0])}  # the share of thumbs up
    assert two["rating"]["mean"] == pytest.approx(2.5 / 3)
    assert two["rating"]["by_scale"] == {"stars": stats.mean_interval([5.0, 3.0]), "thumbs": stats.mean_interval([1.0])}
    # Wins: tone@2 beat tone@1 twice and lost once to it and once to tone@9.
    assert two["win_rate"] == {"wins": 2, "n": 4, "rate": 0.5, "ci95": stats.wilson_interval(2, 4)}
    assert one["win_rate"]["wins"] == 1 and one["win_rate"]["n"] == 3
    assert two["reward"] == stats.mean_interval([2.0, 5.0])  # the unscored answer is left out
    assert one["completion_tokens"]["mean"] == 15.0
    assert two["latency_s"]["p50"] == {"value": 2.0, "ci95": stats.quantile_interval([1.0, 2.0, 3.0], 0.5)}
    assert two["latency_s"]["p95"]["value"] == pytest.approx(2.9)
    assert two["latency_s"]["mean"] == 2.0

    versus, versus_gone = report["comparisons"]
    assert (versus["arm"], versus["baseline"], versus_gone["arm"]) == ("tone@2", "tone@1", "tone@9")
    assert versus["rating"] == stats.welch([1.0, 0.0], [1.0, 0.5, 1.0])
    assert versus["completion_tokens"]["difference"] == 40.0 - 15.0
    assert versus["latency_s"]["p50_difference"] == 2.0 - 1.0
    assert versus["win_rate"] == {"wins": 2, "n": 3, "rate": 2 / 3, "ci95": stats.wilson_interval(2, 3),
                                  "p_value": stats.binomial_test(2, 3)}
    assert versus_gone["win_rate"]["n"] == 0 and versus_gone["win_rate"]["p_value"] is None


def test_one_user_counts_once_per_answer_and_kind_the_latest_judgement():
    traces = [trace_row("a1", "tone@1", "ann", 1.0, 10, 0.5), trace_row("b1", "tone@2", "bob", 1.0, 10, 0.5)]
    stuffed = [{"kind": "rating", "trace_id": "b1", "arm": "tone@2", "rating": 1, "rating_scale": "thumbs",
                "user": "bob"}] * 1000
    feedback = [*stuffed,
                {"kind": "rating", "trace_id": "b1", "arm": "tone@2", "rating": -1, "rating_scale": "thumbs",
                 "user": "bob"},  # then down: counts once, as down
                {"kind": "rating", "trace_id": "b1", "arm": "tone@2", "rating": 1, "rating_scale": "thumbs",
                 "user": "cat"},  # another user's own judgement counts
                {"kind": "pairwise", "trace_id": "a1", "other_trace_id": "b1", "arm": "tone@1", "other_arm": "tone@2",
                 "user": "cat"},
                {"kind": "pairwise", "trace_id": "b1", "other_trace_id": "a1", "arm": "tone@2", "other_arm": "tone@1",
                 "user": "cat"}]  # the same pair, judged again the other way: counts once, as b1
    report = experiment_report("tone-test", experiment(1, 1), traces, feedback)
    assert report["repeats_ignored"] == 1000 + 1
    one, two = report["arms"]
    assert two["rating"]["n"] == 2 and two["rating"]["mean"] == 0.5
    assert (two["win_rate"]["wins"], two["win_rate"]["n"], one["win_rate"]["n"]) == (1, 1, 1)


def test_the_sample_ratio_check_flags_a_split_the_weights_do_not_explain():
    def rows(arm: str, users: int, start: int = 0):
        return [trace_row(f"{arm}-{i}", arm, f"user-{start + i}", 1.0, 10, 0.5) for i in range(users)]

    even = experiment_report("tone-test", experiment(1, 1), rows("tone@1", 480) + rows("tone@2", 520, 1000), [])
    assert even["sample_ratio"]["units"] == {"tone@1": 480, "tone@2": 520}
    assert even["sample_ratio"]["p_value"] == pytest.approx(0.2059, abs=1e-4) and not even["sample_ratio"]["mismatch"]
    skewed = experiment_report("tone-test", experiment(1, 3), rows("tone@1", 400) + rows("tone@2", 600, 1000), [])
    assert skewed["sample_ratio"]["mismatch"] and skewed["sample_ratio"]["p_value"] < 1e-6  # 1:3 expected
    # Units, not requests: one user's hundred requests are one draw of the arm.
    heavy = rows("tone@1", 50) + [trace_row(f"h{i}", "tone@2", "heavy", 1.0, 10, 0.5) for i in range(100)]
    heavy += rows("tone@2", 49, 1000)
    assert experiment_report("tone-test", experiment(1, 1), heavy, [])["sample_ratio"]["units"] == {
        "tone@1": 50, "tone@2": 50}
    assert experiment_report("tone-test", experiment(1, 1), [], [])["sample_ratio"] is None


def test_an_experiment_without_data_reports_empty_arms():
    report = experiment_report("tone-test", experiment(1, 1), [], [])
    assert report["requests"] == 0 and [a["requests"] for a in report["arms"]] == [0, 0]
    assert report["arms"][0]["rating"] == {"n": 0, "mean": None, "ci95": None, "by_scale": {}}
    assert report["arms"][0]["latency_s"]["p50"] == {"value": None, "ci95": None}
    assert report["comparisons"][0]["rating"]["difference"] is None


def test_the_report_from_a_real_store_equals_a_recount(tmp_path):
    store = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    tone = experiment(1, 1)
    rng = random.Random(3)
    conversations = [[{"role": "user", "content": f"question {q}"}] for q in range(4)]
    try:
        for i in range(60):
            user = f"user-{i % 40}"
            arm = assign(tone, user, rng).arm
            store.put_trace({
                "id": f"r{i:03d}", "user": user, "conversation": conversations[i % 4], "experiment": "tone-test",
                "arm": arm, "candidates": [{"text": "x", "score": rng.gauss(1 if arm == "tone@2" else 0, 1)}],
                "selected": [0], "usage": {"completion_tokens": rng.randint(1, 8)},
                "timings": {"total_s": rng.expovariate(4)}})
        store.put_trace({"id": "outside", "conversation": conversations[0]})
        traces = {t["id"]: t for t in store.experiment_traces("tone-test")}
        by_conversation: dict[int, list[str]] = {}
        for i in range(60):
            by_conversation.setdefault(i % 4, []).append(f"r{i:03d}")
            if i % 3 == 0:
                store.add_feedback(f"r{i:03d}", rating=rng.choice([-1, 1]), rating_scale="thumbs")
            elif i % 3 == 1:
                store.add_feedback(f"r{i:03d}", rating=rng.randint(1, 5), rating_scale="stars")
        for ids in by_conversation.values():
            for winner, loser in zip(ids[::2], ids[1::2], strict=False):
                store.add_feedback(winner, other_trace_id=loser)
        store.add_feedback("r000", other_trace_id="outside")  # not between two of its responses

        report = experiment_report("tone-test", tone, store.experiment_traces("tone-test"),
                                   store.experiment_feedback("tone-test"))

        # The recount: plain SQL over the same file, nothing of the report's code.
        with store.engine.connect() as conn:
            arms = dict(conn.exec_driver_sql("SELECT id, arm FROM traces WHERE experiment = 'tone-test'").all())
            ratings = conn.exec_driver_sql(
                "SELECT trace_id, rating, rating_scale FROM feedback WHERE kind = 'rating'").all()
            pairs = conn.exec_driver_sql(
                "SELECT trace_id, other_trace_id FROM feedback WHERE kind = 'pairwise'").all()
    finally:
        store.close()
    for row in report["arms"]:
        arm = row["arm"]
        mine = [t for t in traces.values() if t["arm"] == arm]
        assert row["requests"] == sum(a == arm for a in arms.values()) == len(mine)
        assert row["users"] == len({t["user"] for t in mine})
        values = [(r + 1) / 2 if scale == "thumbs" else (r - 1) / 4
                  for trace_id, r, scale in ratings if arms.get(trace_id) == arm]
        assert row["rating"]["n"] == len(values)
        assert row["rating"]["mean"] == pytest.approx(sum(values) / len(values))
        contests = [(w, l) for w, l in pairs if w in arms and l in arms and arms[w] != arms[l]]
        wins = sum(arms[w] == arm for w, _ in contests)
        assert row["win_rate"]["wins"] == wins
        assert row["win_rate"]["n"] == sum(arm in (arms[w], arms[l]) for w, l in contests)
        assert row["reward"]["mean"] == pytest.approx(sum(t["candidates"][0]["score"] for t in mine) / len(mine))
        assert row["completion_tokens"]["mean"] == pytest.approx(
            sum(t["usage"]["completion_tokens"] for t in mine) / len(mine))
        latencies = sorted(t["timings"]["total_s"] for t in mine)
        assert row["latency_s"]["p50"]["value"] == pytest.approx(stats.quantile(latencies, 0.5))
    assert sum(r["requests"] for r in report["arms"]) == 60


def test_a_report_kept_up_to_date_skips_feedback_it_has_read(tmp_path):
    """Feedback on other experiments' answers is read once: the tally remembers the last id it
    scanned, its experiment's or not, and its latencies stay sorted as traces come in any order."""
    from aligner.experiments import ExperimentReports

    store = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    tone, reports = experiment(1, 1), ExperimentReports()
    try:
        for i, latency in enumerate([0.5, 0.1, 0.9, 0.3]):
            store.put_trace({"id": f"t{i}", "conversation": [{"role": "user", "content": "q"}],
                             "experiment": "tone-test", "arm": "tone@1", "timings": {"total_s": latency}})
        store.put_trace({"id": "other", "conversation": [{"role": "user", "content": "q"}]})
        last = [store.add_feedback("other", rating=1, rating_scale="thumbs")["id"] for _ in range(7)][-1]
        assert reports.report(store, "tone-test", tone, None)["arms"][0]["rating"]["n"] == 0
        tally = reports.tally("tone-test", None, store.deletions())
        assert tally.feedback_id == last  # nothing of its own, all of it read
        assert tally.samples["tone@1"].latencies == [0.1, 0.3, 0.5, 0.9]
        reads = []
        original = store.experiment_feedback
        store.experiment_feedback = lambda *a, **k: reads.append(k["after_id"]) or original(*a, **k)
        reports.report(store, "tone-test", tone, None)
        assert reads == [last]
    finally:
        store.close()
