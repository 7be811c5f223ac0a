"""API keys from a file: parsing, reloads that keep the old keys on a bad file, the
constant-time check, the key middleware at the ASGI level and the SIGHUP hook."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest
from fastapi.testclient import TestClient

from server.api_keys import ADMIN, APIKeyFileError, APIKeys, Principal, read_key_file, reload_on_sighup
from server.app import build_app
from server.config import ServerConfig
from server.middleware import APIKeyMiddleware
from tests.fakes import FakeEngine


def write(path, text: str):
    path.write_text(text)
    return path


def bearer(key: str) -> bytes:
    return f"Bearer {key}".encode()


def test_the_file_lists_one_key_a_line_without_blanks_comments_or_whitespace(tmp_path):
    path = write(tmp_path / "keys", "# team A\n  alpha  \n\n\tbeta\n   # old: gamma\nalpha\n")
    assert read_key_file(path) == {"alpha": ADMIN, "beta": ADMIN}  # a bare key is an admin key, as before roles


def test_a_key_line_names_its_tenant_and_role(tmp_path):
    path = write(tmp_path / "keys", "a-key tenant=team-a role=client\nb-key role=client tenant=team-b\n"
                                    "probe role=metrics\nroot tenant=ops\n")
    assert read_key_file(path) == {"a-key": Principal("client", "team-a"), "b-key": Principal("client", "team-b"),
                                   "probe": Principal("metrics", None), "root": Principal("admin", "ops")}
    keys = APIKeys("flag-key", path)
    assert keys.principal(bearer("a-key")) == Principal("client", "team-a")
    assert keys.principal(bearer("flag-key")) == ADMIN and keys.principal(bearer("team-a")) is None


@pytest.mark.parametrize("line", ["s3cret-key role=owner", "s3cret-key tenant=a/b", "s3cret-key tenant=",
                                  "s3cret-key team=a", "s3cret-key role=client role=admin", "s3cret-key client",
                                  "s3cret-key tenant=a\ns3cret-key tenant=b"])
def test_a_bad_field_is_an_error_naming_the_line_not_the_key(tmp_path, line):
    with pytest.raises(APIKeyFileError, match=r"keys line [23]: ") as info:
        read_key_file(write(tmp_path / "keys", f"# comment\n{line}\n"))
    assert "s3cret" not in str(info.value)


def test_a_principal_owns_its_own_tenants_data_and_an_admin_everyones():
    client = Principal("client", "team-a")
    assert client.owns("team-a") and not client.owns("team-b") and not client.owns(None)
    assert Principal("client").owns(None) and not Principal("client").owns("team-a")
    assert ADMIN.owns("team-b") and ADMIN.owns(None)


@pytest.mark.parametrize("text", ["", "\n  \n", "# only a comment\n# secret-looking-note\n"])
def test_a_file_without_keys_is_an_error_that_quotes_no_line(tmp_path, text):
    with pytest.raises(APIKeyFileError, match="lists no key") as info:
        read_key_file(write(tmp_path / "keys", text))
    assert "secret-looking-note" not in str(info.value)


def test_a_missing_or_binary_file_is_an_error_that_quotes_no_byte(tmp_path):
    with pytest.raises(APIKeyFileError, match="cannot read"):
        read_key_file(tmp_path / "absent")
    (tmp_path / "binary").write_bytes(b"key\xff\xfe\n")
    with pytest.raises(APIKeyFileError, match="not UTF-8") as info:
        read_key_file(tmp_path / "binary")
    assert "xff" not in str(info.value)


def test_every_key_of_the_file_and_the_flag_is_accepted_and_nothing_near_them(tmp_path):
    keys = APIKeys("flag-key", write(tmp_path / "keys", "alpha\nbeta\n"))
    assert len(keys) == 3
    for key in ("flag-key", "alpha", "beta"):
        assert keys.accepts(bearer(key))
    for header in (b"", b"alpha", b"Bearer ", b"Bearer alph", b"Bearer alphaa", b"bearer alpha", b"Bearer # x"):
        assert not keys.accepts(header)


def test_no_key_and_no_file_is_an_empty_store_that_accepts_nothing():
    keys = APIKeys()
    assert len(keys) == 0 and not keys and not keys.accepts(b"Bearer ")
    assert keys.reload() is False


def test_each_key_is_compared_in_constant_time_against_every_key(tmp_path, monkeypatch):
    import hmac

    compared, compare_digest = [], hmac.compare_digest

    def recording_compare(given, expected):
        compared.append(expected)
        return compare_digest(given, expected)

    keys = APIKeys(None, write(tmp_path / "keys", "alpha\nbeta\ngamma\n"))
    monkeypatch.setattr(hmac, "compare_digest", recording_compare)
    for key in ("alpha", "beta", "gamma", "nope"):
        compared.clear()
        assert keys.accepts(bearer(key)) is (key != "nope")
        # No early exit on a match: which key matched does not show in the time taken.
        assert compared == [bearer("alpha"), bearer("beta"), bearer("gamma")]


def test_a_reload_swaps_the_keys_and_logs_only_their_number(tmp_path, caplog):
    path = write(tmp_path / "keys", "alpha\n")
    keys = APIKeys(None, path)
    write(path, "beta\ngamma\n")
    with caplog.at_level(logging.INFO, logger="server.api_keys"):
        assert keys.reload() is True
    assert keys.accepts(bearer("beta")) and keys.accepts(bearer("gamma")) and not keys.accepts(bearer("alpha"))
    assert "2 loaded" in caplog.text
    assert "beta" not in caplog.text and "gamma" not in caplog.text


@pytest.mark.parametrize("spoil", ["delete", "empty", "comments", "binary", "directory"])
def test_a_reload_from_a_bad_file_keeps_the_old_keys_and_logs_an_error(tmp_path, caplog, spoil):
    path = write(tmp_path / "keys", "alpha\nbeta\n")
    keys = APIKeys(None, path)
    path.unlink()
    if spoil == "empty":
        write(path, "")
    elif spoil == "comments":
        write(path, "# rotated-out-key\n")
    elif spoil == "binary":
        path.write_bytes(b"\xff\xfe")
    elif spoil == "directory":
        path.mkdir()
    with caplog.at_level(logging.INFO, logger="server.api_keys"):
        assert keys.reload() is False
    assert keys.accepts(bearer("alpha")) and keys.accepts(bearer("beta")) and len(keys) == 2
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "2 keys in use stay" in errors[0].getMessage()
    assert "alpha" not in caplog.text and "rotated-out-key" not in caplog.text


async def call(middleware, path: str, authorization: str | None = None) -> int:
    """One HTTP request through an ASGI app; returns the response status."""
    headers = [(b"authorization", authorization.encode())] if authorization is not None else []
    scope = {"type": "http", "method": "GET", "path": path, "headers": headers, "query_string": b""}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await middleware(scope, receive, send)
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


async def reached(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_the_middleware_asks_the_store_on_each_request_so_a_reload_counts_at_once(tmp_path):
    path = write(tmp_path / "keys", "alpha\n")
    middleware = APIKeyMiddleware(reached, APIKeys(None, path))
    assert await call(middleware, "/v1/models", "Bearer alpha") == 200
    assert await call(middleware, "/v1/models", "Bearer beta") == 401
    assert await call(middleware, "/v1/models") == 401
    assert await call(middleware, "/health") == 200
    write(path, "beta\n")
    middleware.keys.reload()
    assert await call(middleware, "/v1/models", "Bearer beta") == 200
    assert await call(middleware, "/v1/models", "Bearer alpha") == 401


async def test_sighup_reloads_the_file_only_inside_the_hook(tmp_path):
    path = write(tmp_path / "keys", "alpha\n")
    keys = APIKeys(None, path)
    with reload_on_sighup(keys):
        # Without the handler in place, the signal below would end the test process.
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        write(path, "beta\n")
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            if keys.accepts(bearer("beta")):
                break
            await asyncio.sleep(0.01)
        assert keys.accepts(bearer("beta")) and not keys.accepts(bearer("alpha"))
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL


async def test_without_a_key_file_no_sighup_handler_is_installed():
    before = signal.getsignal(signal.SIGHUP)
    with reload_on_sighup(APIKeys("flag-key")):
        assert signal.getsignal(signal.SIGHUP) is before


def test_the_app_accepts_the_file_keys_and_the_flag_key(tmp_path):
    config = ServerConfig(served_model_name="fake-model", api_key="flag-key",
                          api_key_file=str(write(tmp_path / "keys", "alpha\nbeta\n")))
    client = TestClient(build_app(FakeEngine(), config, start_engine=False))
    for key in ("flag-key", "alpha", "beta"):
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    r = client.get("/v1/models", headers={"Authorization": "Bearer gamma"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def serve_args(*argv: str):
    from server.cli import build_parser

    return build_parser().parse_args(["serve", *argv])


def test_a_missing_or_empty_key_file_at_start_is_a_one_line_exit(tmp_path):
    from server.serve import server_config

    for path in (tmp_path / "absent", write(tmp_path / "empty", "# nothing yet\n")):
        with pytest.raises(SystemExit) as info:
            server_config(serve_args("--api-key-file", str(path)), "m")
        assert str(info.value).startswith("aligner: --api-key-file: ") and "\n" not in str(info.value)
    config = server_config(serve_args("--api-key-file", str(write(tmp_path / "keys", "alpha\n"))), "m")
    assert config.api_key_file == str(tmp_path / "keys")


def test_a_key_file_counts_as_a_key_for_the_exposure_warning():
    from server.serve import exposure_warning

    assert exposure_warning("0.0.0.0", None, "/etc/aligner/keys") is None
    assert "--api-key-file" in exposure_warning("0.0.0.0", None, None)
