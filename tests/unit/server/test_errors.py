"""Error envelopes and the mapping of validation errors to `param`."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.errors import _param_from_loc, from_validation_errors, make_error
from server.protocol import ChatCompletionRequest


@pytest.mark.parametrize(
    "loc, expected",
    [
        (("body", "model"), "model"),
        (("body", "messages", 0, "role"), "messages[0].role"),
        (("body", "messages", 1, "content", "str"), "messages[1].content"),
        (("body", "messages", 0, "content", "list[TextContentPart]", 2, "type"), "messages[0].content[2].type"),
        (("body",), None),
    ],
)
def test_param_from_loc(loc, expected):
    assert _param_from_loc(loc) == expected


def test_envelope_shape_and_types():
    body = make_error("nope", 401).model_dump()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "authentication_error"
    assert make_error("x", 503).error.type == "service_unavailable"
    assert make_error("x", 404).error.type == "not_found_error"


def _errors_of(**body):
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest(**body)
    return [dict(e, loc=("body", *e["loc"])) for e in info.value.errors()]


def test_validation_error_names_the_first_bad_field():
    error = from_validation_errors(_errors_of(model="m", messages=[{"role": "robot", "content": "x"}]))
    assert error.status_code == 400
    assert error.error.param == "messages[0].role"
    assert "messages[0].role" in error.error.message


def test_missing_field_is_named():
    error = from_validation_errors(_errors_of(messages=[{"role": "user", "content": "x"}]))
    assert error.error.param == "model"
    assert error.error.code == "missing_required_parameter"
    assert error.error.message == "missing required parameter: model"


def test_several_errors_are_counted_in_the_message():
    error = from_validation_errors(_errors_of(model="m", messages=[], n=0))
    assert "more error" in error.error.message


def test_engine_failures_reach_the_client_without_their_exception_text(caplog):
    from decoding.engine import EngineDeadError, EngineError
    from server.serving_common import engine_error

    for exc in (EngineError("CUDA error at /opt/site-packages/x.py:12"), EngineDeadError("worker 3 /dev/shm gone")):
        with caplog.at_level("ERROR"):
            error = engine_error(exc).error
        assert error.type and error.message and "/" not in error.message and str(exc) not in error.message
        assert str(exc) in caplog.text  # the detail is in the log


def test_a_keyless_server_answers_its_own_origin_only():
    """Keyless, a page in the user's browser must not drive the server: a foreign `Origin` is
    a 403, and so is a `Host` that is a foreign domain (DNS rebinding); SDKs send neither."""
    import socket

    from fastapi.testclient import TestClient

    from server.app import build_app
    from server.config import ServerConfig
    from tests.fakes import FakeEngine

    app = build_app(FakeEngine(), ServerConfig(served_model_name="fake-model"), start_engine=False)
    local = TestClient(app, base_url="http://127.0.0.1:8000")  # the socket's address, as uvicorn reports it
    own = socket.gethostname()
    for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST.:8000", "0.0.0.0:8000", "[::1]:8000", "[::]:8000",
                 "192.168.1.5:8000", f"{own}:8000", "app.localhost:8000"):
        assert local.get("/v1/models", headers={"Host": host}).status_code == 200, host
    assert local.get("/v1/models", headers={"Origin": "http://127.0.0.1:8000"}).status_code == 200  # its own UI
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Host": "rebound.example:8000"},
                    {"Host": "rebound.example:8000", "Origin": "http://rebound.example:8000"}):
        refused = local.post("/v1/alignment/reload", headers=headers)
        assert refused.status_code == 403, headers
        assert refused.json()["error"]["code"] == "cross_origin_refused" and "api-key" in refused.json()["error"]["message"]
    # On any interface: a socket on a LAN address, or an IPv4-mapped one, checks the Host too.
    for base in ("http://10.1.2.3:8000", "http://[::ffff:127.0.0.1]:8000"):
        other = TestClient(app, base_url=base)
        assert other.get("/v1/models", headers={"Host": "10.1.2.3:8000"}).status_code == 200
        assert other.get("/v1/models", headers={"Host": "rebound.example:8000"}).status_code == 403
    # With a key, the key decides (a browser page does not have it).
    keyed = TestClient(build_app(FakeEngine(), ServerConfig(served_model_name="fake-model", api_key="k"),
                                 start_engine=False), base_url="http://127.0.0.1:8000")
    assert keyed.get("/v1/models", headers={"Origin": "http://evil.example", "Authorization": "Bearer k"}).status_code == 200
