"""The store's behaviour on SQLite and on PostgreSQL alike: traces, every kind of feedback and
what is refused, idempotent retries, sticky arms under races, deletion, retention, export."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from aligner.store import Store, StoreConflictError, StoreValidationError, conversation_hash
from aligner.store.feedback import MAX_COMMENT_CHARS
from aligner.store.schema import experiment_assignments, feedback

NOW = 1_750_000_000.0
DAY = 86400.0
HELLO = [{"role": "user", "content": "Say hello."}]
OTHER = [{"role": "user", "content": "Say goodbye."}]


class Clock:
    def __init__(self, t: float = NOW):
        self.t = t

    def __call__(self) -> float:
        return self.t


def trace(id: str, conversation=HELLO, n: int = 3, **fields) -> dict:
    return {"id": id, "conversation": conversation,
            "candidates": [{"text": f"answer {i}", "scores": {"helpful": i / 10, "short": -i}} for i in range(n)],
            "selected": [n - 1], **fields}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(store_url, clock):
    opened = Store.open(store_url, clock=clock)
    yield opened
    opened.close()


@pytest.fixture
def answered(store):
    """Two answers to one conversation and one to another; a user's and an anonymous one."""
    store.put_trace(trace("a", user="alice"))
    store.put_trace(trace("b", user="bob"))
    store.put_trace(trace("c", conversation=OTHER, user="alice"))
    return store


def count(store: Store, table: sa.Table) -> int:
    with store.engine.connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).select_from(table))


def test_a_trace_round_trips(store):
    full = trace("chatcmpl-1", user="alice", strategy="best_of_n", profile="helpful", profile_version="3",
                 model="SmolLM2-135M-Instruct", usage={"prompt_tokens": 5, "completion_tokens": 12},
                 timings={"total_s": 0.25, "reward_s": 0.05}, extra={"endpoint": "chat.completions"},
                 experiment="tone-test", arm="helpful@3", tenant="team-a",
                 created_at=datetime.fromtimestamp(NOW - 10, timezone.utc))
    full["candidates"][0]["scores"]["helpful"] = float("nan")  # a reward that failed
    store.put_trace(full)
    got = store.get_trace("chatcmpl-1")
    assert got["created_at"] == pytest.approx(NOW - 10)
    assert got["conversation_hash"] == conversation_hash(HELLO)
    assert got["candidates"][0]["scores"] == {"helpful": None, "short": 0}
    del full["created_at"], got["created_at"], got["conversation_hash"]
    full["candidates"][0]["scores"]["helpful"] = None
    assert got == full
    assert store.get_trace("chatcmpl-unknown") is None


def test_unset_trace_fields_are_null_and_created_at_defaults_to_now(store, clock):
    store.put_trace({"id": "x", "conversation": HELLO})
    got = store.get_trace("x")
    assert got["created_at"] == NOW
    assert {k for k, v in got.items() if v is None} == {
        "user", "strategy", "profile", "profile_version", "model", "candidates", "selected", "usage",
        "timings", "extra", "experiment", "arm", "tenant"}


def test_the_hash_ignores_key_order_only():
    assert conversation_hash([{"role": "user", "content": "hi"}]) == conversation_hash([{"content": "hi", "role": "user"}])
    assert conversation_hash(HELLO) != conversation_hash(OTHER)


def test_writing_a_trace_again_replaces_it_and_keeps_its_feedback(answered):
    answered.add_feedback("a", rating=1, rating_scale="thumbs")
    answered.put_trace(trace("a", user="alice", strategy="retried"))
    assert answered.get_trace("a")["strategy"] == "retried"
    assert len(answered.feedback_for("a")) == 1


@pytest.mark.parametrize("bad, says", [
    ({"conversation": HELLO}, "id must be a non-empty string"),
    ({"id": "", "conversation": HELLO}, "id must be a non-empty string"),
    ({"id": "x"}, "needs its conversation"),
    ({"id": "x", "conversation": HELLO, "scores": []}, "unknown trace field"),
    ({"id": "x", "conversation": HELLO, "experiment": "tone"}, "both its experiment and its arm"),
    ({"id": "x", "conversation": HELLO, "experiment": "tone", "arm": ""}, "arm must be a non-empty string"),
])
def test_malformed_traces_are_refused(store, bad, says):
    with pytest.raises(ValueError, match=says):
        store.put_trace(bad)


