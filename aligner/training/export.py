"""`aligner export-rm MODEL_DIR OUT_DIR`: a trained reward model as one plain checkpoint.

What `aligner train` writes is often a peft adapter and a reward head over a base named in
`aligner_base.json`; serving it elsewhere (vLLM's pooling runner, another server) needs one
ordinary Hugging Face `AutoModelForSequenceClassification` directory. The export merges the
adapter and head into the base's weights (as the server loads them), writes the tokenizer with
its chat template, and carries the files that say how pairs are laid out and scaled:
`aligner_reward.json` (kind, layout, max length; the export is its own base), `reward_stats.json`,
`eval.json` and the model card. It is written beside OUT_DIR and moved into place whole.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from decoding.model_refs import REWARD_META_FILE, load_sequence_classifier

CARRIED = ("reward_stats.json", "eval.json", "README.md")


def export_reward_model(model_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write `model_dir`'s reward model to `out_dir` as a standalone checkpoint; returns it.
    float32 by default: what `eval-rm` measured the shipped models' accuracy in."""
    source, out = Path(model_dir), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory")
    model, tokenizer = load_sequence_classifier(source, dtype=dtype)
    partial = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    partial.mkdir(parents=True)
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        meta = source / REWARD_META_FILE
        if meta.is_file():
            record = {k: v for k, v in json.loads(meta.read_text()).items() if k != "base"}
            (partial / REWARD_META_FILE).write_text(json.dumps({**record, "exported_from": source.name}, indent=2) + "\n")
        for name in CARRIED:
            if (source / name).is_file():
                shutil.copy2(source / name, partial / name)
        if out.exists():
            out.rmdir()  # empty, checked above
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out
