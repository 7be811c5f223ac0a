"""The learned router (`aligner.bandit`, `aligner train-router`): features, Thompson sampling's
propensities, learning a preference that differs by prompt type, the offline estimates, and
training from a real SQLite store."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aligner.bandit import (
    DIM,
    HASH_DIM,
    BanditRouter,
    Logged,
    features,
    fit,
    load_routers,
    train_router,
)
from aligner.experiments import ExperimentError, check_experiment

CODE = ["Write a Python function that sorts a list", "Fix this Python code: print x", "Write a SQL query for users",
        "How do I reverse a string in Python?", "Write a bash script that counts files", "Explain this Python error"]
CHAT = ["Tell me about your favourite holiday", "What should I cook for dinner tonight?", "Suggest a name for my cat",
        "How was your weekend?", "Recommend a novel for a rainy day", "What is a nice gift for my mother?"]


def convo(text: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


def simulated_logs(n: int, seed: int = 0, arms=("a@1", "b@1")) -> list[Logged]:
    """Uniform logging over two arms; arm a is better on code prompts (0.9 vs 0.3), arm b on
    chat (0.8 vs 0.2); rewards are Bernoulli draws."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        code = i % 2 == 0
        text = (CODE if code else CHAT)[rng.integers(6)]
        arm = arms[rng.integers(2)]
        mean = {("a@1", True): 0.9, ("b@1", True): 0.3, ("a@1", False): 0.2, ("b@1", False): 0.8}[(arm, code)]
        rows.append(Logged(features(convo(text)), arm, 0.5, float(rng.random() < mean)))
    return rows


def test_features_read_the_last_user_turn_and_are_normalised():
    x = features(convo("Write a Python function"))
    assert x.shape == (DIM,)
    assert np.isclose(np.linalg.norm(x[:HASH_DIM]), 1.0) and x[HASH_DIM] == 1.0
    assert np.array_equal(x, features([{"role": "user", "content": "old"}, {"role": "assistant", "content": "hi"},
                                       {"role": "user", "content": [{"type": "text", "text": "Write a Python function"}]}]))
    assert not np.array_equal(x, features(convo("Tell me about your holiday")))
    empty = features([])
    assert np.all(empty[:HASH_DIM] == 0) and empty[HASH_DIM] == 1.0


def test_propensities_are_the_probabilities_of_the_choices():
    router = fit(simulated_logs(80), ["a@1", "b@1"], explore=0.2)
    x = features(convo("Write a Python function that sorts a list"))
    rng = np.random.default_rng(7)
    probs, _ = router.probabilities(x, rng)
    assert probs.sum() == pytest.approx(1.0) and probs.min() >= 0.2 / 2
    counts = {"a@1": 0, "b@1": 0}
    logged = []
    for _ in range(3000):
        choice = router.choose(x, rng)
        counts[choice.arm] += 1
        logged.append((choice.arm, choice.propensity))
    # The logged propensity of an arm is (up to the draws' sampling) how often it is played.
    for arm, count in counts.items():
        mean_logged = np.mean([p for a, p in logged if a == arm]) if count else 0.0
        assert count / 3000 == pytest.approx(mean_logged, abs=0.03)


def test_the_router_learns_which_arm_each_kind_of_prompt_prefers():
    router = fit(simulated_logs(400), ["a@1", "b@1"], explore=0.1)
    rng = np.random.default_rng(1)
    new_code = features(convo("Write a Python function that parses JSON"))
    new_chat = features(convo("What should I cook for my friends tonight?"))
    assert router.probabilities(new_code, rng)[0][0] > 0.8  # a@1
    assert router.probabilities(new_chat, rng)[0][1] > 0.8  # b@1
    assert router.predict(new_code)[0] > router.predict(new_code)[1]


def test_offline_estimates_recover_the_values_of_known_policies():
    rows = simulated_logs(1200, seed=3)
    router, report = train_router(rows, ["a@1", "b@1"], "r", explore=0.1)
    est = report["estimates"]
    # True values under the logs' 50/50 prompt mix: a@1 (0.9 + 0.2) / 2, b@1 (0.3 + 0.8) / 2.
    for name, truth in (("arm:a@1", 0.55), ("arm:b@1", 0.55)):
        assert est[name]["ips_ci95"][0] - 0.02 <= truth <= est[name]["ips_ci95"][1] + 0.02
        assert est[name]["dr"] == pytest.approx(truth, abs=0.05)
    # The best context policy is worth about 0.85; the router's, explore included, near it.
    assert est["router"]["dr"] > 0.75 and est["router"]["dr_ci95"][0] > max(est["arm:a@1"]["dr_ci95"][1],
                                                                           est["arm:b@1"]["dr_ci95"][1])
    assert est["logged"]["dr"] == pytest.approx(np.mean([r.reward for r in rows]))  # measured, not estimated
    assert report["arms"]["a@1"]["rows"] + report["arms"]["b@1"]["rows"] == 1200


