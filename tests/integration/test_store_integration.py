"""Traces and feedback through the real server (vLLM on CPU), on a real database: the trace
round trip (chat, streamed chat, Responses), feedback of each kind, bad feedback refused,
deletion by id and by user, a store locked mid-run (answers still served, the error counted),
and two server processes on one PostgreSQL seeing each other's traces and feedback, then that
database made read-only and stopped mid-run."""

from __future__ import annotations

import concurrent.futures
import sqlite3
import time

import httpx
import openai
import pytest

from tests.conftest import MODEL, STORE_SERVER_KEY, start_server, stop_server
from tests.pg import NO_BINARIES, pg_bin, running_postgres

pytestmark = pytest.mark.integration

KEY = STORE_SERVER_KEY
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "Cheer me up with one excited sentence!"}]
BEST_OF_4 = {"strategy": "best_of_n", "n": 4, "reward": {"exclaim": 1.0}}
# Generous: another engineer's tests may share these two cores.
HTTP_TIMEOUT_S = 300
SERVER_ARGS = ("--max-model-len", "1024", "--reward-model", "exclaim=regex:!", "--store-traces")


@pytest.fixture(scope="module")
def server(store_server):
    """The shared keyed server on SQLite (`tests.conftest.store_server`)."""
    return store_server


@pytest.fixture(scope="module")
def db_path(store_server):
    return store_server.db_path


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0, timeout=HTTP_TIMEOUT_S)


def chat(server, alignment=None, **kwargs):
    kwargs.setdefault("max_tokens", 12)
    kwargs.setdefault("messages", MESSAGES)
    body = {"alignment": alignment} if alignment is not None else None
    return client_for(server).chat.completions.create(model=MODEL, extra_body=body, **kwargs)


def get_trace(server, response_id: str) -> httpx.Response:
    return httpx.get(f"{server.v1}/alignment/traces/{response_id}", headers=AUTH, timeout=HTTP_TIMEOUT_S)


