"""The ``fastmlm`` command.

    fastmlm demo                                  train the demo model on the bundled corpus, report, fill masks
    fastmlm train [--preset demo] [--data DIR ...] [--max-steps N] [--resume [CKPT]] ...
    fastmlm eval CHECKPOINT [--data FILE ...]     masked-token accuracy and perplexity
    fastmlm fill-mask CHECKPOINT "text with [MASK]" [--top-k 5]
    fastmlm export-hf CHECKPOINT OUT_DIR          a transformers BertForMaskedLM folder
    fastmlm plot RUN [RUN ...] [--out FILE]       training curves of runs, overlaid
    fastmlm bench [ARGS ...]                      the benchmark suite (python -m benchmarks; --help lists its flags)

Every TrainConfig field is a ``train`` flag (``--seq-len``, ``--lr``, ``--whole-word`` …), its
help text taken from the field's metadata; ``--set key=value`` overrides a model config field
(``--set hidden_size=128``). Every flag's help says what it does, its default and its choices.
CHECKPOINT is a run folder, a checkpoint folder or a Hugging Face BertForMaskedLM folder.

Errors in what the user asked for (ValueError, and fastmlm.checkpoint.CheckpointError, a
ValueError that fastmlm.hf raises too), and paths that cannot be read or written (OSError),
print ``fastmlm <command>: error: ...`` and
exit with 2, as argparse does; Ctrl-C stops with 130 and says where the last checkpoint is.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path



# --------------------------------------------------------------------------- argument types
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 (exclusive), got {text!r}")
    return value


# --------------------------------------------------------------------------- help texts
def _help(text: str, default=None, choices=None, *, default_text: str = None) -> str:
    """A flag's help: what it does, then its default and (when it has them) its choices."""
    if default_text is None:
        default_text = "off" if default is False else "on" if default is True else \
            "none" if default is None else " ".join(map(str, default)) if isinstance(default, (list, tuple)) \
            else str(default)
    tail = f"default: {default_text}"
    if choices:
        tail += "; choices: " + ", ".join(map(str, choices))
    return f"{text} ({tail})".replace("%", "%%")  # argparse %-formats help texts