def test_every_kind_of_feedback_is_stored(answered, clock):
    thumbs = answered.add_feedback("a", rating=-1, rating_scale="thumbs", user="alice")
    clock.t += 1
    stars = answered.add_feedback("a", rating=5, rating_scale="stars", comment="great")
    preference = answered.add_feedback("a", preferred_index=2, user="alice")
    pairwise = answered.add_feedback("b", other_trace_id="a", user="bob")
    comment = answered.add_feedback("a", comment="too long")
    assert (thumbs["kind"], thumbs["rating"], thumbs["rating_scale"], thumbs["user"]) == ("rating", -1, "thumbs", "alice")
    assert thumbs["created_at"] == NOW and stars["created_at"] == NOW + 1
    assert (stars["kind"], stars["rating"], stars["comment"]) == ("rating", 5, "great")
    assert (preference["kind"], preference["preferred_index"]) == ("preference", 2)
    assert (pairwise["kind"], pairwise["trace_id"], pairwise["other_trace_id"]) == ("pairwise", "b", "a")
    assert (comment["kind"], comment["comment"], comment["rating"]) == ("comment", "too long", None)
    # Oldest first; the pairwise row on "b" names "a" too.
    assert answered.feedback_for("a") == [thumbs, stars, preference, pairwise, comment]
    assert answered.feedback_for("b") == [pairwise]
    assert answered.feedback_for("c") == []


@pytest.mark.parametrize("trace_id, fields, param, code", [
    ("nope", {"rating": 1, "rating_scale": "thumbs"}, "trace_id", "unknown_id"),
    ("a", {"preferred_index": 3}, "preferred_index", "invalid_value"),  # three candidates: 0..2
    ("a", {"preferred_index": -1}, "preferred_index", "invalid_value"),
    ("a", {"preferred_index": True}, "preferred_index", "invalid_value"),
    ("a", {"preferred_index": "1"}, "preferred_index", "invalid_value"),
    ("a", {"rating": 6, "rating_scale": "stars"}, "rating", "invalid_value"),
    ("a", {"rating": 3.5, "rating_scale": "stars"}, "rating", "invalid_value"),
    ("a", {"rating": 0, "rating_scale": "thumbs"}, "rating", "invalid_value"),
    ("a", {"rating": 4}, "rating_scale", "invalid_value"),
    ("a", {"rating": 4, "rating_scale": "percent"}, "rating_scale", "invalid_value"),
    ("a", {"comment": "hm", "rating_scale": "stars"}, "rating_scale", "invalid_value"),
    ("a", {"other_trace_id": "nope"}, "other_trace_id", "unknown_id"),
    ("a", {"other_trace_id": "c"}, "other_trace_id", "invalid_value"),  # another conversation
    ("a", {"other_trace_id": "a"}, "other_trace_id", "invalid_value"),
    ("a", {}, "rating", "invalid_value"),  # says nothing
    ("a", {"rating": 1, "rating_scale": "thumbs", "preferred_index": 0}, "preferred_index", "invalid_value"),
    ("a", {"comment": " "}, "comment", "invalid_value"),
    ("a", {"comment": "x" * (MAX_COMMENT_CHARS + 1)}, "comment", "invalid_value"),
    ("a", {"comment": "ok", "user": "u" * 256}, "user", "invalid_value"),
    ("a", {"comment": "ok", "client_key": ""}, "client_key", "invalid_value"),
])
def test_feedback_the_store_refuses_names_its_field(answered, trace_id, fields, param, code):
    with pytest.raises(StoreValidationError) as refused:
        answered.add_feedback(trace_id, **fields)
    assert (refused.value.param, refused.value.code) == (param, code)
    assert count(answered, feedback) == 0


def test_an_index_needs_candidates(store):
    store.put_trace({"id": "plain", "conversation": HELLO})  # strategy "none": no candidates stored
    with pytest.raises(StoreValidationError, match="has 0 candidate"):
        store.add_feedback("plain", preferred_index=0)


