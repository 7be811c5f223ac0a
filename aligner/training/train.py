"""Train a reward model end to end: data -> tokens -> (LoRA) model -> trainer -> save -> eval -> card.

`bt` runs TRL's `RewardTrainer` on pre-tokenized pairs (our encoder decides truncation and
layout, TRL the loss, margin, loop and checkpoints); `arm` runs `GenARMTrainer`. The saved
directory loads back through `decoding.model_refs` with nothing downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from decoding.model_refs import ADAPTER_CONFIG, BASE_REF_FILE, resolve_base
from aligner.training.config import RewardTrainingConfig
from aligner.training.evaluate import EVAL_FILE, REWARD_META

logger = logging.getLogger(__name__)


def base_reference(base: str) -> str:
    """What `aligner_base.json` records: named bases as given, directories as absolute paths."""
    if base == "default-policy" or base.startswith("package:"):
        return base
    return str(Path(base).resolve())


def _hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), {torch.get_num_threads()} torch threads"


def load_base_model(kind: str, base_dir: Path):
    """(model in float32, names of modules created by this load: the new reward head)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind == "bt":
        model, info = AutoModelForSequenceClassification.from_pretrained(
            base_dir, num_labels=1, dtype=torch.float32, output_loading_info=True
        )
    else:
        model, info = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=torch.float32, output_loading_info=True
        )
    new_modules = sorted({key.split(".")[0] for key in info.get("missing_keys", ())})
    return model, new_modules


def modules_to_save(model, new_modules: list[str]) -> list[str]:
    """The new head, plus an encoder's pooler: it feeds the head and was never trained for rewards."""
    names = list(new_modules)
    if any(name.split(".")[-1] == "pooler" for name, _ in model.named_modules()) and "pooler" not in names:
        names.append("pooler")
    return names


def _layer_index(name: str) -> int | None:
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def lora_target_modules(
    model, targets: str, exclude: list[str], last_layers: int | None = None
) -> list[str] | str:
    """LoRA targets: the named layers, or every linear layer outside `exclude` and the LM head.

    Returns leaf names when they pick exactly the wanted layers, else a full-match regex of
    their exact names: BERT's `dense` is also in the pooler, which is saved whole, and
    `last_layers` keeps only the top transformer blocks.
    """
    import torch.nn as nn

    head = model.get_output_embeddings()
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]

    def excluded(name: str) -> bool:
        return any(part in exclude for part in name.split("."))

    if targets == "all-linear":
        wanted = [n for n in linear if not excluded(n)]
    else:
        leaves = {t.strip() for t in targets.split(",") if t.strip()}
        wanted = [n for n in linear if n.rsplit(".", 1)[-1] in leaves]
    if last_layers:
        depth = model.config.get_text_config().num_hidden_layers
        indices = {n: _layer_index(n) for n in wanted}
        wanted = [n for n in wanted if indices[n] is not None and indices[n] >= depth - last_layers]
    if not wanted:
        raise ValueError(f"no linear layers match LoRA targets {targets!r}")
    leaves = {n.rsplit(".", 1)[-1] for n in wanted}
    if not last_layers and not any(n.rsplit(".", 1)[-1] in leaves for n in set(linear) - set(wanted)):
        return sorted(leaves)
    return "^(?:" + "|".join(re.escape(n) for n in wanted) + ")$"


def _disable_dropout(model) -> None:
    import torch.nn as nn

    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def _training_arguments(config: RewardTrainingConfig, cls, **extra):
    import torch

    return cls(
        output_dir=config.checkpoints,
        max_steps=config.max_steps,
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        # bf16 autocast on a CPU is slower and noisier than fp32; on a GPU it is the usual choice.
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False,
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
        **extra,
    )


def build_trainer(config: RewardTrainingConfig, model, tokenizer, train_dataset, peft_config):
    if config.kind == "bt":
        from trl import RewardConfig, RewardTrainer

        # Sequences are already cut to max_length by PairEncoder; TRL would drop, not cut.
        args = _training_arguments(config, RewardConfig, max_length=None, disable_dropout=True)
        return RewardTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    from peft import get_peft_model
    from transformers import TrainingArguments

    from aligner.training.genarm import GenARMTrainer
    from aligner.training.encoding import PairCollator

    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    _disable_dropout(model)
    args = _training_arguments(config, TrainingArguments, remove_unused_columns=False)
    return GenARMTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=PairCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        beta=config.beta,
    )


def _resume_point(config: RewardTrainingConfig) -> str | None:
    if config.resume is None:
        return None
    if config.resume != "last":
        return config.resume
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(config.checkpoints) if Path(config.checkpoints).is_dir() else None
    if last is None:
        logger.warning("no checkpoint in %s: starting from scratch", config.checkpoints)
    return last


