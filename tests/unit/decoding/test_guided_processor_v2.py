"""The guided-decoding bookkeeping of vLLM's Model Runner V2, simulated: fake logits, requests
entering recycled slots without a removal call, rows reordered every step, token history in a
runner-style buffer with the fed token only in `input_ids`; every row checked against the
from-scratch reference of the V1 tests. No engine, no GPU."""

from __future__ import annotations

import random

import pytest
import torch

from decoding.guided_processor_v2 import GuidedSlots
from decoding.vllm_config import GUIDED_PROCESSOR, GUIDED_PROCESSOR_V2, guided_processor_for
from tests.unit.decoding.test_guided_processor import VOCAB, guide_set, models, random_spec, reference  # noqa: F401

MAX_REQS, MAX_LEN = 8, 128


class Runner:
    """What the V2 model runner shows a processor: slots, a history buffer, rows per step."""

    def __init__(self, slots: GuidedSlots):
        self.processor = slots
        self.history = torch.zeros(MAX_REQS, MAX_LEN, dtype=torch.int64)  # committed tokens per slot
        self.requests: dict[int, dict] = {}  # slot -> {"spec", "tokens"} (tokens: the whole sequence)

    def add(self, slot: int, spec, prompt: list[int]) -> bool:
        self.requests[slot] = {"spec": spec, "tokens": list(prompt)}
        self.history[slot, :len(prompt)] = torch.tensor(prompt)
        return self.processor.add(slot, {"aligner_guide": spec} if spec else None)

    def step(self, scheduled: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step over `scheduled` slots in that row order: (base, guided) logits."""
        fed = torch.tensor([self.requests[s]["tokens"][-1] for s in scheduled])
        lens = [len(self.requests[s]["tokens"]) for s in scheduled]

        def read(slot, row, start, end):
            # Only tokens before the fed one are committed; the fed one is in input_ids.
            assert end == lens[row] and start < end
            return self.history[slot, start:end - 1].tolist() + [int(fed[row])]

        base = torch.randn(len(scheduled), VOCAB)
        return base, self.processor.apply(base.clone(), scheduled, lens, read)

    def commit(self, slot: int, token: int) -> None:
        tokens = self.requests[slot]["tokens"]
        self.history[slot, len(tokens) - 1] = tokens[-1]  # the fed token is committed a step later
        tokens.append(token)


def sampled(row_logits: torch.Tensor) -> int:
    return int(torch.where(torch.isfinite(row_logits), row_logits, -1e9).argmax())


def test_recycled_slots_and_reordered_rows_keep_every_row_aligned(models):
    rng = random.Random(0)
    torch.manual_seed(1)
    runner = Runner(GuidedSlots(guide_set(models)))
    live: set[int] = set()
    for step in range(40):
        for slot in list(live):
            if rng.random() < 0.15:
                live.discard(slot)  # finished: V2 says nothing; the slot is simply reused later
        for slot in range(MAX_REQS):
            if slot not in live and rng.random() < 0.3:
                spec = random_spec(rng)
                guided = runner.add(slot, spec, [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 6))])
                assert guided == (spec is not None)
                live.add(slot)
        scheduled = [s for s in live if rng.random() < 0.9]  # a running request may sit a step out
        rng.shuffle(scheduled)
        base, out = runner.step(scheduled)
        for row, slot in enumerate(scheduled):
            request = runner.requests[slot]
            expected = reference(models, request["spec"], request["tokens"], base[row])
            torch.testing.assert_close(out[row], expected, rtol=1e-4, atol=1e-4, msg=f"step {step} slot {slot}")
            runner.commit(slot, sampled(out[row]))


def test_guide_slots_of_finished_requests_are_reclaimed_when_needed(models):
    runner = Runner(GuidedSlots(guide_set(models, max_slots=2)))
    spec = {"guide": "arm", "mode": "genarm", "alpha": 1.0}
    for slot in (0, 1):
        runner.add(slot, spec, [3, 4])
    runner.step([0, 1])
    # Both guide slots are held; 0 and 1 finish (never re-added), 2 and 3 arrive.
    for slot in (2, 3):
        runner.add(slot, spec, [5, 6, 7])
    base, out = runner.step([3, 2])
    for row, slot in enumerate([3, 2]):
        expected = reference(models, spec, runner.requests[slot]["tokens"], base[row])
        torch.testing.assert_close(out[row], expected, rtol=1e-4, atol=1e-4)
    assert all(runner.processor.state.rows[s].disabled is None for s in (2, 3))
    # A reclaimed request that comes back rebuilds its guide cache from its history.
    runner.commit(2, 9)
    base, out = runner.step([0])
    torch.testing.assert_close(out[0], reference(models, spec, runner.requests[0]["tokens"], base[0]),
                               rtol=1e-4, atol=1e-4)


def test_unguided_batches_pass_through_untouched(models):
    runner = Runner(GuidedSlots(guide_set(models)))
    assert runner.add(0, None, [1, 2]) is False
    base, out = runner.step([0])
    assert torch.equal(base, out)


@pytest.mark.parametrize("device, env, expected", [
    ("cuda", None, GUIDED_PROCESSOR_V2), ("cpu", None, GUIDED_PROCESSOR),
    ("cuda", "0", GUIDED_PROCESSOR), ("cpu", "1", GUIDED_PROCESSOR_V2),
])
def test_the_processor_class_follows_the_model_runner(monkeypatch, device, env, expected):
    if env is None:
        monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    else:
        monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", env)
    assert guided_processor_for(device) == expected


def test_the_v2_class_is_a_v2_logits_processor():
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor

    from decoding import guided_processor_v2

    assert issubclass(guided_processor_v2.RewardGuidedLogitsProcessorV2, LogitsProcessor)


@pytest.mark.parametrize("device, processor, async_off", [("cpu", GUIDED_PROCESSOR, True),
                                                         ("cuda", GUIDED_PROCESSOR_V2, False)])
def test_the_engine_registers_the_runners_processor_and_keeps_async_scheduling_where_it_can(
        monkeypatch, device, processor, async_off):
    from decoding.guide_spec import GuideCatalog
    from decoding.vllm_config import VLLMEngineConfig

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    guides = GuideCatalog({"arm": {"path": "/unused", "mode": "genarm"}})
    args = VLLMEngineConfig(model="unused", guides=guides).engine_args(device)
    assert args.logits_processors == [processor]
    assert (args.async_scheduling is False) is async_off
