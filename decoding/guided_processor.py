"""Token-level reward-guided decoding as a vLLM V1 logits processor.

Registered at engine build when guides are configured; a request opts in through
`SamplingParams.extra_args["aligner_guide"] = {"guide": NAME, "mode": "genarm"|"args", ...}`.
Unguided rows are never touched, so they pay nothing but a dictionary lookup.

- genarm: logits <- (1 + α) · (logits + α · log_softmax(guide logits)); vLLM then divides
  by the request temperature T, i.e. samples at T / (1 + α) (GenARM, Xu et al. 2025).
- args: the top-k tokens of the base logits are scored by a causal reward model on
  (prefix + token); logits <- logit + w · reward there and -inf elsewhere (ARGS, Khanov
  et al. 2024). The k candidates of all guided rows are scored in one forward that reads
  each request's cached prefix once.

State: one guide KV-cache slot per guided request (`SlotDecoder`), appended with the tokens
the engine accepted since the previous step. The request's output-token list is a live
reference; with async scheduling it can lag one step, which would desynchronise guide and
policy, so engines built with guides turn async scheduling off, and a lagging row is
detected and left unguided for that step rather than guided wrongly. (On CUDA, vLLM's Model
Runner V2 runs `decoding.guided_processor_v2`, which reads the runner's device buffers.)
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

import torch

from kernels.guide_combine import guide_combine
from kernels.topk_combine import topk_reward_combine

# A child of vLLM's logger: inside the engine process only vLLM's logging is configured.
logger = logging.getLogger("vllm.aligner.guided")

from decoding.guide_spec import CONFIG_KEY, EXTRA_ARGS_KEY, REPORT_KEY, write_guide_report


def guide_request(extra_args: dict | None) -> dict | None:
    return (extra_args or {}).get(EXTRA_ARGS_KEY)


@dataclass
class RowState:
    guide: str
    mode: str
    alpha: float
    k: int
    weight: float
    prompt: list[int]
    outputs: list[int]  # live reference to the engine's output-token list
    slot: int | None = None
    consumed: int = 0  # tokens of prompt + outputs already in the guide cache
    disabled: str | None = None  # why guidance was dropped for this request
    report: str | None = None  # this row's report file (None: the request asked for none)
    lagged_steps: int = 0  # steps left unguided because the output list lagged


@dataclass
class GuideSet:
    """The loaded guides and their slot caches, shared by all rows."""

    decoders: dict[str, object] = field(default_factory=dict)  # name -> SlotDecoder
    modes: dict[str, str] = field(default_factory=dict)


def load_guides(config: dict, device) -> GuideSet:
    """`config`: {"guides": {name: {"path", "mode"}}, "max_slots", "max_len", "dtype", "quantization"}."""
    from decoding.model_refs import load_causal_lm, load_sequence_classifier
    from decoding.guide_model import SlotDecoder

    from kernels._dispatch import use_triton

    dtype = getattr(torch, config.get("dtype", "float32"))
    guides = GuideSet()
    kernels = "triton" if use_triton(torch.empty(0, device=device)) else "torch"
    logger.info("guide kernels: %s (%d torch threads)", kernels, torch.get_num_threads())
    quantize = config.get("quantization") == "int8"
    for name, spec in config.get("guides", {}).items():
        loader = load_sequence_classifier if spec["mode"] == "args" else load_causal_lm
        model, _ = loader(spec["path"], dtype=dtype)
        guides.decoders[name] = SlotDecoder(model, config.get("max_slots", 16), config.get("max_len", 2048), dtype,
                                            str(device), quantize=quantize)
        guides.modes[name] = spec["mode"]
        logger.info("guide %s (%s%s) loaded from %s", name, spec["mode"], ", int8 projections" if quantize else "",
                    spec["path"])
    return guides


# ARGS candidate counts the warm-up runs: they cover every row-tile size the candidate
# attention kernel compiles (16, 32, 64 rows) whatever a guide's head grouping.
WARM_UP_K = (1, 2, 4, 8, 16, 32, 64)


def warm_up(guides: GuideSet, vocab_size: int, device) -> None:
    """One guided step of each guide (each ARGS candidate count) on dummy logits, so that the
    Triton kernels compile at start, not inside the first guided request's engine step. Leaves
    no state behind: every slot is released."""
    for name, mode in guides.modes.items():
        for k in WARM_UP_K if mode == "args" else (1,):
            k = min(k, vocab_size)
            state = GuidedState(guides)
            state.add(0, {EXTRA_ARGS_KEY: {"guide": name, "mode": mode, "alpha": 1.0, "k": k}}, [0, 1], [])
            state.apply(torch.zeros(1, vocab_size, device=device))
            state.remove(0)


class GuidedState:
    """Batch bookkeeping and the per-step guide computation, independent of vLLM so that
    tests can drive it with fake logits and simulated batch updates."""

    def __init__(self, guides: GuideSet, report_dir: str | None = None):
        self.guides = guides
        self.report_dir = report_dir
        self.rows: dict[int, RowState] = {}

    def _unguided(self, index: int, row: RowState, reason: str, stop: bool) -> None:
        """Record a step (or, with `stop`, the rest of the answer) decoded without the guide,
        and tell the server: its response must not claim steps that were not guided."""
        if stop:
            row.disabled = reason
            logger.error("guided request at row %d runs unguided: %s", index, reason)
        else:
            row.lagged_steps += 1
            logger.warning("guided request at row %d: %s; this step is unguided", index, reason)
        if row.report is None or self.report_dir is None:
            return
        report = {"lagged_steps": row.lagged_steps, "reason": reason, "stopped": row.disabled is not None,
                  "outputs_at_stop": list(row.outputs) if row.disabled is not None else None}
        try:
            write_guide_report(self.report_dir, row.report, report)
        except OSError as exc:  # a full disk must not take the engine down
            logger.error("cannot write guide report %s: %s", row.report, exc)

    # ------------------------------------------------------------------ batch updates

    def _drop(self, index: int) -> None:
        row = self.rows.pop(index, None)
        if row is not None and row.slot is not None:
            self.guides.decoders[row.guide].release(row.slot)

    def remove(self, index: int) -> None:
        self._drop(index)

    def add(self, index: int, extra_args: dict | None, prompt: list[int] | None, outputs: list[int]) -> None:
        self._drop(index)  # an added request may replace one at the same index
        spec = guide_request(extra_args)
        if spec is None:
            return
        report = spec.get(REPORT_KEY)
        row = RowState(
            guide=spec.get("guide"), mode=spec.get("mode"), alpha=float(spec.get("alpha", 1.0)),
            k=int(spec.get("k", 10)), weight=float(spec.get("weight", 1.0)), prompt=list(prompt or []),
            outputs=outputs, report=f"{report}-{uuid.uuid4().hex[:12]}" if isinstance(report, str) else None,
        )
        self.rows[index] = row
        if row.guide not in self.guides.decoders:
            self._unguided(index, row, f"unknown guide {row.guide!r}", stop=True)

    def move(self, a: int, b: int, swap: bool) -> None:
        row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
        if row_a is not None:
            self.rows[b] = row_a
        if swap and row_b is not None:
            self.rows[a] = row_b
        elif row_b is not None and row_b.slot is not None:
            self.guides.decoders[row_b.guide].release(row_b.slot)  # overwritten by a one-way move

    # ------------------------------------------------------------------ step

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: (batch, vocab) in the persistent batch's row order."""
        if not self.rows:
            return logits
        for name, decoder in self.guides.decoders.items():
            rows = {i: r for i, r in self.rows.items() if r.guide == name and r.disabled is None and i < logits.shape[0]}
            if not rows:
                continue
            new = self._catch_up(decoder, rows)
            if not new:
                continue
            index = sorted(new)
            appended = {rows[i].slot: new[i] for i in index}
            if self.guides.modes[name] == "genarm":
                hidden = decoder.append(appended)
                guided = [i for i in index if rows[i].alpha > 0]
                if guided:
                    h = torch.stack([hidden[rows[i].slot] for i in guided])
                    guide_logits = decoder.next_token_logits(h).to(logits.device)
                    alpha = torch.tensor([rows[i].alpha for i in guided], device=logits.device)
                    rows_t = torch.tensor(guided, device=logits.device)
                    logits[rows_t] = guide_combine(logits[rows_t], guide_logits, alpha)
            else:
                k = max(rows[i].k for i in index)
                rows_t = torch.tensor(index, device=logits.device)
                base = logits[rows_t]
                candidates = torch.topk(base, k, dim=-1).indices
                # The accepted tokens are appended and the candidates scored in one guide forward.
                rewards = decoder.append_and_score(appended, candidates.cpu()).to(logits.device)
                # Rows asking for fewer candidates drop their extra ones.
                keep = torch.arange(k, device=logits.device)[None, :] < torch.tensor([rows[i].k for i in index], device=logits.device)[:, None]
                rewards = rewards.masked_fill(~keep, 0.0)
                weight = torch.tensor([rows[i].weight for i in index], device=logits.device)
                combined = topk_reward_combine(base, candidates, rewards, weight)
                combined = combined.masked_fill(~self._mask_of(candidates, keep, base.shape[-1]), float("-inf"))
                logits[rows_t] = combined
        return logits

    @staticmethod
    def _mask_of(candidates: torch.Tensor, keep: torch.Tensor, vocab: int) -> torch.Tensor:
        mask = torch.zeros(candidates.shape[0], vocab, dtype=torch.bool, device=candidates.device)
        return mask.scatter_(1, candidates, keep)

    def _catch_up(self, decoder, rows: dict[int, RowState]) -> dict[int, list[int]]:
        """Allocate slots for new rows; collect, per row, the tokens not yet in its cache."""
        from decoding.guide_model import SlotsFull

        new = {}
        for i, row in rows.items():
            if row.slot is None:
                try:
                    row.slot = decoder.allocate()
                except SlotsFull as exc:
                    self._unguided(i, row, str(exc), stop=True)
                    continue
            sequence = row.prompt + list(row.outputs)
            if len(sequence) == row.consumed:
                if row.consumed:  # the output list did not grow: it lags (async scheduling)
                    self._unguided(i, row, "the guide state lags the engine", stop=False)
                continue
            if len(sequence) > decoder.max_len:
                self._unguided(i, row, f"sequence exceeds the guide's {decoder.max_len} tokens", stop=True)
                continue
            new[i] = sequence[row.consumed :]
            row.consumed = len(sequence)
        return new


