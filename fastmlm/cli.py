"""The ``fastmlm`` command.

    fastmlm demo                                  train the demo model on the bundled corpus, report, fill masks
    fastmlm train [--preset demo] [--data DIR ...] [--max-steps N] [--resume [CKPT]] ...
    fastmlm eval CHECKPOINT [--data FILE ...]     masked-token accuracy and perplexity
    fastmlm fill-mask CHECKPOINT "text with [MASK]" [--top-k 5]
    fastmlm export-hf CHECKPOINT OUT_DIR          a transformers BertForMaskedLM folder
    fastmlm bench [ARGS ...]                      the benchmark suite (python -m benchmarks)

Every TrainConfig field is a ``train`` flag (``--seq-len``, ``--lr``, ``--whole-word`` …);
``--set key=value`` overrides a model config field (``--set hidden_size=128``).

Errors in what the user asked for (ValueError, and fastmlm.checkpoint.CheckpointError, a
ValueError that fastmlm.hf raises too) print ``fastmlm <command>: error: ...`` and
exit with 2, as argparse does; Ctrl-C stops with 130 and says where the last checkpoint is.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
import typing
from pathlib import Path

DEMO_SENTENCES = (
    "A [MASK] is an ordered collection of items.",
    "The for [MASK] iterates over the items of a sequence.",
    "If the file does not exist, an [MASK] is raised.",
)


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


# --------------------------------------------------------------------------- train flags from TrainConfig
def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    from .config import RESUMABLE, TRAIN_PRESETS, TrainConfig

    parser.add_argument("--preset", default=None, choices=sorted(TRAIN_PRESETS),
                        help="starting point; any flag below overrides it (default: demo)")
    resumable = ", ".join("--" + name.replace("_", "-") for name in RESUMABLE)
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue the run in --out-dir from its latest checkpoint (or from CHECKPOINT). "
                             f"These flags may change on resume and take effect: {resumable}; any other "
                             "flag given must match the run, or the resume is refused "
                             "with the list of differences (with --preset, every setting of the preset counts as "
                             "given). A finished run is left as it is.")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing run in --out-dir (refused while another process trains there)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model config field, e.g. --set hidden_size=128 (repeatable)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model_overrides":
            continue
        flag, hint = "--" + f.name.replace("_", "-"), str(hints[f.name])
        if f.name in ("data", "valid_data"):
            parser.add_argument(flag, nargs="+", default=None, metavar="PATH", help="text/JSONL files or folders")
        elif f.name == "betas":
            parser.add_argument(flag, nargs=2, type=float, default=None)
        elif "bool" in hint:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif "int" in hint:
            parser.add_argument(flag, type=int, default=None)
        elif "float" in hint:
            parser.add_argument(flag, type=float, default=None)
        else:
            parser.add_argument(flag, default=None)


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
    cfg = train_config_from_args(args)
    try:
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite,
                        changes=resume_changes(args) if args.resume else None)
    except KeyboardInterrupt:
        return _interrupted("train", cfg.out_dir)
    if "nothing_to_do" not in summary:  # else train said why and changed nothing
        _print_summary(summary)
    return 0


def _interrupted(command: str, out_dir=None) -> int:
    """After Ctrl-C: say where the run stands; 130 (128 + SIGINT) is what shells expect."""
    message = f"fastmlm {command}: interrupted"
    if out_dir is not None:
        from .checkpoint import latest_checkpoint

        last = latest_checkpoint(Path(out_dir) / "checkpoints")
        message += (f"; the last checkpoint is {last} (continue with: fastmlm train --out-dir {out_dir} --resume)"
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
    from .predict import evaluate_text, load_checkpoint

    model, tokenizer = load_checkpoint(args.checkpoint, resolve_device(args.device))
    paths = args.data or [bundled_corpus("valid")]
    metrics = evaluate_text(model, tokenizer, paths, args.seq_len, args.batch_size, args.mask_rate, args.max_batches)
    print(json.dumps(metrics) if args.json else
          f"masked-token accuracy {metrics['accuracy']:.2%}, perplexity {metrics['perplexity']:.2f}, "
          f"loss {metrics['loss']:.4f} over {metrics['n_masked']} masked tokens")
    return 0


def cmd_fill_mask(args) -> int:
    from .distributed import resolve_device
    from .predict import fill_mask, load_checkpoint

    model, tokenizer = load_checkpoint(args.checkpoint, resolve_device(args.device))
    _print_fills(args.text, fill_mask(model, tokenizer, args.text, args.top_k))
    return 0


def _print_fills(text: str, fills) -> None:
    print(text)
    for n, options in enumerate(fills, 1):
        shown = ", ".join(f"{token} {prob:.1%}" for token, prob in options)
        print(f"  [MASK] {n}: {shown}" if len(fills) > 1 else f"  [MASK]: {shown}")


def cmd_export_hf(args) -> int:
    from .predict import export_hf

    out = export_hf(args.checkpoint, args.out_dir)
    print(f"wrote a Hugging Face BertForMaskedLM folder to {out}")
    return 0


def cmd_demo(args) -> int:
    """Train the demo config, then report accuracy/perplexity against a unigram baseline and fill masks."""
    import numpy as np

    from . import data
    from .config import train_preset
    from .corpus_reader import bundled_corpus
    from .predict import fill_mask, load_checkpoint
    from .train import train

    overrides = {"out_dir": args.out_dir, "progress": not args.no_progress}
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    cfg = train_preset("demo", **overrides)
    start = time.perf_counter()
    try:
        summary = train(cfg, overwrite=True)
    except KeyboardInterrupt:
        return _interrupted("demo", cfg.out_dir)
    model, tokenizer = load_checkpoint(summary["checkpoint"])
    collator = data.MaskingCollator(tokenizer, cfg.seq_len, cfg.batch_size, cfg.mask_rate)
    train_files = cfg.data or [bundled_corpus("train")]
    valid_files = cfg.valid_data or [bundled_corpus("valid")]
    valid = data.eval_batches(valid_files, tokenizer, collator, max_batches=cfg.eval_batches)  # the masks train used
    baseline = data.unigram_baseline(data.unigram_counts(train_files, tokenizer), valid)
    losses = [float(r["loss"]) for r in _csv_rows(Path(cfg.out_dir) / "log.csv") if r["split"] == "train"]
    ours = summary["valid"]
    print()
    print(f"fastmlm demo: {summary['step']} steps on {summary['device']}, {time.perf_counter() - start:.0f} s "
          f"in all, {summary['tokens_per_s']:,.0f} training tokens/s")
    if losses:
        thirds = np.array_split(np.array(losses), 3)
        print("train loss (mean of each third of the run): " + " -> ".join(f"{t.mean():.3f}" for t in thirds if len(t)))
    print(f"validation ({ours['n_masked']} masked tokens)      accuracy   perplexity")
    print(f"  fastmlm model                         {ours['accuracy']:7.1%}   {ours['perplexity']:10.1f}")
    print(f"  unigram-frequency baseline            {baseline['accuracy']:7.1%}   {baseline['perplexity']:10.1f}")
    print()
    for text in DEMO_SENTENCES:
        _print_fills(text, fill_mask(model, tokenizer, text, top_k=5))
    print(f"\ncheckpoint: {summary['checkpoint']}  (try: fastmlm fill-mask {summary['checkpoint']} \"...[MASK]...\")")
    return 0


def _csv_rows(path: Path):
    import csv

    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def cmd_bench(args) -> int:
    if not (Path.cwd() / "benchmarks").is_dir():
        raise SystemExit("fastmlm bench runs `python -m benchmarks` from a source checkout; no benchmarks/ here")
    return subprocess.call([sys.executable, "-m", "benchmarks", *args.bench_args])


# --------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmlm", description="Masked-language-model training on fused kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train a small MLM on the bundled corpus, report accuracy/perplexity, fill masks")
    p.add_argument("--out-dir", default="runs/demo")
    p.add_argument("--max-steps", type=_positive_int, default=None, help="override the demo's step count")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train (or resume) an MLM; every TrainConfig field is a flag")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="masked-token accuracy and perplexity of a checkpoint on text")
    p.add_argument("checkpoint", help="a checkpoint folder or a run folder (its latest checkpoint)")
    p.add_argument("--data", nargs="+", default=None, help="text/JSONL files or folders (default: bundled validation)")
    p.add_argument("--seq-len", type=_positive_int, default=128)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--mask-rate", type=_rate, default=0.15)
    p.add_argument("--max-batches", type=_positive_int, default=None)
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("fill-mask", help="top-k tokens for each [MASK] in a text")
    p.add_argument("checkpoint")
    p.add_argument("text")
    p.add_argument("--top-k", type=_positive_int, default=5, help="how many tokens to list (at most the vocabulary)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_fill_mask)

    p = sub.add_parser("export-hf", help="write a Hugging Face BertForMaskedLM folder")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("bench", help="run the benchmark suite (python -m benchmarks ARGS)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    from .checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"fastmlm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted(args.command)


if __name__ == "__main__":
    sys.exit(main())
