"""Token-level reward-guided decoding as a logits processor of vLLM's Model Runner V2 (CUDA).

The guide computation is `decoding.guided_processor.GuidedState`'s, shared with the V1
processor the CPU build runs; only the bookkeeping differs. V2 keys a request by its slot in
the runner's persistent buffers (`add_request(slot, params)`; slots are recycled without a
removal call), reorders logits rows every step (`LogitsContext.idx_mapping_np`: row -> slot),
and keeps token history on the device (`LogitsProcRequestState.all_token_ids`). Each step a
guided row's sequence is read up to the token being fed: the committed tokens before it from
`all_token_ids`, the fed token itself from `LogitsContext.input_ids`. Both are written on the
device in stream order (the runner appends sampled tokens to `all_token_ids` after each
step), so the guide never waits for an output list to catch up and the engine keeps vLLM's
async scheduling on.

A finished request's guide slot is held until its runner slot is reused, or reclaimed when a
new guided row needs one and none is free (a request reclaimed while still alive rebuilds
its guide cache from its history when it is next scheduled). Speculative decoding (several
rows per request) is not guided: such steps pass through unchanged, with an error logged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from decoding.guide_spec import CONFIG_KEY
from decoding.guided_processor import GuidedState, GuideSet, load_guides, logger, warm_up

# (slot, row, start, end) -> the request's tokens [start, end); end - 1 is the row's fed token.
ReadTokens = Callable[[int, int, int, int], list[int]]


class GuidedSlots:
    """V2 bookkeeping around `GuidedState`, independent of vLLM so that tests can drive it
    with fake logits, recycled slots and reordered rows."""

    def __init__(self, guides: GuideSet, report_dir: str | None = None):
        # Rows of the shared state are keyed by runner slot; `outputs` is the request's whole
        # sequence so far (prompt included), extended each step from the runner's buffers.
        self.state = GuidedState(guides, report_dir)

    def add(self, slot: int, extra_args: dict | None) -> bool:
        """A request enters `slot` (replacing whoever held it); whether it is guided."""
        self.state.add(slot, extra_args, [], [])
        return slot in self.state.rows

    def apply(self, logits: torch.Tensor, slots: Sequence[int], seq_lens: Sequence[int],
              read: ReadTokens) -> torch.Tensor:
        """logits: (rows, vocab); `slots[row]` is the row's request slot and `seq_lens[row]`
        its sequence length including the token fed this step."""
        rows = self.state.rows
        guided = [(row, slot) for row, slot in enumerate(slots) if slot in rows and rows[slot].disabled is None]
        if not guided:
            return logits
        for row, slot in guided:
            request, length = rows[slot], int(seq_lens[row])
            if length < len(request.outputs):  # a recomputed request came back shorter: start over
                self._forget(request)
                request.outputs.clear()
            if length > len(request.outputs):
                request.outputs.extend(read(slot, row, len(request.outputs), length))
        self._reclaim(guided, set(slots))
        self.state.rows = {row: rows[slot] for row, slot in guided}
        try:
            return self.state.apply(logits)
        finally:
            self.state.rows = rows

    def _forget(self, request) -> None:
        if request.slot is not None:
            self.state.guides.decoders[request.guide].release(request.slot)
        request.slot, request.consumed = None, 0

    def _reclaim(self, guided: list[tuple[int, int]], scheduled: set[int]) -> None:
        """Free guide slots held by requests not in this step (finished, most likely) when the
        step's new guided rows need more than are free."""
        for name, decoder in self.state.guides.decoders.items():
            needed = sum(1 for _, slot in guided
                         if self.state.rows[slot].guide == name and self.state.rows[slot].slot is None)
            if needed <= decoder.free_slots:
                continue
            for slot, request in self.state.rows.items():
                if needed <= decoder.free_slots:
                    break
                if slot not in scheduled and request.guide == name and request.slot is not None:
                    self._forget(request)


def _load_processor_class():
    """The vLLM-facing class, built lazily so importing this module needs no vLLM."""
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor

    class RewardGuidedLogitsProcessorV2(LogitsProcessor):
        # Requests are validated by the server (the `guided` strategy) before they get here;
        # anything malformed that still arrives is decoded unguided, never a crash.

        def __init__(self, vllm_config, req_states):
            config = (vllm_config.additional_config or {}).get(CONFIG_KEY) or {}
            self.req_states = req_states
            guides = load_guides(config, req_states.device) if config else GuideSet()
            if torch.device(req_states.device).type == "cuda":
                warm_up(guides, req_states.vocab_size, req_states.device)
            self.slots = GuidedSlots(guides, config.get("report_dir"))
            self._warned_spec = False

        def add_request(self, req_idx: int, sampling_params) -> bool:
            return self.slots.add(req_idx, sampling_params.extra_args if sampling_params else None)

        def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
            slots = ctx.idx_mapping_np.tolist()  # on the host: no device sync for unguided steps
            if not any(slot in self.slots.state.rows for slot in slots):
                return logits
            if logits.shape[0] != len(slots):
                if not self._warned_spec:
                    self._warned_spec = True
                    logger.error("guided requests run unguided under speculative decoding")
                return logits
            history = self.req_states.all_token_ids.gpu
            fed = ctx.input_ids

            def read(slot: int, row: int, start: int, end: int) -> list[int]:
                committed = history[slot, start:end - 1].tolist() if end - 1 > start else []
                return committed + [int(fed[row])]

            return self.slots.apply(logits, slots, ctx.seq_lens_upper_bound_np.tolist(), read)

    RewardGuidedLogitsProcessorV2.__qualname__ = "RewardGuidedLogitsProcessorV2"
    return RewardGuidedLogitsProcessorV2


def __getattr__(name: str):
    # `decoding.guided_processor_v2.RewardGuidedLogitsProcessorV2` is what vLLM loads by name.
    if name == "RewardGuidedLogitsProcessorV2":
        cls = _load_processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