def wait_for_trace(server, response_id: str, timeout_s: float = 30) -> dict:
    """The trace once written (the writer works behind the answer; another replica's poll)."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = get_trace(server, response_id)
        if r.status_code == 200 or time.monotonic() > deadline:
            assert r.status_code == 200, r.text
            return r.json()
        time.sleep(0.2)


def feedback(server, **body) -> httpx.Response:
    return httpx.post(f"{server.v1}/alignment/feedback", json=body, headers=AUTH, timeout=HTTP_TIMEOUT_S)


def metric(server, line_start: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", headers=AUTH, timeout=HTTP_TIMEOUT_S).text
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{line_start} not in /metrics")


def wait_for_metric(server, line_start: str, at_least: float, timeout_s: float = 60) -> float:
    deadline = time.monotonic() + timeout_s
    while (value := metric(server, line_start)) < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
    assert value >= at_least, f"{line_start} = {value}, expected >= {at_least}"
    return value


def assert_error(r: httpx.Response, status: int, param: str | None, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"], error
    if code is not None:
        assert error["code"] == code, error


# -- one server, SQLite ---------------------------------------------------------------------


def test_trace_round_trip(server):
    reply = chat(server, {**BEST_OF_4, "return_candidates": True}, seed=7, temperature=1.0, user="alice")
    assert reply.alignment["traced"] is True
    trace = wait_for_trace(server, reply.id)
    assert (trace["id"], trace["user"], trace["model"], trace["strategy"]) == (reply.id, "alice", MODEL, "best_of_n")
    assert trace["conversation"] == MESSAGES
    # Every candidate as the client saw it, with its per-reward scores, and the selection.
    shown = reply.alignment["candidates"]
    assert [{k: c[k] for k in ("index", "text", "score", "scores", "finish_reason", "completion_tokens")}
            for c in trace["candidates"]] == shown
    assert all(set(c["scores"]) == {"exclaim"} for c in trace["candidates"])
    assert trace["selected"] == reply.alignment["selected"]
    assert trace["candidates"][trace["selected"][0]]["text"] == reply.choices[0].message.content
    assert (trace["usage"]["prompt_tokens"], trace["usage"]["total_tokens"]) == \
        (reply.usage.prompt_tokens, reply.usage.total_tokens)
    assert trace["usage"]["completion_tokens"] == reply.usage.completion_tokens == sum(
        c["completion_tokens"] for c in shown)
    assert [s["stage"] for s in trace["timings"]["stages"]] == ["generate", "score"]
    assert trace["request"]["seed"] == 7 and trace["alignment"]["params"]["n"] == 4
    assert trace["choices"][0]["message"]["content"] == reply.choices[0].message.content
    assert trace["endpoint"] == "chat.completions" and trace["feedback"] == []


def test_streamed_and_responses_answers_are_traced(server):
    stream = client_for(server).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].alignment["traced"] is True
    trace = wait_for_trace(server, chunks[-1].id)
    assert trace["strategy"] == "none" and trace["choices"][0]["message"]["content"] == text
    assert trace["usage"]["completion_tokens"] == chunks[-1].usage.completion_tokens

    response = client_for(server).responses.create(model=MODEL, input=MESSAGES[0]["content"], max_output_tokens=12,
                                                   extra_body={"alignment": BEST_OF_4})
    assert response.alignment["traced"] is True  # the SDK keeps unknown fields
    trace = wait_for_trace(server, response.id)
    assert trace["endpoint"] == "responses" and trace["strategy"] == "best_of_n"
    assert trace["choices"][0]["message"]["content"] == response.output_text


def test_feedback_of_each_kind(server):
    first = chat(server, BEST_OF_4, seed=1, temperature=1.0)
    second = chat(server, BEST_OF_4, seed=2, temperature=1.0)  # the same conversation
    before = {kind: metric(server, f'aligner_feedback_total{{kind="{kind}"}}')
              for kind in ("rating", "preference", "pairwise", "comment")}
    # Straight after the answers: their traces may still be on their way to the database.
    cases = [({"thumbs": "up"}, "rating"), ({"rating": 2}, "rating"), ({"preferred_candidate": 3}, "preference"),
             ({"preferred_over": second.id}, "pairwise"), ({"comment": "made me smile"}, "comment")]
    for body, kind in cases:
        r = feedback(server, id=first.id, user="bob", **body)
        assert r.status_code == 200, r.text
        assert [row["kind"] for row in r.json()["data"]] == [kind]
    stored = wait_for_trace(server, first.id)["feedback"]
    assert [row["kind"] for row in stored] == [kind for _, kind in cases]
    assert stored[0]["rating_scale"] == "thumbs" and stored[0]["rating"] == 1
    assert stored[1]["rating_scale"] == "stars" and stored[1]["rating"] == 2
    assert stored[2]["preferred_candidate"] == 3 and stored[3]["preferred_over"] == second.id
    assert all(row["user"] == "bob" for row in stored)
    # The other side of the pairwise preference sees it too.
    assert [row["kind"] for row in wait_for_trace(server, second.id)["feedback"]] == ["pairwise"]
    # Several things in one body: one row each, the comment on the first.
    r = feedback(server, id=second.id, thumbs="down", preferred_candidate=0, comment="too loud", client_key="c-1")
    assert [(row["kind"], row["comment"]) for row in r.json()["data"]] == [("rating", "too loud"), ("preference", None)]
    assert feedback(server, id=second.id, thumbs="down", preferred_candidate=0, comment="too loud",
                    client_key="c-1").json() == r.json()  # a retry returns the same rows
    for kind, added in (("rating", 3), ("preference", 2), ("pairwise", 1), ("comment", 1)):
        assert metric(server, f'aligner_feedback_total{{kind="{kind}"}}') == before[kind] + added


def test_bad_feedback_is_rejected(server):
    answer = chat(server, BEST_OF_4)
    other = chat(server, messages=[{"role": "user", "content": "Name a colour."}])
    wait_for_trace(server, answer.id)
    wait_for_trace(server, other.id)
    assert_error(feedback(server, id="chatcmpl-unknown", thumbs="up"), 404, "id", "unknown_id")
    assert_error(feedback(server, id=answer.id, preferred_candidate=4), 400, "preferred_candidate")
    assert_error(feedback(server, id=other.id, preferred_candidate=1), 400, "preferred_candidate")  # one answer
    assert_error(feedback(server, id=answer.id, preferred_over="chatcmpl-unknown"), 404, "preferred_over")
    assert_error(feedback(server, id=answer.id, preferred_over=other.id), 400, "preferred_over")  # not the same question
    assert_error(feedback(server, id=answer.id, rating=6), 400, "rating")
    assert_error(feedback(server, id=answer.id, thumbs="up", rating=5), 400, None)
    assert_error(feedback(server, id=answer.id, stars=5), 400, "stars")
    assert_error(feedback(server, id=answer.id), 400, None)
    assert feedback(server, id=answer.id, thumbs="up", client_key="k-9").status_code == 200
    assert_error(feedback(server, id=answer.id, thumbs="down", client_key="k-9"), 409, "client_key")
    assert len(wait_for_trace(server, answer.id)["feedback"]) == 1  # only the one accepted
    # The trace endpoints need the key.
    assert httpx.get(f"{server.v1}/alignment/traces/{answer.id}", timeout=HTTP_TIMEOUT_S).status_code == 401


def test_delete_by_id_and_by_user(server):
    mine = [chat(server, user="carol") for _ in range(2)]
    kept = chat(server, user="dave")
    for reply in (*mine, kept):
        wait_for_trace(server, reply.id)
    feedback(server, id=kept.id, thumbs="up", user="carol")
    r = httpx.delete(f"{server.v1}/alignment/users/carol", headers=AUTH, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200 and r.json()["deleted"] == {"traces": 2, "feedback": 1, "assignments": 0}
    assert_error(get_trace(server, mine[0].id), 404, "id")
    r = httpx.delete(f"{server.v1}/alignment/traces/{kept.id}", headers=AUTH, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200 and r.json()["deleted"] == {"traces": 1, "feedback": 0}
    assert_error(get_trace(server, kept.id), 404, "id")


def test_a_locked_store_mid_run_holds_no_answer(server, db_path):
    """Runs last on this server: another process takes the database's write lock for longer
    than the store's busy timeout (5 s). Answers keep coming; their trace writes fail and are
    counted; feedback is a 503, never a 500; reads still work (WAL); after the lock goes,
    traces are written again."""
    earlier = chat(server)
    wait_for_trace(server, earlier.id)
    failed_before = metric(server, 'aligner_store_errors_total{kind="write_failed"}')
    request_failed_before = metric(server, 'aligner_store_errors_total{kind="request_failed"}')
    holder = sqlite3.connect(db_path, isolation_level=None, timeout=30)
    holder.execute("BEGIN IMMEDIATE")
    try:
        replies = [chat(server, BEST_OF_4) for _ in range(2)]
        assert all(r.choices[0].message.content and r.alignment["traced"] for r in replies)
        wait_for_metric(server, 'aligner_store_errors_total{kind="write_failed"}', failed_before + 2)
        assert_error(feedback(server, id=earlier.id, thumbs="up"), 503, None, "store_unavailable")
        assert metric(server, 'aligner_store_errors_total{kind="request_failed"}') == request_failed_before + 1
        assert get_trace(server, earlier.id).status_code == 200
        assert holder.execute("SELECT count(*) FROM traces").fetchone()[0] >= 1
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert_error(get_trace(server, replies[0].id), 404, "id")  # dropped, as counted
    after = chat(server)
    assert wait_for_trace(server, after.id)["id"] == after.id
    assert metric(server, "aligner_store_pending") == 0


# -- two servers, one PostgreSQL ---------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres():
    bin_dir = pg_bin()
    if bin_dir is None:
        pytest.skip(NO_BINARIES)
    with running_postgres(bin_dir) as pg:
        yield pg


def start_two(tmp_path_factory, url: str):
    """Two servers on one database, started together (each migrates the store at start)."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start_server, tmp_path_factory.mktemp(f"replica-{name}"), *SERVER_ARGS,
                               "--store", url, api_key=KEY) for name in "ab"]
        started, errors = [], []
        for future in futures:
            try:
                started.append(future.result())
            except Exception as exc:  # noqa: BLE001 - stop the one that came up, then fail
                errors.append(exc)
    if errors:
        for running in started:
            stop_server(running)
        raise errors[0]
    return started