class _Formatter(argparse.HelpFormatter):
    """Wider help columns, so each flag's description, default and choices read as one paragraph."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=30, width=min(120, shutil.get_terminal_size().columns))


# --------------------------------------------------------------------------- train flags from TrainConfig
def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    from .config import RESUMABLE, TRAIN_PRESETS, TrainConfig

    defaults = {**TrainConfig().to_dict(), **TRAIN_PRESETS["demo"]}
    parser.add_argument("--preset", default=None, choices=sorted(TRAIN_PRESETS), metavar="NAME",
                        help=_help("starting point of the run's settings; any flag below overrides it (the "
                                   "defaults below are the demo preset's)", "demo", sorted(TRAIN_PRESETS)))
    resumable = ", ".join("--" + name.replace("_", "-") for name in RESUMABLE)
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue the run in --out-dir from its latest checkpoint (or from CHECKPOINT). "
                             f"These flags may change on resume and take effect: {resumable}; any other "
                             "flag given must match the run, or the resume is refused "
                             "with the list of differences (with --preset, every setting of the preset counts as "
                             "given). A finished run is left as it is. (default: a new run)")
    parser.add_argument("--overwrite", action="store_true",
                        help=_help("replace an existing run in --out-dir (refused while another process trains "
                                   "there)", False))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=_help("override a model config field, e.g. --set hidden_size=128 --set "
                                   "norm_position=pre (repeatable; fields: fastmlm.config.ModelConfig)",
                                   default_text=_model_overrides_text(defaults["model_overrides"])))
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("model_overrides", "made_by"):
            continue
        flag, hint, default = "--" + f.name.replace("_", "-"), str(hints[f.name]), defaults[f.name]
        choices = f.metadata.get("choices")
        kwargs = dict(default=None, help=_help(f.metadata["help"], default, choices,
                                               default_text=f.metadata.get("default_text") if default is None else None))
        if choices:
            kwargs.update(choices=choices, metavar=f.name.upper().replace("_", "-"))
        if f.name in ("data", "valid_data"):
            parser.add_argument(flag, nargs="+", metavar="PATH", **kwargs)
        elif f.name == "betas":
            parser.add_argument(flag, nargs=2, type=float, metavar=("BETA1", "BETA2"), **kwargs)
        elif "bool" in hint:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif "int" in hint:
            parser.add_argument(flag, type=int, **kwargs)
        elif "float" in hint:
            parser.add_argument(flag, type=float, **kwargs)
        else:
            parser.add_argument(flag, **kwargs)


def _model_overrides_text(overrides: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) + " (the demo preset's)" if overrides else "none"


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _given_fields(args) -> dict:
    """The TrainConfig fields given as flags (every such flag defaults to None)."""
    from .config import TrainConfig

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if getattr(args, f.name, None) is not None}


def _set_items(args) -> dict:
    """The ``--set KEY=VALUE`` model overrides."""
    items = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        items[key.strip()] = _parse_value(value)
    return items


def train_config_from_args(args):
    """A TrainConfig from the preset, the flags given, and ``--set`` model overrides."""
    from .config import TRAIN_PRESETS, train_preset

    preset = args.preset or "demo"
    overrides = _given_fields(args)
    if args.set:
        overrides["model_overrides"] = {**TRAIN_PRESETS[preset].get("model_overrides", {}), **_set_items(args)}
    return train_preset(preset, **overrides)


def resume_changes(args) -> dict:
    """What ``--resume`` is asked to change (train's ``changes``): the flags given, or with
    ``--preset`` every field of that preset and the flags; ``--set`` entries one by one."""
    if args.preset is not None:
        return train_config_from_args(args).to_dict()
    changes = _given_fields(args)
    if args.set:
        changes["model_overrides"] = _set_items(args)
    return changes


# --------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    from .train import train

    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out-dir and --overwrite deletes it; give one of them")
    # flags that would be ignored, silently, beside the others given
    if args.memory_gib is not None and not args.dry_run:
        raise ValueError("--memory-gib says whether the memory plan of --dry-run fits a device; give --dry-run too")
    if args.valid_holdout is not None and args.valid_data:
        raise ValueError("--valid-holdout holds out validation text from --data when there is no --valid-data; "
                         "give one of them")
    cfg = train_config_from_args(args)
    try:
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite,
                        changes=resume_changes(args) if args.resume else None)
    except KeyboardInterrupt:
        return _interrupted("train", cfg.out_dir)
    if "nothing_to_do" not in summary:  # else train said why and changed nothing
        _print_summary(summary)
    return 0


def _interrupted(command: str, out_dir=None, resume_with: str = None) -> int:
    """After Ctrl-C: say where the run stands and how to continue it (``resume_with``: the command line;
    by default a train run's); 130 (128 + SIGINT) is what shells expect."""
    message = f"fastmlm {command}: interrupted"
    if out_dir is not None:
        from .checkpoint import latest_checkpoint

        last = latest_checkpoint(Path(out_dir) / "checkpoints")
        again = resume_with or f"fastmlm train --out-dir {out_dir} --resume"  # a demo run continues as a train run
        message += (f"; the last checkpoint is {last} (continue with: {again})"
                    if last else f"; no checkpoint was saved in {out_dir}")
    print(message, file=sys.stderr)
    return 130


def _print_summary(summary: dict) -> None:
    if summary.get("rank", 0) != 0:
        return
    valid = summary.get("valid") or {}
    print(f"done: {summary['step']} steps in {summary['wall_s']:.0f} s, {summary['tokens_per_s']:,.0f} tokens/s, "
          f"packing efficiency {summary['packing_efficiency']:.1%}, final train loss {summary['final_train_loss']:.4f}")
    if valid:
        print(f"validation: masked-token accuracy {valid['accuracy']:.1%}, perplexity {valid['perplexity']:.1f} "
              f"({valid['n_masked']} masked tokens)")
    print(f"checkpoint: {summary['checkpoint']}")


def cmd_eval(args) -> int:
    from .corpus_reader import bundled_corpus
    from .distributed import resolve_device
    from .predict import evaluate_text, load_checkpoint, run_settings

    model, tokenizer = load_checkpoint(args.checkpoint, resolve_device(args.device))
    paths = args.data or [bundled_corpus("valid")]
    run = run_settings(args.checkpoint)  # a run's own masking and row length, unless flags say otherwise
    pick = lambda name, fallback: getattr(args, name) if getattr(args, name) is not None else run.get(name, fallback)  # noqa: E731
    metrics = evaluate_text(model, tokenizer, paths, pick("seq_len", 128), pick("batch_size", 32),
                            pick("mask_rate", 0.15), args.max_batches, whole_word=pick("whole_word", False))
    # JSON has no Infinity: a perplexity past the float range (exp of a loss above 709: a diverged model) is
    # written as null, which every JSON reader takes; the loss beside it stays a number.
    print(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()},
                     allow_nan=False) if args.json else
          f"masked-token accuracy {metrics['accuracy']:.2%}, perplexity {metrics['perplexity']:.2f}, "
          f"loss {metrics['loss']:.4f} over {metrics['n_masked']} masked tokens")
    return 0


