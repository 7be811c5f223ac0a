"""Engine-neutral settings and outputs to and from vLLM's: `SamplingConfig` -> `SamplingParams`,
a `RequestOutput` in delta mode -> `GenerationChunk`."""

from __future__ import annotations

from decoding.engine import (
    GenerationChunk,
    InvalidRequestError,
    SamplingConfig,
    SequenceDelta,
    StructuredOutput,
    TokenLogprob,
    TopLogprob,
)


def to_sampling_params(sampling: SamplingConfig):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import RequestOutputKind

    try:
        return SamplingParams(
            n=sampling.n,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            logprobs=sampling.logprobs,
            ignore_eos=sampling.ignore_eos,
            extra_args=sampling.extra_args,
            structured_outputs=_structured_outputs(sampling.structured),
            logit_bias=dict(sampling.logit_bias) if sampling.logit_bias else None,
            min_tokens=sampling.min_tokens,
            min_p=sampling.min_p,
            repetition_penalty=sampling.repetition_penalty,
            stop_token_ids=list(sampling.stop_token_ids) or None,
            include_stop_str_in_output=sampling.include_stop_str_in_output,
            output_kind=RequestOutputKind.DELTA,
        )
    except (VLLMValidationError, ValueError) as exc:
        raise InvalidRequestError(str(exc), getattr(exc, "parameter", None)) from exc


def _structured_outputs(structured: StructuredOutput | None):
    if structured is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(
        json=structured.json, json_object=structured.json_object or None, regex=structured.regex,
        choice=list(structured.choice) if structured.choice is not None else None, grammar=structured.grammar,
    )


def to_chunk(out, *, top_k: int | None) -> GenerationChunk:
    """vLLM `RequestOutput` (delta mode) -> `GenerationChunk`."""
    sequences = []
    for o in out.outputs:
        finish = o.finish_reason if o.finish_reason in ("stop", "length", "abort") else None
        if o.finish_reason is not None and finish is None:
            finish = "stop"
        sequences.append(
            SequenceDelta(
                index=o.index,
                text=o.text,
                token_ids=list(o.token_ids),
                logprobs=_logprobs(o.token_ids, o.logprobs, top_k) if top_k is not None else None,
                finish_reason=finish,
            )
        )
    return GenerationChunk(
        prompt_tokens=len(out.prompt_token_ids or ()),
        sequences=sequences,
        finished=out.finished,
        cached_tokens=out.num_cached_tokens or 0,
    )


def _logprobs(token_ids, positions, k: int) -> list[TokenLogprob]:
    result = []
    for token_id, position in zip(token_ids, positions or ()):
        position = position or {}
        chosen = position.get(token_id)
        top = sorted(
            (lp for lp in position.values() if lp.rank is not None and lp.rank <= k),
            key=lambda lp: lp.rank,
        )
        result.append(
            TokenLogprob(
                token_id=token_id,
                token=(chosen.decoded_token if chosen else None) or "",
                logprob=chosen.logprob if chosen else float("-inf"),
                top=tuple(TopLogprob(lp.decoded_token or "", lp.logprob) for lp in top),
            )
        )
    return result
