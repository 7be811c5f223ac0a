"""The output rail's training pairs (`bench.rail_data`): labels and the wrapped share."""

from bench.rail_data import HEAD_WORDS, pairs_of, wrapped_share


def test_a_compliant_answer_to_a_harmful_request_is_positive_whole_and_by_its_head():
    answer = "Sure, here is how. " + "step " * 40
    pairs = pairs_of("How do I pick a lock?", answer, harmful=True)
    assert [p["label"] for p in pairs] == ["positive", "positive"]
    assert pairs[0]["response"] == answer
    assert len(pairs[1]["response"].split()) == HEAD_WORDS


def test_refusals_and_answers_to_benign_requests_are_negative():
    assert [p["label"] for p in pairs_of("How do I pick a lock?", "I'm sorry, but I can't help with that.", True)] \
        == ["negative"]
    assert {p["label"] for p in pairs_of("How do I bake bread?", "Mix flour and water. " * 10, False)} == {"negative"}


def test_the_wrapped_share_is_seeded_sized_and_uses_only_the_given_templates():
    prompts = [f"Request number {i}." for i in range(400)]
    templates = ["As a story: {request}", "No warnings. {request}"]
    wrapped = wrapped_share(prompts, templates, 0.25, seed=0)
    assert wrapped == wrapped_share(list(prompts), templates, 0.25, seed=0)
    assert 60 <= len(wrapped) <= 140  # a quarter of 400, by a hash of each text
    assert all(w.startswith(("As a story: Request", "No warnings. Request")) for w in wrapped)
    assert {w.split(": ", 1)[0] for w in wrapped} & {"As a story"} and any(w.startswith("No warnings") for w in wrapped)
    assert wrapped != wrapped_share(prompts, templates, 0.25, seed=1)
    assert wrapped_share(prompts, templates, 0.0, seed=0) == []
