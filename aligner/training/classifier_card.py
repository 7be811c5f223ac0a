"""The model card (README.md) of a request classifier, rendered from its `eval.json` record."""

from __future__ import annotations

from typing import Any

_HYPER = ("epochs", "batch_size", "learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "max_length",
          "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "val_fraction", "max_val_fpr", "seed")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _count(m: dict[str, Any]) -> str:
    return f"{m['flagged']} / {m['n']} ({_pct(m['rate'])})"


def source_lines(data: dict[str, Any]) -> str:
    """One line per training source: its class, its distinct texts and what was dropped from it."""
    return "\n".join(
        f"- `{source}` ({s['class']}): {s['prompts']} distinct {'pairs' if data.get('pairs') else 'prompts'}"
        + (f", {s['in_report_sets']} dropped because a report set holds them" if s["in_report_sets"] else "")
        + (f", {s['excluded']} dropped because an exclusion list holds them" if s.get("excluded") else "")
        for source, s in data["sources"].items()
    )


def render_classifier_card(name: str, record: dict[str, Any]) -> str:
    config, train, data = record["config"], record["train"], record["data"]
    val, threshold = record.get("validation"), record.get("threshold")
    sources = source_lines(data)
    if data.get("pairs"):
        head = (
            f"# {name}\n\nAn answer classifier for an output rail (\"does this answer serve a harmful request?\"), "
            f"trained with `aligner train-classifier` on (request, answer) pairs, base `{config['base']}`: LoRA "
            "adapter + a one-output head, class-weighted binary cross-entropy. Its score is the raw logit of "
            "\"harmful\" for the pair (request, answer or a window of it), encoded as the server encodes a reward "
            "model's (prompt, response) pair (`aligner.rewards.encoding.PairEncoder`, layout and length in "
            "`aligner_reward.json`). `alignment.rail` (`aligner.rail`) scores a window of the answer with it.")
        unit = "pairs"
    else:
        head = (
            f"# {name}\n\nA request classifier (\"is this request harmful?\"), trained with `aligner train-classifier` "
            f"on base `{config['base']}`: LoRA adapter + a one-output head, class-weighted binary cross-entropy. "
            "Its score is the raw logit of \"harmful\" for the pair (request, empty response), encoded as the server "
            "encodes a reward model's (prompt, response) pair (`aligner.rewards.encoding.PairEncoder`, layout and "
            "length in `aligner_reward.json`): score the request with response `\"\"`.")
        unit = "prompts"
    sections = [
        head,
        f"`aligner serve --models-dir` registers it as the reward `{name}` (kind `classifier`: never the default "
        "reward). Flag a request (or an answer) when its score is >= the threshold"
        + (f" **{threshold:.4f}** (logit units, `threshold` in `aligner_reward.json`)." if threshold is not None else "."),
        f"## Data\n\n{sources}\n\n"
        f"- training: {data['positive']['train']} harmful, {data['negative']['train']} benign {unit}; "
        f"validation: {data['positive']['val']} harmful, {data['negative']['val']} benign "
        f"(a seeded {config['val_fraction']:g} of each class, by a hash of the text); "
        f"{data['in_both_classes']} prompts in both classes left out."
        + (f"\n- wrapped copies: every training and validation prompt of both classes also once inside one of "
           f"{data['wrappers']['templates']} jailbreak-style wrappers (`{data['wrappers']['file']}`, chosen by a seeded "
           "hash; counted in the numbers above), so a wrapper cannot tell the classes apart; report sets never wrapped."
           if data.get("wrappers") else ""),
        f"## Training\n\n- {train['steps']} steps ({train['epochs_run']} epochs), kept epoch {train['best_epoch']} "
        f"(lowest validation loss; per epoch: {train['val_loss_per_epoch']})\n"
        f"- time: {train['seconds']:.0f} s on {train['hardware']}\n"
        f"- trainable parameters: {train['trainable_params']}, class weights {train['class_weights']}\n"
        + "\n".join(f"- `{k}`: {config[k]}" for k in _HYPER),
    ]
    if val is not None:
        sections.append(
            f"## Validation (chooses the epoch and the threshold)\n\nThreshold rule: the {record['threshold_rule']} "
            "(candidates: the validation scores).\n\n"
            f"- AUC: {val['auc']:.4f}, accuracy at the threshold: {_pct(val['accuracy'])}\n"
            f"- harmful flagged (recall): {_count(val['recall'])}\n"
            f"- benign flagged (false positives): {_count(val['false_positives'])}"
        )
    if record.get("held_out"):
        rows = "\n".join(
            f"| `{source}` | {m['class']} | {_count(m)} | "
            + ("recall" if m["class"] == "positive" else "false-positive rate") + " |"
            for source, m in record["held_out"].items()
        )
        sections.append(
            "## Held-out report (never trained on, never used to choose)\n\n"
            "| set | class | flagged at the threshold | reads as |\n| --- | --- | --- | --- |\n" + rows
        )
    notes = config.get("card_notes", []) + record.get("notes_after_training", [])  # the latter: added by hand
    if notes:
        sections.append("## Notes\n\n" + "\n".join(f"- {note}" for note in notes))
    sections.append(f"## Command\n\n```\n{record.get('command', '')}\n```")
    return "\n\n".join(sections) + "\n"