def test_two_servers_on_one_postgresql(tmp_path_factory, postgres):
    url = postgres.new_database()
    a, b = start_two(tmp_path_factory, url)
    try:
        # B sees A's answer and takes feedback on it; A sees that feedback.
        first = chat(a, BEST_OF_4, seed=3, temperature=1.0, user="erin")
        assert wait_for_trace(b, first.id)["strategy"] == "best_of_n"
        r = feedback(b, id=first.id, thumbs="up", preferred_candidate=2, client_key="tap-1")
        assert r.status_code == 200, r.text
        # A retry that lands on the other replica returns the same rows.
        assert feedback(a, id=first.id, thumbs="up", preferred_candidate=2, client_key="tap-1").json() == r.json()
        second = chat(b, BEST_OF_4, seed=4, temperature=1.0)
        wait_for_trace(a, second.id)
        assert feedback(a, id=second.id, preferred_over=first.id).status_code == 200
        seen_by_a = wait_for_trace(a, first.id)["feedback"]
        seen_by_b = wait_for_trace(b, first.id)["feedback"]
        assert seen_by_a == seen_by_b
        assert [row["kind"] for row in seen_by_a] == ["rating", "preference", "pairwise"]
        assert seen_by_a[2]["response_id"] == second.id and seen_by_a[2]["preferred_over"] == first.id

        # The database turns read-only mid-run (its sessions cut, so both pools reconnect).
        name = url.rsplit("/", 1)[1]
        import psycopg

        with psycopg.connect(postgres.url("postgres"), autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        for server in (a, b):
            failed = metric(server, 'aligner_store_errors_total{kind="write_failed"}')
            reply = chat(server, BEST_OF_4)
            assert reply.choices[0].message.content and reply.alignment["traced"] is True
            wait_for_metric(server, 'aligner_store_errors_total{kind="write_failed"}', failed + 1)
            assert_error(get_trace(server, reply.id), 404, "id")  # its trace could not be written
            assert get_trace(server, first.id).status_code == 200  # reads still work
            assert_error(feedback(server, id=first.id, comment="read-only now"), 503, None, "store_unavailable")

        # Then the database goes away altogether.
        postgres.stop()
        for server in (a, b):
            failed = metric(server, 'aligner_store_errors_total{kind="write_failed"}')
            reply = chat(server)
            assert reply.choices[0].message.content
            wait_for_metric(server, 'aligner_store_errors_total{kind="write_failed"}', failed + 1)
            assert_error(get_trace(server, first.id), 503, None, "store_unavailable")
            assert metric(server, 'aligner_store_errors_total{kind="request_failed"}') >= 2
            assert httpx.get(f"{server.base_url}/health", timeout=HTTP_TIMEOUT_S).status_code == 200
    finally:
        for server in (a, b):
            stop_server(server)
