"""The pure parts of `bench.router_loop`: the held-out prompts share no topic and no unseen
template with the feedback prompts, the user's rule prefers a different arm per prompt type,
and the summary's paired difference is against the best fixed arm."""

from __future__ import annotations

from bench.router_loop import DETAILED, QUICK, TOPICS, TypeUser, prompts, summarise


def topic_of(text: str) -> str:
    return next(t for t in sorted(TOPICS, key=len, reverse=True) if t in text)


def test_held_out_prompts_are_new_topics_and_include_unseen_templates():
    rounds, held = prompts()
    assert [len(r) for r in rounds] == [48, 48, 48] and len(held) == 48
    feedback = [p for r in rounds for p in r]
    assert len({p.text for p in feedback}) == 144 and not {p.seed for p in feedback} & {p.seed for p in held}
    assert not {topic_of(p.text) for p in feedback} & {topic_of(p.text) for p in held}
    assert all(p.template < 3 for p in feedback) and any(p.template == 3 for p in held)
    assert {p.kind for p in held} == {"quick", "detailed"}
    assert all((p.kind == "quick") == any(p.text == t.format(topic=topic_of(p.text)) for t in QUICK) for p in held)
    assert len(DETAILED) == len(QUICK)


def test_each_prompt_type_prefers_the_other_arm():
    user, short, long = TypeUser(), "Paris is the capital.", " ".join(["word"] * 90)
    assert user.rating("quick", short) > user.rating("quick", long)
    assert user.rating("detailed", long) > user.rating("detailed", short)


def test_the_summary_compares_the_router_with_the_best_fixed_arm():
    rows = []
    for seed in range(10):
        kind = "quick" if seed % 2 else "detailed"
        for stage, arm, rating in (("held-out fixed brief@1", "brief@1", 5.0 if kind == "quick" else 1.0),
                                   ("held-out fixed full@1", "full@1", 2.0 if kind == "quick" else 5.0),
                                   ("held-out router x", "brief@1" if kind == "quick" else "full@1", 5.0)):
            rows.append({"stage": stage, "arm": arm, "rating": rating, "kind": kind, "seed": seed, "template": 0})
    summary = summarise(rows)
    assert summary["held-out fixed full@1"]["all"][0] == 3.5 and summary["held-out fixed brief@1"]["all"][0] == 3.0
    diff = summary["held-out router x"]["minus_best_fixed"]
    assert diff["best_fixed"] == "held-out fixed full@1" and diff["diff"][0] == 1.5
    oracle = summary["oracle (the better arm per type)"]
    assert oracle["all"][0] == 5.0 and oracle["arms"] == {"quick": "held-out fixed brief@1",
                                                          "detailed": "held-out fixed full@1"}
    assert summary["held-out router x"]["arm_shares"] == {"quick": {"brief@1": 5, "full@1": 0},
                                                          "detailed": {"brief@1": 0, "full@1": 5}}