def test_a_client_key_makes_feedback_idempotent(answered):
    first = answered.add_feedback("a", preferred_index=1, user="alice", client_key="k-1")
    assert answered.add_feedback("a", preferred_index=1, user="alice", client_key="k-1") == first
    assert count(answered, feedback) == 1
    with pytest.raises(StoreConflictError) as conflict:
        answered.add_feedback("a", preferred_index=2, user="alice", client_key="k-1")
    assert conflict.value.param == "client_key"
    assert "already used for different feedback" in str(conflict.value)
    assert answered.add_feedback("a", preferred_index=2, user="alice", client_key="k-2")["id"] != first["id"]


def test_a_retry_racing_its_original_stores_one_row(answered, store_url):
    other = Store.open(store_url)  # another replica
    barrier = threading.Barrier(6)
    rows, errors = [], []

    def send(store):
        try:
            barrier.wait()
            rows.append(store.add_feedback("a", rating=4, rating_scale="stars", client_key="race"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(s,)) for s in [answered, other] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    other.close()
    assert errors == []
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 1
    assert count(answered, feedback) == 1


def test_arms_are_sticky_and_the_first_assignment_wins_a_race(store, store_url):
    other = Store.open(store_url)
    barrier = threading.Barrier(8)
    arms, errors = [], []

    def assign(store, arm):
        try:
            barrier.wait()
            arms.append(store.assign_arm("exp-1", "alice", lambda: arm))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=assign, args=([store, other][i % 2], f"arm-{i}")) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    other.close()
    assert errors == [] and len(arms) == 8
    assert len(set(arms)) == 1
    assert store.assign_arm("exp-1", "alice", lambda: "never") == arms[0]
    assert store.assign_arm("exp-2", "alice", lambda: "b") == "b"  # per experiment
    assert count(store, experiment_assignments) == 2


def test_choose_is_not_called_for_an_assigned_unit(store):
    calls = []
    store.assign_arm("e", "u", lambda: calls.append(1) or "a")
    store.assign_arm("e", "u", lambda: calls.append(1) or "b")
    assert calls == [1]


def test_deleting_a_trace_takes_its_feedback(answered):
    answered.add_feedback("a", rating=1, rating_scale="thumbs")
    answered.add_feedback("b", other_trace_id="a")  # names "a" from "b"
    kept = answered.add_feedback("b", comment="fine")
    assert answered.delete_trace("a") == {"traces": 1, "feedback": 2}
    assert answered.get_trace("a") is None
    assert answered.feedback_for("b") == [kept]
    assert answered.delete_trace("a") == {"traces": 0, "feedback": 0}


def test_deleting_a_user_takes_everything_about_them(answered):
    answered.add_feedback("a", rating=1, rating_scale="thumbs", user="alice")  # on her own answer
    answered.add_feedback("b", comment="meh", user="alice")  # hers, on bob's answer
    answered.add_feedback("a", comment="seen", user="bob")  # bob's, on her answer
    answered.add_feedback("b", other_trace_id="a", user="bob")  # bob's, naming her answer
    kept = answered.add_feedback("b", rating=5, rating_scale="stars", user="bob")
    answered.assign_arm("exp", "alice", lambda: "a")
    answered.assign_arm("exp", "bob", lambda: "b")
    assert answered.delete_user("alice") == {"traces": 2, "feedback": 4, "assignments": 1}
    assert answered.get_trace("a") is None and answered.get_trace("c") is None
    assert answered.get_trace("b") is not None
    assert answered.feedback_for("b") == [kept]
    assert answered.assign_arm("exp", "bob", lambda: "x") == "b"
    assert answered.delete_user("alice") == {"traces": 0, "feedback": 0, "assignments": 0}


