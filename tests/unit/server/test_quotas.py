"""Per-key limits (issue 38): requests per minute and generated tokens per UTC day, on a fake
clock, and through the app over a fake engine (429 with Retry-After, per-tenant counters)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.api_keys import APIKeyFileError, read_key_file
from server.app import build_app
from server.config import ServerConfig
from server.quotas import DAY_S, KeyLimits, KeyQuota, Quotas
from tests.fakes import FakeEngine


class Clock:
    def __init__(self, t: float = 10 * DAY_S + 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_the_minute_bucket_bursts_to_its_size_then_refills_evenly():
    clock = Clock()
    quota = KeyQuota(KeyLimits(rpm=3), clock)
    assert [quota.admit(False) for _ in range(3)] == [None, None, None]
    limit, wait = quota.admit(False)
    assert limit == "rpm" and wait == pytest.approx(20.0)  # one request every 20 s at 3 a minute
    clock.t += 19.0
    assert quota.admit(False)[0] == "rpm"  # a refused request takes nothing
    clock.t += 1.0
    assert quota.admit(False) is None and quota.admit(False) is not None
    clock.t += 3600
    assert [quota.admit(False) for _ in range(4)][-1] is not None  # refills to 3, not to 180


def test_the_days_tokens_refuse_generation_until_utc_midnight():
    clock = Clock()
    quota = KeyQuota(KeyLimits(tokens_per_day=100), clock)
    assert quota.admit(True) is None
    quota.charge(99)
    assert quota.admit(True) is None  # 1 token left: the request that crosses the limit runs
    quota.charge(40)
    limit, wait = quota.admit(True)
    assert limit == "tokens_per_day" and wait == pytest.approx(DAY_S - 100.0)
    assert quota.admit(False) is None  # reading traces generates nothing
    clock.t += wait
    assert quota.admit(True) is None and quota.used_today == 0


def test_counters_outlive_a_reload_that_keeps_the_limits_and_go_with_the_key():
    quotas = Quotas(Clock())
    first = quotas.for_key("k1", KeyLimits(rpm=1))
    assert first.admit(False) is None
    assert quotas.for_key("k1", KeyLimits(rpm=1)) is first and first.admit(False) is not None
    assert quotas.for_key("k1", KeyLimits(rpm=5)) is not first  # new limits, new counters
    assert quotas.for_key("k2", KeyLimits()) is None  # no limits, nothing kept
    quotas.keep_only({"k3"})
    assert quotas.for_key("k1", KeyLimits(rpm=5)).admit(False) is None


@pytest.mark.parametrize("field", ["rpm=0", "rpm=-1", "rpm=1.5", "tokens_per_day=lots", "rpm="])
def test_a_bad_limit_is_an_error_naming_the_line(tmp_path, field):
    (tmp_path / "keys").write_text(f"s3cret-key role=client {field}\n")
    with pytest.raises(APIKeyFileError, match="line 1: ") as info:
        read_key_file(tmp_path / "keys")
    assert "s3cret" not in str(info.value)


@pytest.fixture
def api(tmp_path):
    (tmp_path / "keys").write_text("slow tenant=team-a role=client rpm=2\n"
                                   "thrifty tenant=team-b role=client tokens_per_day=5\n"
                                   "free tenant=team-b role=client\nroot\n")
    config = ServerConfig(served_model_name="fake-model", api_key_file=str(tmp_path / "keys"))
    with TestClient(build_app(FakeEngine(max_model_len=1024), config, start_engine=False)) as client:
        yield client


def chat(api, key: str):
    return api.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                    json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})


def metric(api, line_start: str) -> float:
    for line in api.get("/metrics", headers={"Authorization": "Bearer root"}).text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_key_past_its_rate_gets_a_429_with_retry_after(api):
    assert [chat(api, "slow").status_code for _ in range(2)] == [200, 200]
    refused = chat(api, "slow")
    assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 30
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "requests per minute" in error["message"]
    assert chat(api, "root").status_code == 200  # other keys are not held back
    assert metric(api, 'aligner_rate_limited_total{limit="rpm",tenant="team-a"}') == 1
    assert metric(api, 'aligner_tenant_requests_total{tenant="team-a"}') == 3


def test_a_key_past_its_days_tokens_generates_nothing_more_today(api):
    first = chat(api, "thrifty")
    assert first.status_code == 200
    used = first.json()["usage"]["completion_tokens"]
    assert used >= 1
    while (r := chat(api, "thrifty")).status_code == 200:
        used += r.json()["usage"]["completion_tokens"]
    assert r.status_code == 429 and "generated tokens for today" in r.json()["error"]["message"]
    assert 5 <= used < 5 + 4  # admitted while under 5; the one that crossed it generated at most its 4
    assert int(r.headers["Retry-After"]) <= DAY_S
    assert api.get("/v1/models", headers={"Authorization": "Bearer thrifty"}).status_code == 200
    assert chat(api, "free").status_code == 200  # the same tenant's other key has its own limits
    assert metric(api, 'aligner_tenant_generated_tokens_total{tenant="team-b"}') >= used
