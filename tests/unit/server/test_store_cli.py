"""The store's flags: when a store is opened, where, and how a bad one stops the start."""

from __future__ import annotations

import pytest

from server.cli import build_parser
from server.config import ServerConfig
from server.serve import open_store, store_config, store_warning, wants_store


def serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_a_plain_start_opens_no_store(monkeypatch, tmp_path):
    monkeypatch.delenv("ALIGNER_STORE", raising=False)
    monkeypatch.setenv("ALIGNER_HOME", str(tmp_path))
    args = serve_args()
    assert not wants_store(args) and open_store(args) is None
    assert list(tmp_path.iterdir()) == []  # nothing written under $ALIGNER_HOME
    config = store_config(args)
    assert (config.traces, config.allow_request_traces, config.retention_days, config.max_pending) == \
        (False, False, 30.0, 1000)


@pytest.mark.parametrize("flag", ["--store-traces", "--allow-request-traces"])
def test_tracing_opens_the_default_sqlite_store_under_aligner_home(monkeypatch, tmp_path, flag, capsys):
    monkeypatch.delenv("ALIGNER_STORE", raising=False)
    monkeypatch.setenv("ALIGNER_HOME", str(tmp_path))
    store = open_store(serve_args(flag))
    try:
        assert store.url == f"sqlite:///{tmp_path / 'store.db'}"
        assert (tmp_path / "store.db").exists()
    finally:
        store.close()
    assert "aligner: store sqlite:///" in capsys.readouterr().err


def test_store_url_from_the_flag_or_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNER_STORE", f"sqlite:///{tmp_path / 'env.db'}")
    assert serve_args().store == f"sqlite:///{tmp_path / 'env.db'}"
    assert serve_args("--store", str(tmp_path / "flag.db")).store == str(tmp_path / "flag.db")


def test_flags_reach_the_config():
    config = store_config(serve_args("--store-traces", "--allow-request-traces", "--store-retention-days", "0",
                                     "--store-max-pending", "5"))
    assert (config.traces, config.allow_request_traces, config.retention_days, config.max_pending) == \
        (True, True, None, 5)
    with pytest.raises(SystemExit, match="--store-max-pending"):
        store_config(serve_args("--store-max-pending", "0"))


@pytest.mark.parametrize("url, reason", [
    ("mysql://db/x", "unsupported store URL"),
    ("sqlite://", "in-memory"),
    ("postgresql://nobody@127.0.0.1:1/none", "OperationalError"),  # nothing listens on port 1
])
def test_a_store_that_cannot_be_opened_stops_the_start_in_one_line(url, reason):
    with pytest.raises(SystemExit) as stopped:
        open_store(serve_args("--store", url))
    message = str(stopped.value)
    assert message.startswith("aligner: --store: cannot open") and reason in message
    assert "\n" not in message


def test_a_store_without_an_api_key_is_warned_of():
    args = serve_args("--store-traces")
    assert "API key" in store_warning(args, ServerConfig(served_model_name="m"))
    assert store_warning(args, ServerConfig(served_model_name="m", api_key="k")) is None
    assert store_warning(serve_args(), ServerConfig(served_model_name="m")) is None
