"""POST /v1/alignment/score: score given answers with the registered rewards."""

from __future__ import annotations

from aligner.rewards import RewardError, RewardRegistry, RewardSpecError
from server.admission import AdmissionController, Overloaded
from server.config import ServerConfig
from server.errors import invalid_request, make_error, overloaded
from server.metrics import ServerMetrics
from server.protocol import ErrorResponse, ScoreRequest, ScoreResponse


async def score_responses(request: ScoreRequest, rewards: RewardRegistry, config: ServerConfig,
                          admission: AdmissionController, metrics: ServerMetrics,
                          tenant: str | None = None) -> ScoreResponse | ErrorResponse:
    """Admitted like a generation (weighed by its responses): scoring shares the reward models
    with best-of-N and friends, and a flood of it must queue and then get 429s, not starve them."""
    if len(request.responses) > config.max_candidates:
        return invalid_request(f"at most {config.max_candidates} responses per request", "responses")
    try:
        weights = rewards.resolve(request.reward, "reward")
    except RewardSpecError as exc:
        return invalid_request(str(exc), exc.param)
    messages = [m.as_template_message() for m in request.messages]
    try:
        ticket = await admission.acquire(len(request.responses), tenant=tenant)
    except Overloaded as exc:
        metrics.admission_rejections.labels("capacity").inc()
        return overloaded(exc.reason, exc.retry_after_s)
    try:
        report = await rewards.score(weights, messages, request.responses)
    except RewardError as exc:
        return make_error(str(exc), 503, code="reward_unavailable")
    finally:
        ticket.release()
    return ScoreResponse(reward=weights, scores=report.total, per_reward=report.per_reward)