def test_a_user_is_deleted_within_a_tenant_or_in_every_tenant(store):
    from aligner.experiments import tenant_unit
    from aligner.store import EVERY_TENANT

    for tenant in (None, "team-a", "team-b"):
        store.put_trace({**trace(f"t-{tenant}"), "user": "alice", "tenant": tenant})
        store.add_feedback(f"t-{tenant}", comment="mine", user="alice")
        store.assign_arm("exp", tenant_unit(tenant, "alice"), lambda: "a")
    store.put_trace({**trace("bob-a"), "user": "bob", "tenant": "team-a"})
    store.add_feedback("bob-a", comment="alice on bob's answer", user="alice")
    store.assign_arm("exp", "team-b:alice", lambda: "a")  # a default-tenant user whose name looks scoped
    assert store.delete_user("alice", "team-a") == {"traces": 1, "feedback": 2, "assignments": 1}
    assert store.get_trace("t-team-a") is None and store.get_trace("bob-a") is not None
    assert store.get_trace("t-None") is not None and store.get_trace("t-team-b") is not None
    assert store.delete_user("alice") == {"traces": 1, "feedback": 1, "assignments": 1}  # the default tenant
    assert store.delete_user("alice", EVERY_TENANT) == {"traces": 1, "feedback": 1, "assignments": 1}
    assert store.assign_arm("exp", "team-b:alice", lambda: "b") == "a"  # not team-b's alice: kept


def test_prune_deletes_what_is_older_than_the_retention(store, clock):
    clock.t = NOW - 40 * DAY
    for i in range(5):
        store.put_trace(trace(f"old-{i}"))
    store.add_feedback("old-0", comment="old")
    store.assign_arm("exp", "old-user", lambda: "a")
    clock.t = NOW - 10 * DAY
    store.put_trace(trace("new"))
    kept = store.add_feedback("new", preferred_index=0)
    store.add_feedback("new", other_trace_id="old-1")  # new feedback naming an old answer
    store.assign_arm("exp", "new-user", lambda: "b")
    clock.t = NOW
    assert store.prune(30, batch_size=2) == {"traces": 5, "feedback": 2, "assignments": 1}
    assert store.get_trace("new") is not None and store.get_trace("old-0") is None
    assert store.feedback_for("new") == [kept]
    assert store.assign_arm("exp", "new-user", lambda: "x") == "b"
    assert store.assign_arm("exp", "old-user", lambda: "x") == "x"  # assigned afresh
    assert store.prune(30) == {"traces": 0, "feedback": 0, "assignments": 0}
    with pytest.raises(ValueError, match=">= 0"):
        store.prune(-1)


def test_export_reads_feedback_with_its_traces_in_batches(answered, clock):
    answered.add_feedback("a", rating=1, rating_scale="thumbs")
    clock.t += 60
    rows = [answered.add_feedback("a", preferred_index=i) for i in range(3)]
    rows.append(answered.add_feedback("b", other_trace_id="a"))
    everything = list(answered.iter_feedback(batch_size=2))
    assert [e["feedback"]["id"] for e in everything] == sorted(e["feedback"]["id"] for e in everything)
    assert len(everything) == 5
    recent = list(answered.iter_feedback(since=NOW + 60, batch_size=2))
    assert [e["feedback"] for e in recent] == rows
    assert recent[0]["trace"] == answered.get_trace("a") and recent[0]["other_trace"] is None
    assert (recent[-1]["trace"]["id"], recent[-1]["other_trace"]["id"]) == ("b", "a")
    since_dt = datetime.fromtimestamp(NOW + 61, timezone.utc)
    assert list(answered.iter_feedback(since=since_dt)) == []


