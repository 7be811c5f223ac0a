"""Alignment quality: `aligner bench quality ...`.

Runs prompt sets through plain decoding and several strategies (or profiles) on the same
seeds, and judges every answer with a judge that neither guides a strategy as a reward nor
steers one as a guide (the tool refuses otherwise: a strategy optimised against its own
judge always looks good). Reports per strategy (`bench.quality_report`): mean judge reward;
win rate against plain decoding with a Wilson 95% interval (a tie half a win) and a length-controlled win
rate (on the benign sets when there are any); refusal (declined early) and strict refusal
(declined early and did not go on to comply), both by `bench.refusal_judge`, on harmful sets,
over-refusal and strict over-refusal on benign sets, each with its Wilson interval; tokens and seconds per request beside plain's; failed requests.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from aligner.rewards.base import checkpoint_version
from bench.load import load_prompts
from bench.refusal_judge import declined, refused
from bench.quality_report import (Answer, QualityConfig, format_table, length_controlled_win_rate, plot, summarise,
                                  win_rate_ci)

__all__ = ["Answer", "QualityConfig", "check_judge_independent", "collect", "dump", "format_table",
           "length_controlled_win_rate", "load_prompt_file", "plot", "summarise", "win_rate_ci"]

RETRIES = 1  # a failed request is sent once more, then recorded as an error


def _user_text(content) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict)) or None
    return None


def prompt_of(row: dict) -> str:
    """A JSONL row's prompt: `prompt` (a string, or a messages list: its last user message),
    else the first of `turns`."""
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        users = [_user_text(m.get("content")) for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        prompt = next((u for u in reversed(users) if u), None)
    if not prompt and row.get("turns"):
        prompt = row["turns"][0]
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"no prompt in {json.dumps(row)[:200]}: give `prompt` (a string or messages) or `turns`")
    return prompt


def load_prompt_file(path: str | Path, limit: int = 0) -> list[str]:
    """The prompts of a JSONL file (or ShareGPT-like JSON); the first `limit` (0: all)."""
    path = Path(path)
    if path.suffix == ".json":
        prompts = load_prompts(path)
    else:
        prompts = [prompt_of(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return prompts[:limit] if limit else prompts


def guides_of(alignment: dict) -> tuple[set[str], set[str]]:
    """(reward names, guide names) a strategy (or each pipeline stage) is steered by; "" stands
    for the server's default reward or default guide, used by a stage that names none."""
    rewards, guides = set(), set()
    if isinstance(route := alignment.get("route"), dict):  # the classifier steers too, and each branch
        rewards.add(route.get("classifier") or "")
        for branch in ("flagged", "otherwise"):
            more = guides_of(route.get(branch) or {})
            rewards |= more[0]
            guides |= more[1]
        return rewards, guides
    for stage in alignment.get("pipeline") or [alignment]:
        if not stage:
            continue
        if stage.get("strategy") == "guided":
            guides.add(stage.get("guide") or "")
            continue
        reward = stage.get("reward")
        if isinstance(reward, str):
            rewards.add(reward)
        elif isinstance(reward, dict):
            rewards.update(reward)
        else:
            rewards.add("")
    return rewards, guides


def same_checkpoint(judge_path: str | None, row: dict) -> bool:
    """Whether a listed reward or guide is the judge's checkpoint directory: the server lists a
    checkpoint's folder name and fingerprint, not its path."""
    if judge_path is None or not row.get("checkpoint") or not row.get("version"):
        return False
    path = Path(judge_path).resolve()
    return path.is_dir() and path.name == row["checkpoint"] and checkpoint_version(path) == row["version"]


def check_judge_independent(judge_path: str | None, judge_name: str, cfg: QualityConfig,
                            registered: list[dict]) -> None:
    """Refuse a judge that steers one of the strategies: as a reward or as a guide, by name or
    by checkpoint. `registered` is the server's /v1/alignment/rewards listing (guides carry
    `kind: guide`; the first one listed is the default guide)."""
    rewards = {r["name"]: r for r in registered if r.get("kind") != "guide"}
    guides = {r["name"]: r for r in registered if r.get("kind") == "guide"}
    default_reward = next((n for n, r in rewards.items() if r.get("default")), None)
    default_guide = next(iter(guides), None)
    for label, alignment in cfg.strategies.items():
        reward_names, guide_names = guides_of(alignment)
        steering = ([(n or default_reward, rewards) for n in reward_names]
                    + [(n or default_guide, guides) for n in guide_names])
        for name, listing in steering:
            if name is None:
                continue
            if name == judge_name or same_checkpoint(judge_path, listing.get(name, {})):
                kind = "guides" if listing is guides else "rewards"
                raise ValueError(f"the judge {judge_name!r} also guides strategy {label!r} "
                                 f"(as the server's {kind[:-1]} {name!r}): pick a different judge")


def request(http: httpx.Client, cfg: QualityConfig, answer: Answer, alignment: dict) -> Answer:
    """One chat request (retried once on failure); its latency is the successful attempt's."""
    messages = [{"role": "user", "content": answer.prompt}]
    if cfg.system:
        messages.insert(0, {"role": "system", "content": cfg.system})
    body = {"model": cfg.model, "messages": messages,
            "max_tokens": cfg.max_tokens, "seed": answer.seed, "temperature": cfg.temperature}
    if alignment:
        body["alignment"] = alignment
    for _attempt in range(RETRIES + 1):
        start = time.perf_counter()
        try:
            r = http.post(f"{cfg.base_url}/chat/completions", json=body)
        except httpx.HTTPError as exc:
            answer.error = f"{type(exc).__name__}: {exc}"
            continue
        answer.latency_s = time.perf_counter() - start
        if not r.is_success:
            answer.error = f"HTTP {r.status_code}: {r.text[:300]}"
            continue
        data = r.json()
        answer.text = data["choices"][0]["message"]["content"] or ""
        answer.tokens = data["usage"]["completion_tokens"]
        answer.refusal, answer.strict_refusal = declined(answer.text), refused(answer.text)
        answer.report = {k: v for k, v in (data.get("alignment") or {}).items() if k != "candidates"} or None
        answer.error = None
        return answer
    answer.latency_s = 0.0
    return answer


def collect(cfg: QualityConfig, progress=None, transport: httpx.BaseTransport | None = None) -> list[Answer]:
    """Every (set, prompt, arm), `cfg.concurrency` requests at a time. The arms of a prompt
    are queued one after another, so they run under the same load; each prompt's seed is
    `seed + i` whatever the order of completion. `transport`: tests answer without a server."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
    jobs = [Answer(set_name, prompt, label, cfg.seed + i)
            for set_name, prompts in cfg.prompt_sets.items()
            for i, prompt in enumerate(prompts)
            for label in cfg.strategies]

    def run(answer: Answer) -> Answer:
        done = request(http, cfg, answer, cfg.strategies[answer.strategy])
        if progress is not None:
            progress.update(1)
        return done

    limits = httpx.Limits(max_connections=max(cfg.concurrency, 1) + 2)
    with httpx.Client(timeout=900, headers=headers, limits=limits, transport=transport) as http, \
            ThreadPoolExecutor(max_workers=max(cfg.concurrency, 1)) as pool:
        return list(pool.map(run, jobs))


def dump(answers: list[Answer], summary: dict, path: Path, config: dict | None = None) -> None:
    payload = {"config": config or {}, "summary": summary, "answers": [a.__dict__ for a in answers]}
    path.write_text(json.dumps(payload, indent=2))
