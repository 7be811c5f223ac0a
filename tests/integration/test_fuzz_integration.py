"""Property-based fuzzing of the real server (vLLM on the default model): no input gives a
5xx, and the engine survives everything. Fewer cases than over the fake engine
(`tests/unit/server/test_fuzz.py`), generation budgets capped so that CI stays fast."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.fakes import internal_detail
from tests.unit.server.test_fuzz import cap_generation

REAL_CASES_PER_OPERATION = 80


@pytest.mark.integration
def test_real_server_never_answers_5xx(server):
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")

    @schema.hook("map_body")
    def _cap_real(context, body):
        return cap_generation(body, "SmolLM2-135M-Instruct")

    statuses: list[int] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=REAL_CASES_PER_OPERATION, derandomize=True, deadline=None,
                  suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case):
            response = case.call(timeout=120)
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.as_curl_command(), response.text)
            if response.status_code >= 400:  # no path, traceback or exception text in an error
                assert not internal_detail(response.text), (case.as_curl_command(), response.text)

        check()
    assert len(statuses) >= 150 and statuses.count(200) >= 10, sorted(set(statuses))
    # The engine survived everything the fuzzer sent.
    assert httpx.get(f"{server.base_url}/ready", timeout=10).status_code == 200