def test_an_experiment_reads_its_own_traces_and_feedback_in_batches(store, clock):
    for i, arm in enumerate(["p@1", "p@2", "p@1", "p@2", "p@1"]):
        store.put_trace(trace(f"t{i}", user=f"u{i}", experiment="tone", arm=arm, usage={"completion_tokens": i},
                              timings={"total_s": i / 10}))
        clock.t += 10
    store.put_trace(trace("other-experiment", experiment="colour", arm="p@1"))
    store.put_trace(trace("no-experiment"))
    store.put_trace(trace("elsewhere", conversation=OTHER, experiment="tone", arm="p@2"))
    got = list(store.experiment_traces("tone", batch_size=2))
    assert [t["id"] for t in got] == ["t0", "t1", "t2", "t3", "t4", "elsewhere"]  # in the order written
    assert got[0] == {"id": "t0", "seq": 1, "created_at": NOW, "user": "u0", "tenant": None, "arm": "p@1",
                      "candidates": trace("t0")["candidates"],
                      "selected": [2], "usage": {"completion_tokens": 0}, "timings": {"total_s": 0.0}}
    assert [t["id"] for t in store.experiment_traces("tone", since=NOW + 30)] == ["t3", "t4", "elsewhere"]
    assert [t["id"] for t in store.experiment_traces("tone", after_seq=got[3]["seq"])] == ["t4", "elsewhere"]
    assert list(store.experiment_traces("unknown")) == []

    rating = store.add_feedback("t1", rating=4, rating_scale="stars", user="judge")
    store.add_feedback("t1", preferred_index=0)  # not a rating nor pairwise: not read
    store.add_feedback("t1", comment="fine")  # neither
    won = store.add_feedback("t3", other_trace_id="t0")
    store.add_feedback("t0", other_trace_id="no-experiment")  # the other response is outside it
    store.add_feedback("other-experiment", rating=1, rating_scale="thumbs")
    rows = list(store.experiment_feedback("tone", batch_size=1))
    assert rows == [
        {"id": rating["id"], "kind": "rating", "trace_id": "t1", "arm": "p@2", "rating": 4.0, "rating_scale": "stars",
         "other_trace_id": None, "other_arm": None, "user": "judge"},
        {"id": won["id"], "kind": "pairwise", "trace_id": "t3", "arm": "p@2", "rating": None, "rating_scale": None,
         "other_trace_id": "t0", "other_arm": "p@1", "user": None},
    ]
    # `since` holds for both responses of a pair: t0 is older than the window.
    assert [r["id"] for r in store.experiment_feedback("tone", since=NOW + 10)] == [rating["id"]]
    assert [r["id"] for r in store.experiment_feedback("tone", after_id=rating["id"])] == [won["id"]]


def test_traces_are_numbered_in_write_order_and_deletions_are_counted(store, clock):
    """What an experiment report kept up to date relies on: a retried trace keeps its number,
    a new one gets the next, and every deletion (trace, user, retention) moves the count."""
    store.put_trace(trace("a", experiment="tone", arm="p@1", user="ann"))
    store.put_trace(trace("b", experiment="tone", arm="p@1"))
    store.put_trace(trace("a", experiment="tone", arm="p@1", user="ann"))  # a retried write
    assert [(t["id"], t["seq"]) for t in store.experiment_traces("tone")] == [("a", 1), ("b", 2)]
    store.put_trace(trace("c", experiment="tone", arm="p@1"))
    assert [t["seq"] for t in store.experiment_traces("tone")] == [1, 2, 4]  # numbers are never reused
    before = store.deletions()
    store.delete_trace("b")
    store.delete_user("ann")
    assert store.deletions() == before + 2
    clock.t += 1
    store.prune(older_than_days=0)  # "c" is older than now
    assert store.deletions() == before + 3
    assert list(store.experiment_traces("tone")) == []


def test_a_trace_waiting_to_be_written_when_its_user_is_deleted_is_dropped(postgres):
    """Another replica holds the trace counter (it is writing a trace); this one's trace of
    ann and ann's deletion both wait on it. Whichever goes first, ann has no trace after her
    deletion was answered (the deletion waits for traces being written; a trace written after
    it sees the tombstone)."""
    import time

    import psycopg

    url = postgres.new_database()
    store = Store.open(url)
    try:
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as other:
            other.execute("UPDATE store_counters SET value = value + 1 WHERE name = 'traces'")
            arrived = time.time()
            results = {}
            write = threading.Thread(target=lambda: results.update(written=store.put_trace(
                {"id": "late", "conversation": HELLO, "user": "ann", "created_at": arrived,
                 "timings": {"total_s": 0.0}})))
            delete = threading.Thread(target=lambda: results.update(deleted=store.delete_user("ann")))
            write.start()
            time.sleep(0.3)
            delete.start()
            time.sleep(0.3)
            assert write.is_alive() and delete.is_alive()  # both wait on the other replica's write
            other.commit()
            write.join(10)
            delete.join(10)
        assert store.get_trace("late") is None
        assert results["written"] is False or results["deleted"]["traces"] == 1
    finally:
        store.close()


