"""A short model card (README.md) for a trained reward model: what, on what, how well, how."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from aligner.training.config import RewardTrainingConfig

_HYPER = (
    "max_steps", "epochs", "batch_size", "grad_accum", "learning_rate", "lr_scheduler", "warmup_ratio",
    "weight_decay", "max_length", "max_pairs", "balance_length", "balance_generator", "anchor_generator",
    "anchor_margin", "min_strength", "margin_scale", "beta", "lora", "lora_r", "lora_alpha", "lora_dropout",
    "lora_targets", "lora_layers", "seed", "val_fraction", "max_val_pairs",
)


def _applies(key: str, config: RewardTrainingConfig) -> bool:
    """Settings that mean nothing for this run stay off the card."""
    if key == "beta":
        return config.kind == "arm"
    if key == "anchor_margin":
        return config.anchor_generator is not None
    return True


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def accuracy_table(report: dict[str, Any]) -> str:
    lines = [
        "| source | pairs | accuracy | length baseline | length-controlled acc. (pairs) | mean score gap |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    rows = list(report.get("sources", {}).items())
    if len(rows) > 1:
        rows.append(("**all**", report))
    for name, m in rows:
        gap = "-" if m.get("mean_score_gap") is None else f"{m['mean_score_gap']:.3f}"
        lines.append(
            f"| {name} | {m['n']} | {_pct(m['accuracy'])} | {_pct(m['length_baseline'])} | "
            f"{_pct(m['length_controlled_accuracy'])} ({m['n_length_controlled']}) | {gap} |"
        )
    return "\n".join(lines)


def write_model_card(
    output: Path,
    config: RewardTrainingConfig,
    *,
    stats: dict[str, Any],
    train_info: dict[str, Any],
    report: dict[str, Any] | None,
    command: str,
    split: dict[str, Any] | None = None,
) -> Path:
    kind = {
        "bt": "sequence reward model (one output, Bradley-Terry loss)",
        "arm": f"autoregressive reward model (GenARM): r(x, y) = {config.beta} * sum_t log p(y_t | x, y_<t)",
    }[config.kind]
    settings = asdict(config)
    hyper = "\n".join(f"- `{k}`: {settings[k]}" for k in _HYPER if _applies(k, config))
    data = "\n".join(
        f"- `{name}` ({s['path']}): {s['rows']} rows, {s['usable']} usable, "
        f"{s['train']} train pairs, {s['val']} validation pairs"
        + (f"; skipped: {s['bad']}" if s["bad"] else "")
        for name, s in stats.items()
    )
    notes = "\n".join(f"- {note}" for note in config.card_notes)
    sections = [
        f"# {output.name}\n\nA {kind}, trained with `aligner train` on base `{config.base}`.",
        "Load it with `decoding.model_refs."
        + ("load_sequence_classifier" if config.kind == "bt" else "load_causal_lm")
        + f"(path)`. Files: a {'LoRA adapter and the trained head' if config.lora else 'full checkpoint'}, "
        "`aligner_base.json` (the base), `aligner_reward.json` (kind, beta, max_length), `eval.json`.",
        f"## Data\n\n{data}",
        "Validation holds out a seeded fraction of each file's distinct prompts (no validation "
        "prompt appears in training).",
        f"## Training\n\n- steps: {train_info.get('steps')}, pairs seen: {train_info.get('pairs_seen')}, "
        f"time: {train_info.get('seconds', 0):.0f} s on {train_info.get('hardware')}"
        + (f" (this run, resumed from {train_info['resumed_from']})" if train_info.get("resumed_from") else "")
        + "\n"
        f"- trainable parameters: {train_info.get('trainable_params')}, final training loss: "
        f"{train_info.get('train_loss')}\n{hyper}",
    ]
    if report is not None:
        sections.append(
            "## Validation\n\n" + accuracy_table(report) + "\n\nLength-controlled accuracy counts only "
            "the pairs whose chosen answer is not the longer one (in characters)."
            + (
                f" Scored again after training by `aligner eval-rm --split {split['split']}` (seed {split['seed']}, "
                f"fraction {split['val_fraction']}, up to {split['max_val_pairs']} pairs per file)."
                if split else ""
            )
        )
        if "log_ratio" in report:
            sections.append(
                "### Scored by the log-probability ratio to the base\n\n" + accuracy_table(report["log_ratio"])
                + f"\n\nScore: {config.beta} * sum_t (log p(y_t | x, y_<t) - log p_base(y_t | x, y_<t))."
            )
    if notes:
        sections.append(f"## Notes\n\n{notes}")
    sections.append(f"## Command\n\n```\n{command}\n```")
    path = output / "README.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path


def render_card(model_dir: Path, record: dict[str, Any], command: str | None = None, notes: list[str] | None = None) -> Path:
    """README.md from a training record (what `eval.json` holds: metrics, data, train, config, command)."""
    known = RewardTrainingConfig.__dataclass_fields__
    config = RewardTrainingConfig(**{k: v for k, v in record["config"].items() if k in known})
    if notes is not None:
        config.card_notes = notes
    report = {k: v for k, v in record.items() if k not in ("data", "train", "config", "command", "split")}
    return write_model_card(
        model_dir,
        config,
        stats=record["data"],
        train_info=record["train"],
        report=report if "accuracy" in report else None,
        command=command or record.get("command", ""),
        split=record.get("split"),
    )