def cmd_fill_mask(args) -> int:
    from .demo import print_fills
    from .distributed import resolve_device
    from .predict import fill_mask, load_checkpoint

    model, tokenizer = load_checkpoint(args.checkpoint, resolve_device(args.device))
    print_fills(args.text, fill_mask(model, tokenizer, args.text, args.top_k))
    return 0


def cmd_export_hf(args) -> int:
    from .finetune.export import export_finetuned, finetuned_folder
    from .predict import export_hf

    if finetuned_folder(args.checkpoint) is not None:  # a fastmlm finetune run: a Bert*Classification folder
        print(f"wrote a Hugging Face classifier folder to {export_finetuned(args.checkpoint, args.out_dir)}")
        return 0
    out = export_hf(args.checkpoint, args.out_dir)
    print(f"wrote a Hugging Face BertForMaskedLM folder to {out}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    try:
        run_demo(args.out_dir, args.device, args.max_steps, progress=not args.no_progress)
    except KeyboardInterrupt:
        return _interrupted("demo", args.out_dir)
    return 0


def cmd_plot(args) -> int:
    from .plot import CURVES, plot_runs, read_log

    for run in args.runs:  # a run that has logged nothing would be drawn as empty axes, and "wrote" said of it
        log = read_log(run)
        if not log["train"]["step"] and not log["valid"]["step"]:
            raise ValueError(f"{run}: its log.csv has no rows yet (the run has not logged a step); nothing to draw")
    out = args.out or (Path(args.runs[0]) / CURVES if len(args.runs) == 1 else Path(CURVES))
    if out.is_dir() or (out.parent.exists() and not out.parent.is_dir()):  # else a drawing is made, then not written
        where = "is a folder" if out.is_dir() else f"is in {out.parent}, which is a file"
        raise ValueError(f"--out {out} {where}; expected the path of the PNG file to write")
    try:
        written = plot_runs(args.runs, out, title=args.title)
    except ImportError:
        raise ValueError("drawing needs matplotlib (pip install matplotlib)") from None
    print(f"wrote {written}")
    return 0


BENCH_HELP = "run the benchmark suite (python -m benchmarks ARGS; fastmlm bench --help lists its options)"


def cmd_bench(bench_args: list) -> int:
    """``python -m benchmarks`` with every argument passed through (``--help`` too), from a source checkout."""
    repo = Path(__file__).resolve().parents[1]
    if not (repo / "benchmarks" / "__main__.py").is_file():
        raise ValueError(f"fastmlm bench runs `python -m benchmarks` from a source checkout; {repo} has no "
                         f"benchmarks/ (clone the repository and install it with pip install -e .)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    if bench_args[:1] in (["-h"], ["--help"]):
        print("fastmlm bench: every argument goes to `python -m benchmarks`, whose options are:\n", flush=True)
    return subprocess.call([sys.executable, "-m", "benchmarks", *bench_args], env=env)


# --------------------------------------------------------------------------- entry point
_DEVICE_HELP = "auto (a GPU when there is one), cpu, cuda or cuda:N"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmlm", description="Masked-language-model training on fused kernels. "
                                     "`fastmlm COMMAND --help` explains each command's flags.",
                                     formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, description=None):
        return sub.add_parser(name, help=help, description=description or help, formatter_class=_Formatter)

    p = command("demo", "train a small MLM on the bundled corpus, report accuracy/perplexity, fill masks",
                "Train the demo preset (the demo-gpu preset on a GPU) on the bundled corpus, then print the "
                "validation masked-token accuracy and perplexity beside a unigram-frequency baseline, and fill "
                "the masks of a few sentences. The run folder gets curves.png. It replaces an earlier demo "
                "run in --out-dir, never a run that `fastmlm train` made.")
    p.add_argument("--out-dir", default="runs/demo", help=_help("the run folder", "runs/demo"))
    p.add_argument("--max-steps", type=_positive_int, default=None,
                   help=_help("override the demo's step count", default_text="the preset's"))
    p.add_argument("--device", default="auto", help=_help(_DEVICE_HELP, "auto"))
    p.add_argument("--no-progress", action="store_true",
                   help=_help("no progress bar or progress lines, only validations and the report", False))
    p.set_defaults(func=cmd_demo)

    p = command("train", "train (or resume) an MLM; every TrainConfig field is a flag",
                "Train (or resume) a masked language model. Every field of fastmlm.train.TrainConfig is a flag; "
                "the defaults shown are the demo preset's (another --preset changes them). On a terminal a "
                "progress bar shows loss, tokens/s and ETA; with the output redirected, one plain line per "
                "--log-every steps. Each run folder gets log.csv and curves.png (redrawn at each validation).")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    checkpoint_help = ("a run folder (its latest checkpoint), a checkpoint folder, or a Hugging Face "
                       "BertForMaskedLM folder (config.json + weights + tokenizer.json or vocab.txt)")
    p = command("eval", "masked-token accuracy and perplexity of a checkpoint on text")
    p.add_argument("checkpoint", help=checkpoint_help)
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help=_help("text/JSONL files or folders", default_text="the bundled validation split"))
    run_default = "the run's own setting for a fastmlm run, else {}"
    p.add_argument("--seq-len", type=_positive_int, default=None,
                   help=_help("tokens per packed row", default_text=run_default.format(128)))
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help=_help("rows per batch", default_text=run_default.format(32)))
    p.add_argument("--mask-rate", type=_rate, default=None,
                   help=_help("share of the tokens masked (fixed masks, seed 1234, as training validates)",
                              default_text=run_default.format(0.15)))
    p.add_argument("--whole-word", action=argparse.BooleanOptionalAction, default=None,
                   help=_help("mask whole words", default_text=run_default.format("off")))
    p.add_argument("--max-batches", type=_positive_int, default=None,
                   help=_help("evaluate at most this many batches", default_text="all"))
    p.add_argument("--device", default="auto", help=_help(_DEVICE_HELP, "auto"))
    p.add_argument("--json", action="store_true", help=_help("print the metrics as JSON", False))
    p.set_defaults(func=cmd_eval)

    p = command("fill-mask", "top-k tokens for each [MASK] in a text")
    p.add_argument("checkpoint", help=checkpoint_help)
    p.add_argument("text", help="the text, with one or more [MASK] tokens")
    p.add_argument("--top-k", type=_positive_int, default=5,
                   help=_help("how many tokens to list (at most the vocabulary)", 5))
    p.add_argument("--device", default="auto", help=_help(_DEVICE_HELP, "auto"))
    p.set_defaults(func=cmd_fill_mask)

    p = command("export-hf", "write a Hugging Face BertForMaskedLM folder")
    p.add_argument("checkpoint", help="a run folder (its latest checkpoint) or a checkpoint folder; a `fastmlm "
                                      "finetune` run gives a BertForSequenceClassification / "
                                      "BertForTokenClassification folder of its best epoch")
    p.add_argument("out_dir", help="a new or empty folder")
    p.set_defaults(func=cmd_export_hf)

    from .finetune.cli import add_parser as add_finetune_parser

    add_finetune_parser(sub)
    p = command("plot", "draw the training curves of one or more runs into one picture",
                "Draw loss (train and validation), validation accuracy and perplexity, and the learning rate "
                "by step from each run's log.csv, overlaid, one colour per run.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or their log.csv files)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help=_help("the PNG to write", default_text="RUN/curves.png for one run, ./curves.png for several"))
    p.add_argument("--title", default=None, help=_help("the picture's title", default_text="the run names"))
    p.set_defaults(func=cmd_plot)

    from .shards import add_parser as add_prepare_data

    add_prepare_data(sub, formatter_class=_Formatter)

    p = sub.add_parser("bench", help=BENCH_HELP, add_help=False)  # main() passes its arguments straight through
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def _error_text(exc: Exception) -> str:
    """The error as one line: fastmlm's own messages as they are; the system's OSErrors as
    "Not a directory: PATH" rather than "[Errno 20] Not a directory: 'PATH'"."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "")
    return str(exc)


def main(argv=None) -> int:
    from .checkpoint import CheckpointError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # every argument is the benchmark's, --help included
        try:
            return cmd_bench(argv[1:])
        except ValueError as exc:
            print(f"fastmlm bench: error: {exc}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, OSError, ValueError) as exc:  # OSError: a path that cannot be read or written
        print(f"fastmlm {args.command}: error: {_error_text(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted(args.command)


if __name__ == "__main__":
    sys.exit(main())
