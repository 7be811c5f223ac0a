"""Property-based fuzzing of the OpenAPI schema with schemathesis: no input gives a 5xx.

The app over the fake engine (fast, >= 1,000 cases over all operations); the real server is
fuzzed in `tests/integration/test_fuzz_integration.py`. Hypothesis is derandomised, so CI
runs the same cases every time.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from server.app import build_app
from server.config import ServerConfig
from tests.fakes import FakeEngine, internal_detail

CASES_PER_OPERATION = 250

fake_app = build_app(FakeEngine(max_model_len=256), ServerConfig(served_model_name="fake-model"), start_engine=False)
fake_schema = schemathesis.openapi.from_asgi("/openapi.json", fake_app)
fake_cases: list[int] = []


def cap_generation(body, model: str):
    """Keep fuzzed generations short (a valid request would otherwise fill the context) and
    name the served model, so that fuzzing reaches past the model check."""
    if isinstance(body, dict):
        if isinstance(body.get("model"), str):
            body["model"] = model
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] > 4:
            body["max_tokens"] = 4
        body.pop("max_completion_tokens", None)
        if "input" in body:  # /v1/responses
            body["max_output_tokens"] = min(body["max_output_tokens"], 4) \
                if isinstance(body.get("max_output_tokens"), int) and body["max_output_tokens"] > 0 else 4
        if isinstance(body.get("n"), int) and body["n"] > 2:
            body["n"] = 2
    return body


@fake_schema.hook("map_body")
def _cap_fake(context, body):
    return cap_generation(body, "fake-model")


@fake_schema.parametrize()
@settings(max_examples=CASES_PER_OPERATION, derandomize=True, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_fake_engine_app_never_answers_5xx(case):
    response = case.call()
    fake_cases.append(response.status_code)
    assert response.status_code < 500, (case.as_curl_command(), response.text)
    if response.status_code >= 400:
        assert response.json()["error"]["message"]
        assert not internal_detail(response.text), (case.as_curl_command(), response.text)


def test_fuzzing_covered_at_least_1000_cases():
    if not fake_cases:
        pytest.skip("run together with test_fake_engine_app_never_answers_5xx")
    assert len(fake_cases) >= 1000, len(fake_cases)
    # Both valid requests (served) and invalid ones (refused) were generated.
    assert fake_cases.count(200) >= 50 and fake_cases.count(400) >= 50

