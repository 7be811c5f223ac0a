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
