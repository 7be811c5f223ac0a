"""What an answer cost: tokens through every model that worked on it, and an estimate of FLOPs.

`alignment.compute` in every answer, so a client can compare strategies by cost, not only by
the tokens `usage` counts:

- `models`: each generating model (`policy`, and any helper a stage asked) with the prompt
  tokens it prefilled (prompt tokens minus those its prefix cache served), the tokens it
  decoded, and FLOPs;
- `rewards`: each reward the request scored with (the strategy's, the router's classifier,
  the output rail's) with the sequences and tokens its forwards read, and FLOPs (rules: 0);
- `flops`: the sum, and `unmeasured`: what the sum leaves out.

A forward costs about 2 x parameters x tokens (Kaplan et al. 2020), counting the parameters a
token is multiplied by (`decoding.model_refs.matmul_parameters`: not the embedding lookups,
and the tied output projection for a causal LM). Attention's context term (2 x layers x
context x width per token) is left out: at SmolLM2-135M's shape it adds about 7% at 512
tokens of context. A decoded token is counted once (its KV is cached, as vLLM does).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aligner.strategies.base import StrategyResult

POLICY = "policy"
RULE = "rule"


def _flops(parameters: int | None, tokens: int) -> int | None:
    return None if parameters is None else 2 * parameters * tokens


def compute_report(result: StrategyResult, engine, helpers: Mapping[str, Any], rewards) -> dict[str, Any]:
    """The compute report of `result`: `engine` the policy, `helpers` by name, `rewards` the
    request's reward registry (its `usage` counts what the request scored)."""
    models: dict[str, dict[str, Any]] = {}
    for stage in result.stages:
        if not (stage.prompt_tokens or stage.completion_tokens):
            continue
        name = stage.model or POLICY
        row = models.setdefault(name, {"prefill_tokens": 0, "cached_tokens": 0, "decoded_tokens": 0})
        row["prefill_tokens"] += stage.prompt_tokens - stage.cached_tokens
        row["cached_tokens"] += stage.cached_tokens
        row["decoded_tokens"] += stage.completion_tokens
    unmeasured = []
    for name, row in models.items():
        model = engine if name == POLICY else helpers.get(name)
        parameters = None if model is None else model.matmul_parameters
        row["parameters"] = parameters
        row["flops"] = _flops(parameters, row["prefill_tokens"] + row["decoded_tokens"])
        if row["flops"] is None:
            unmeasured.append(f"model {name}: parameters unknown")
    scored: dict[str, dict[str, Any]] = {}
    for name, used in sorted(rewards.usage.items()):
        reward = rewards.get(name)
        parameters = 0 if reward is None or reward.kind == RULE else reward.matmul_parameters
        scored[name] = {**used, "parameters": parameters, "flops": _flops(parameters, used["tokens"])}
        if scored[name]["flops"] is None:
            unmeasured.append(f"reward {name}: parameters unknown")
    if "guide" in result.info:
        unmeasured.append("the token-level guide's forwards")
    known = [row["flops"] for row in (*models.values(), *scored.values()) if row["flops"] is not None]
    return {"models": models, "rewards": scored, "flops": sum(known), "unmeasured": unmeasured}