def save_model(
    trainer, tokenizer, config: RewardTrainingConfig, output: Path, layout: str, max_length: int
) -> None:
    """Adapter (+ head) and `aligner_base.json`, or a full checkpoint; then `aligner_reward.json`."""
    output.mkdir(parents=True, exist_ok=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.save_pretrained(output)
    if config.lora:
        ref = base_reference(config.base)
        # The base path of this machine is meaningless elsewhere; record the portable reference.
        adapter_config = json.loads((output / ADAPTER_CONFIG).read_text())
        adapter_config["base_model_name_or_path"] = ref
        (output / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
        (output / BASE_REF_FILE).write_text(json.dumps({"base": ref}) + "\n")
    else:
        tokenizer.save_pretrained(output)
    meta = {
        "kind": config.kind,
        "max_length": max_length,
        "layout": layout,
        "base": base_reference(config.base),
    }
    if config.kind == "arm":
        meta["beta"] = config.beta
    (output / REWARD_META).write_text(json.dumps(meta, indent=2) + "\n")


def load_data(config: RewardTrainingConfig):
    """The preference pairs, split, filtered and balanced as the config asks."""
    from aligner.training.data import load_preference_data

    data = load_preference_data(
        config.data,
        seed=config.seed,
        val_fraction=config.val_fraction,
        max_val_pairs=config.max_val_pairs,
        max_pairs=config.max_pairs,
        balance_length=config.balance_length,
        balance_generator=config.balance_generator,
        min_strength=config.min_strength,
        anchor_generator=config.anchor_generator,
        anchor_margin=config.anchor_margin,
    )
    for name, s in data.stats.items():
        logger.info("%s: %d usable rows, %d train pairs, %d validation pairs", name, s.usable, s.train, s.val)
    return data


def load_model(config, kind: str | None = None):
    """(model, tokenizer, new head modules, max_length) from the base the config names.

    `config` is any training config with `base`, `seed` and `max_length`; `kind` (default
    `config.kind`) picks the head: "bt" a one-output sequence classifier, else a causal LM.
    """
    from transformers import AutoTokenizer, set_seed

    base_dir = resolve_base(config.base)
    set_seed(config.seed)  # the new head's initialisation
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model, new_modules = load_base_model(kind or config.kind, base_dir)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    max_length = min(config.max_length, getattr(model.config, "max_position_embeddings", config.max_length))
    if max_length < config.max_length:
        logger.warning("max_length %d exceeds the model's %d positions", config.max_length, max_length)
    return model, tokenizer, new_modules, max_length


def peft_config_for(config: RewardTrainingConfig, model, new_modules):
    """The LoRA adapter's configuration (None: full fine-tuning)."""
    from peft import LoraConfig

    if not config.lora:
        return None
    save = modules_to_save(model, new_modules) if config.kind == "bt" else []
    return LoraConfig(
        task_type="SEQ_CLS" if config.kind == "bt" else "CAUSAL_LM",
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_target_modules(model, config.lora_targets, save, config.lora_layers),
        modules_to_save=save or None,
    )


def train(config: RewardTrainingConfig, command: str = "") -> dict[str, Any]:
    """Run one training job; returns the evaluation report (or {} when evaluation is off)."""
    from aligner.training.encoding import PairEncoder
    from aligner.training.evaluate import evaluate_model

    output = Path(config.output)
    data = load_data(config)
    model, tokenizer, new_modules, max_length = load_model(config)
    encoder = PairEncoder(tokenizer, max_length)
    train_dataset = data.train.map(
        encoder.encode_pair,
        fn_kwargs={"margin_scale": config.margin_scale},
        remove_columns=data.train.column_names,
        desc="Tokenizing",
    )
    if config.margin_scale <= 0:
        train_dataset = train_dataset.remove_columns("margin")
    trainer = build_trainer(config, model, tokenizer, train_dataset, peft_config_for(config, model, new_modules))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    logger.info(
        "training %s on %s: %d pairs, %d trainable parameters",
        config.kind, config.base, len(train_dataset), trainable,
    )

    resume_from = _resume_point(config)
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.monotonic() - started
    save_model(trainer, tokenizer, config, output, encoder.layout, max_length)

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    steps = trainer.state.global_step
    train_info = {
        "steps": steps,
        "pairs_seen": steps * config.batch_size * config.grad_accum,
        "seconds": seconds,
        "resumed_from": Path(resume_from).name if resume_from else None,
        "hardware": _hardware(),
        "trainable_params": trainable,
        "train_loss": round(losses[-1], 4) if losses else None,
        "loss_history": [round(x, 4) for x in losses],
    }
    stats = {name: s.as_dict() for name, s in data.stats.items()}
    record = {"data": stats, "train": train_info, "config": asdict(config), "command": command}
    # Card and record first: an evaluation that is interrupted leaves a described model behind
    # (`eval-rm --save` fills the numbers in later).
    write_record(output, record)
    report: dict[str, Any] = {}
    if config.evaluate and any(data.val.values()):
        report = evaluate_model(output, data.val, batch_size=config.eval_batch_size)
        write_record(output, {**report, **record})
    return report


def write_record(output: Path, record: dict[str, Any]) -> None:
    """`eval.json` (metrics, data, training, config, command) and the README rendered from it."""
    from aligner.training.card import render_card

    (output / EVAL_FILE).write_text(json.dumps(record, indent=2) + "\n")
    render_card(output, record)
