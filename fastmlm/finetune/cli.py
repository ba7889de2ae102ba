"""``fastmlm finetune``: its flags (one per FinetuneConfig field) and the command."""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from .config import CONFIG_FILE, RESUMABLE, FinetuneConfig
from .tasks import BUNDLED

_FLAGS = {  # field -> (help, extra argparse keywords)
    "valid": ("a JSONL validation file (for a custom --task; without it a hashed 10% of the file is held out)", {}),
    "epochs": ("passes over the training examples", {"type": int}),
    "stop_after": ("stop after this many epochs, to --resume later (the schedule still spans --epochs)",
                   {"type": int}),
    "batch_size": ("examples per step", {"type": int}),
    "lr": ("peak learning rate (AdamW)", {"type": float}),
    "weight_decay": ("AdamW weight decay (not on biases and LayerNorms)", {"type": float}),
    "warmup": ("share of the steps spent warming the learning rate up, before it decays", {"type": float}),
    "schedule": ("decay after the warm-up", {"choices": ("linear", "cosine")}),
    "max_len": ("tokens per example, [CLS] and [SEP] included (longer ones are cut)", {"type": int}),
    "patience": ("stop after this many epochs without a better validation metric", {"type": int}),
    "classifier_dropout": ("dropout before the classifier", {"type": float}),
    "clip_norm": ("gradient-norm clipping", {"type": float}),
    "max_train_examples": ("train on a seeded random slice of this many examples", {"type": int}),
    "seed": ("seed of the head's initialisation, the shuffles and dropout", {"type": int}),
    "log_every": ("steps per train-loss row and progress line", {"type": int}),
    "precision": ("autocast dtype (auto: bf16/fp16 on a GPU, fp32 on the CPU)",
                  {"choices": ("auto", "fp32", "bf16", "fp16")}),
    "device": ("auto (a GPU when there is one), cpu, cuda or cuda:N", {}),
}
_DEFAULT_TEXT = {"stop_after": "off", "classifier_dropout": "the encoder's hidden dropout", "max_train_examples": "all",
                 "valid": "none"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``finetune`` to the ``fastmlm`` sub-commands."""
    from ..cli import _Formatter, _help

    p = subparsers.add_parser(
        "finetune", help="fine-tune an encoder on a classification or tagging task", formatter_class=_Formatter,
        description="Fine-tune a pretrained encoder (a fastmlm run or a Hugging Face BERT folder) with a new "
                    "head: sequence classification (pooler, dropout, linear) or token classification. Each "
                    "epoch ends with a validation; the best model goes to OUT_DIR/best (export it with "
                    "`fastmlm export-hf OUT_DIR DIR`). The metrics are printed beside a majority-class and a "
                    "bag-of-words baseline computed on the same split.")
    defaults = FinetuneConfig()
    p.add_argument("--task", required=True, metavar="TASK",
                   help=_help("a bundled task or a JSONL file of {\"text\", \"label\"} or {\"tokens\", \"tags\"} "
                              "lines", default_text="required", choices=[*BUNDLED, "FILE.jsonl"]))
    p.add_argument("--from", dest="init", required=True, metavar="RUN_OR_HF_DIR",
                   help=_help("the pretrained model: a fastmlm run or checkpoint folder, or a Hugging Face BERT "
                              "folder (config.json, weights, vocab.txt or tokenizer.json)", default_text="required"))
    p.add_argument("--out-dir", default=defaults.out_dir, help=_help("the run folder", defaults.out_dir))
    for name, (text, extra) in _FLAGS.items():
        default = getattr(defaults, name)
        p.add_argument("--" + name.replace("_", "-"), default=None,  # None: not given (see cmd_finetune)
                       help=_help(text, default, extra.get("choices"), default_text=_DEFAULT_TEXT.get(name)),
                       **extra)
    p.add_argument("--resume", action="store_true",
                   help=_help("continue the run in --out-dir from its last epoch (--epochs, --stop-after, "
                              "--patience and --device may change; the other settings are the run's, so the first "
                              "command with --resume added does it)", False))
    p.add_argument("--overwrite", action="store_true", help=_help("replace an existing run in --out-dir", False))
    p.add_argument("--no-progress", action="store_true", help=_help("no progress bar or lines", False))
    p.set_defaults(func=cmd_finetune)
    return p


def _changed_settings(given: dict, out_dir) -> list[str]:
    """The flags given with --resume that would change a setting the run keeps (not RESUMABLE): each
    with the run's value when its finetune_config.json can be read. A flag that repeats the run's
    own value (the first command typed again with --resume) changes nothing and is not listed."""
    try:
        saved = json.loads((Path(out_dir) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        saved = None
    saved = saved if isinstance(saved, dict) else {}
    changed = []
    for name in sorted(set(given) - set(RESUMABLE)):
        if name in saved and saved[name] == given[name]:
            continue
        flag = "--" + name.replace("_", "-")
        changed.append(f"{flag} (the run's is {saved[name]!r})" if name in saved else flag)
    return changed


def cmd_finetune(args) -> int:
    from ..cli import _interrupted
    from .loop import finetune, report

    given = {name: getattr(args, name) for name in _FLAGS if getattr(args, name) is not None}
    if args.no_progress:
        given["progress"] = False
    cfg = FinetuneConfig(task=args.task, init=args.init, out_dir=args.out_dir, **given)
    changes = None
    if args.resume:  # the run's own settings, and what the flags given change of them
        changes = {k: v for k, v in given.items() if k in RESUMABLE}
        changes["stop_after"] = args.stop_after  # as train's --stop-after: this session's own, off unless given
        fixed = _changed_settings(given, cfg.out_dir)
        if fixed:
            raise ValueError(f"--resume continues the run with its own settings; these flags cannot change: "
                             + ", ".join(fixed))
    try:
        summary = finetune(cfg, resume=args.resume, overwrite=args.overwrite, changes=changes)
    except KeyboardInterrupt:
        again = shlex.join(["fastmlm", "finetune", "--task", args.task, "--from", args.init, "--out-dir", cfg.out_dir,
                            "--resume"])  # quoted: a path with a space must not split when pasted back
        return _interrupted("finetune", cfg.out_dir, resume_with=again)
    print(report(summary))
    print(f"best model: {summary['best_model']} (export: fastmlm export-hf {cfg.out_dir} OUT_DIR)")
    return 0