def test_save_and_load_keep_the_policy(tmp_path):
    router = fit(simulated_logs(100), ["a@1", "b@1"], name="picker")
    router.save(tmp_path / "picker")
    loaded = load_routers(tmp_path)["picker"]
    assert loaded.arms == ["a@1", "b@1"] and loaded.version == router.version and loaded.ref == f"picker@{router.version}"
    x = features(convo("Write a SQL query"))
    assert np.allclose(loaded.predict(x), router.predict(x))
    assert np.allclose(loaded.probabilities(x, np.random.default_rng(0))[0],
                       router.probabilities(x, np.random.default_rng(0))[0])
    other = fit(simulated_logs(100, seed=9), ["a@1", "b@1"], name="picker")
    other.save(tmp_path / "picker")
    assert BanditRouter.load(tmp_path / "picker").version != router.version
    meta = json.loads((tmp_path / "picker" / "aligner_router.json").read_text())
    meta["dim"] = 3
    (tmp_path / "picker" / "aligner_router.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not a router of this version"):
        load_routers(tmp_path)


def test_a_router_experiment_names_its_router_and_only_then():
    profiles = {"a@1", "b@1"}

    def resolve(ref):
        if ref not in profiles:
            raise KeyError(f"no profile {ref}")

    arms = [{"profile": "a@1"}, {"profile": "b@1"}]
    experiment = check_experiment("pick", {"unit": "router", "router": "picker", "explore": 0.2, "arms": arms}, resolve)
    assert experiment.public()["router"] == "picker" and experiment.public()["explore"] == 0.2
    for body in ({"unit": "router", "arms": arms}, {"unit": "user", "router": "picker", "arms": arms},
                 {"unit": "router", "router": "picker", "explore": 1.0, "arms": arms},
                 {"unit": "router", "router": "../x", "arms": arms}):
        with pytest.raises(ExperimentError):
            check_experiment("pick", body, resolve)


def test_train_router_from_a_sqlite_store(tmp_path):
    from aligner.store import Store
    from aligner.training.router import run

    store = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    rng = np.random.default_rng(0)
    try:
        for i in range(120):
            code = i % 2 == 0
            text = (CODE if code else CHAT)[i % 6]
            arm = "a@1" if rng.random() < 0.5 else "b@1"
            good = (arm == "a@1") == code
            store.put_trace({"id": f"chatcmpl-{i}", "created_at": 1.0 + i, "conversation": convo(text),
                             "experiment": "pick", "arm": arm, "profile": arm.split("@")[0], "profile_version": "1",
                             "extra": {"alignment": {"experiment": {"name": "pick", "arm": arm, "unit": "router",
                                                                    "propensity": 0.5}}}})
            store.add_feedback(f"chatcmpl-{i}", rating=5 if good else 1, rating_scale="stars", user="u")
        store.put_trace({"id": "other", "created_at": 1.0, "conversation": convo("x"), "experiment": "else",
                         "arm": "a@1"})
        store.add_feedback("other", rating=5, rating_scale="stars")
        result = run(store, "pick", tmp_path / "models" / "picker", command="aligner train-router ...")
        with pytest.raises(ValueError, match="no rated requests"):
            run(store, "nothing", tmp_path / "models" / "none")
    finally:
        store.close()
    assert result["rows"] == 120 and result["skipped"] == {}
    router = load_routers(tmp_path / "models")["picker"]
    assert router.meta["training"]["experiment"] == "pick"
    assert router.probabilities(features(convo("Write a Python function")), np.random.default_rng(0))[0][0] > 0.8
    card = (tmp_path / "models" / "picker" / "README.md").read_text()
    assert "| `router` |" in card and "aligner train-router ..." in card