def test_two_stores_on_one_database_see_each_others_writes(store_url):
    first, second = Store.open(store_url), Store.open(store_url)
    try:
        first.put_trace(trace("shared"))
        row = second.add_feedback("shared", preferred_index=0, client_key="k")
        assert first.feedback_for("shared") == [row]
        assert first.add_feedback("shared", preferred_index=0, client_key="k") == row
        assert second.delete_trace("shared") == {"traces": 1, "feedback": 1}
        assert first.get_trace("shared") is None
    finally:
        first.close()
        second.close()


def test_the_database_itself_refuses_feedback_on_a_missing_response(answered, monkeypatch):
    # On PostgreSQL a response can be deleted between the check and the insert; the foreign key
    # (enforced on SQLite too) still refuses the row, and the caller sees the same error.
    monkeypatch.setattr("aligner.store.store.fb.check_against_traces", lambda *args: None)
    with pytest.raises(StoreValidationError) as refused:
        answered.add_feedback("deleted-meanwhile", comment="hm")
    assert (refused.value.param, refused.value.code) == ("trace_id", "unknown_id")
    assert count(answered, feedback) == 0


def test_several_pieces_of_feedback_are_stored_together_or_not_at_all(answered):
    answered.add_feedback("a", preferred_index=0, client_key="k:preference")
    with pytest.raises(StoreConflictError):  # the second row's key holds other content
        answered.add_feedback_rows("a", [{"rating": 1, "rating_scale": "thumbs", "client_key": "k:rating"},
                                         {"preferred_index": 1, "client_key": "k:preference"}])
    assert [r["kind"] for r in answered.feedback_for("a")] == ["preference"]  # the rating was rolled back
    with pytest.raises(StoreValidationError):  # the second names an unknown response
        answered.add_feedback_rows("a", [{"comment": "good"}, {"other_trace_id": "nope"}])
    assert len(answered.feedback_for("a")) == 1
    rows = answered.add_feedback_rows("a", [{"rating": 1, "rating_scale": "thumbs", "client_key": "k:rating"},
                                            {"preferred_index": 0, "client_key": "k:preference"}])
    assert [r["kind"] for r in rows] == ["rating", "preference"] and len(answered.feedback_for("a")) == 2


def test_comments_are_capped_per_answer(answered):
    from aligner.store.feedback import MAX_COMMENTS_PER_ANSWER

    for i in range(MAX_COMMENTS_PER_ANSWER):
        answered.add_feedback("a", comment=f"comment {i}", client_key=f"c{i}")
    with pytest.raises(StoreValidationError) as info:
        answered.add_feedback("a", comment="one more")
    assert info.value.code == "too_many_comments" and info.value.param == "comment"
    assert answered.add_feedback("a", comment="comment 0", client_key="c0")["comment"] == "comment 0"  # a retry
    assert answered.add_feedback("a", rating=1, rating_scale="thumbs")["kind"] == "rating"  # not a comment
    assert answered.add_feedback("b", comment="another answer")["kind"] == "comment"


def test_a_deleted_users_late_traces_are_dropped_on_write(store, clock):
    from aligner.store import EVERY_TENANT

    def late(id: str, tenant=None, took_s: float = 5.0) -> dict:
        return {**trace(id, user="alice", tenant=tenant), "created_at": clock.t, "timings": {"total_s": took_s}}

    assert store.put_trace(late("before"))
    clock.t += 1
    store.delete_user("alice")  # the default tenant's alice
    clock.t += 2  # a request that arrived 5 s ago (before the deletion) finishes now: dropped
    assert store.put_trace(late("racing")) is False and store.get_trace("racing") is None
    assert store.put_trace(late("team-a", tenant="team-a"))  # another tenant's alice is someone else
    assert store.put_trace(late("after", took_s=0.5))  # arrived after the deletion: she came back
    store.delete_user("alice", EVERY_TENANT)
    clock.t += 1
    assert store.put_trace(late("team-b", tenant="team-b")) is False  # every tenant's
    assert store.put_trace({**trace("bob"), "user": "bob", "created_at": clock.t - 10})
    clock.t += 40 * DAY
    assert store.prune(30)["traces"] >= 1
    assert store.put_trace({**late("much-later"), "created_at": NOW, "timings": {"total_s": 0}})  # tombstones pruned