def _load_processor_class():
    """The vLLM-facing class, built lazily so importing this module needs no vLLM."""
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

    class RewardGuidedLogitsProcessor(LogitsProcessor):
        # Requests are validated by the server (the `guided` strategy) before they get here;
        # anything malformed that still arrives is decoded unguided, never a crash.

        def __init__(self, vllm_config, device, is_pin_memory: bool):
            config = (vllm_config.additional_config or {}).get(CONFIG_KEY) or {}
            guides = load_guides(config, device) if config else GuideSet()
            if torch.device(device).type == "cuda":
                warm_up(guides, vllm_config.model_config.get_vocab_size(), device)
            self.state = GuidedState(guides, config.get("report_dir"))

        def is_argmax_invariant(self) -> bool:
            return False

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if not batch_update:
                return
            for index in batch_update.removed:
                self.state.remove(index)
            for index, params, prompt, outputs in batch_update.added:
                self.state.add(index, params.extra_args if params else None, prompt, outputs)
            for a, b, direction in batch_update.moved:
                self.state.move(a, b, direction == MoveDirectionality.SWAP)

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            return self.state.apply(logits)

    RewardGuidedLogitsProcessor.__qualname__ = "RewardGuidedLogitsProcessor"
    return RewardGuidedLogitsProcessor


def __getattr__(name: str):
    # `decoding.guided_processor.RewardGuidedLogitsProcessor` is what vLLM loads by name.
    if name == "RewardGuidedLogitsProcessor":
        cls = _load_processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