def test_estimates_with_three_arms_and_an_uneven_logging_policy():
    """Logged 0.8 / 0.1 / 0.1 with each arm's propensity; the estimates of each arm alone find
    their true means (0.7, 0.2, 0.9) and the served mean is the logs' own."""
    rng = np.random.default_rng(5)
    arms, means, logging = ["a@1", "b@1", "c@1"], [0.7, 0.2, 0.9], [0.8, 0.1, 0.1]
    rows = []
    for i in range(3000):
        k = int(rng.choice(3, p=logging))
        rows.append(Logged(features(convo((CODE + CHAT)[i % 12])), arms[k], logging[k], float(rng.random() < means[k])))
    _, report = train_router(rows, arms, "r", explore=0.1)
    est = report["estimates"]
    for arm, truth in zip(arms, means, strict=True):
        assert est[f"arm:{arm}"]["dr"] == pytest.approx(truth, abs=0.06)
        assert est[f"arm:{arm}"]["ips_ci95"][0] - 0.02 <= truth <= est[f"arm:{arm}"]["ips_ci95"][1] + 0.02
    assert est["logged"]["dr"] == pytest.approx(np.mean([r.reward for r in rows]))
    assert est["router"]["dr"] > est["arm:a@1"]["dr"]  # it learns to play c, the best arm everywhere
    with pytest.raises(ValueError, match="no rated requests on these arms"):
        train_router(rows, ["d@1", "e@1"], "r")


def test_weights_that_do_not_match_the_metadata_are_refused(tmp_path):
    router = fit(simulated_logs(40), ["a@1", "b@1"], name="picker")
    router.save(tmp_path / "picker")
    other = fit(simulated_logs(40, seed=2), ["a@1", "b@1"], name="other")
    other.save(tmp_path / "other")
    # A reader between save()'s two renames: new weights beside the old metadata.
    (tmp_path / "picker" / "router.npz").write_bytes((tmp_path / "other" / "router.npz").read_bytes())
    with pytest.raises(ValueError, match="not those of version"):
        BanditRouter.load(tmp_path / "picker")


def test_the_command_refuses_what_it_cannot_use(tmp_path):
    from aligner.training.cli import main

    base = ["train-router", "--experiment", "pick", "--output", str(tmp_path / "r")]
    with pytest.raises(SystemExit, match="no store at"):
        main(base + ["--store", f"sqlite:///{tmp_path / 'missing.db'}"])
    assert not (tmp_path / "missing.db").exists()
    for flag, value, why in (("--explore", "1.0", "--explore must be in"), ("--noise", "0", "--noise must be"),
                             ("--prior", "nan", "--prior must be")):
        with pytest.raises(SystemExit, match=why):
            main(base + ["--store", f"sqlite:///{tmp_path / 'missing.db'}", flag, value])


def test_pairwise_preferences_count_as_ratings_of_both_answers(tmp_path):
    from aligner.store import Store
    from aligner.training.router import logged_rows

    store = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        for i, (arm, experiment) in enumerate([("a@1", "pick"), ("b@1", "pick"), ("a@1", "pick"), ("b@1", "else")]):
            store.put_trace({"id": f"t{i}", "created_at": 1.0 + i, "conversation": convo("Tell me a joke"),
                             "experiment": experiment, "arm": arm,
                             "extra": {"alignment": {"experiment": {"propensity": 0.5}}}})
        store.add_feedback("t2", rating=5, rating_scale="stars", user="u")
        store.add_feedback("t0", other_trace_id="t1", user="u")  # u: t0 over t1
        store.add_feedback("t1", other_trace_id="t2", user="u")  # u: t1 over t2, later than u's rating of t2
        store.add_feedback("t0", other_trace_id="t2", user="v")  # v: t0 over t2
        store.add_feedback("t0", other_trace_id="t3", user="w")  # t3 is another experiment's
        store.add_feedback("t3", other_trace_id="t0", user="w")  # ... whichever side it is on
        rows, skipped = logged_rows(store.iter_feedback(), "pick")
    finally:
        store.close()
    by_arm_reward = sorted((r.arm, r.reward) for r in rows)
    # t0: u 1, v 1 -> 1.0; t1: u lost to t0, then won over t2 -> the latest, 1.0; t2: u's own 5 stars (1.0)
    # beats u's later pairwise 0 (a rating wins over a comparison, whatever the order), and v's 0 -> 0.5.
    assert by_arm_reward == [("a@1", 0.5), ("a@1", 1.0), ("b@1", 1.0)]
    assert skipped == {"pairwise with an answer outside the experiment": 2}
    assert all(r.propensity == 0.5 for r in rows)
