"""``fastmlm export-hf`` for fine-tuned runs: a transformers BertForSequenceClassification /
BertForTokenClassification folder (fastmlm.hf.save_hf_classifier) with its tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

from .. import checkpoint as ckpt
from ..tokenizer import load_tokenizer
from .heads import is_task_folder, load_task_model, read_task_file
from .config import CONFIG_FILE
from .loop import BEST
from .metrics import PRIMARY


def finetuned_folder(path) -> Path | None:
    """The model folder of a fine-tuned run (its best/), checkpoint or model folder; None when ``path`` is none.

    A fine-tuning run (it holds finetune_config.json) with no model yet, stopped before its first
    epoch ended, is a ValueError saying so."""
    path = Path(path)
    if is_task_folder(path / BEST):
        return path / BEST
    if is_task_folder(path):
        return path
    latest = ckpt.latest_checkpoint(path / "checkpoints")
    if latest is not None and is_task_folder(latest):
        _check_latest_is_best(path, latest)
        return latest
    if (path / CONFIG_FILE).is_file():
        raise ValueError(f"{path} is a fine-tuning run with no model yet (no {BEST}/ nor checkpoint: it stopped "
                         f"before its first epoch ended); finish it with `fastmlm finetune ... --out-dir {path}`")
    return None


def _check_latest_is_best(run, latest: Path) -> None:
    """ValueError when a run without best/ (a session stopped while it wrote it, or best/ deleted) would
    be exported from a latest checkpoint that is not its best epoch: the export would silently be
    another model than the one ``fastmlm finetune`` reported."""
    if not (Path(run) / CONFIG_FILE).is_file():  # a checkpoints/ folder not made by fastmlm finetune
        return
    state = ckpt.load_trainer_state(latest)
    if state.get("bad_epochs", 0) == 0:  # the last epoch was the best one so far: the checkpoint is best/'s model
        return
    history = json.loads(state["history"])
    best = max(history, key=lambda h: h[PRIMARY[read_task_file(latest)["kind"]]])["epoch"]
    raise ValueError(f"{run} has no {BEST}/ and its latest checkpoint ({latest}, epoch {history[-1]['epoch']}) is "
                     f"not its best epoch ({best}); export that checkpoint itself if it is the model you want "
                     f"(fastmlm export-hf {latest} OUT_DIR)")


def export_finetuned(path, out_dir) -> Path:
    """Write the fine-tuned model at ``path`` as a transformers folder: weights, config (with
    id2label), tokenizer.json, vocab.txt and tokenizer_config.json. ``out_dir`` must be new or empty."""
    from ..hf import check_output_dir, save_hf_classifier, save_hf_tokenizer

    check_output_dir(out_dir)
    folder = finetuned_folder(path)
    if folder is None:
        raise ValueError(f"{path} is not a fine-tuned fastmlm run or model folder (no task.json)")
    ckpt.verify_checkpoint(folder)
    model = load_task_model(folder)
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    return save_hf_tokenizer(tokenizer, save_hf_classifier(model, out_dir), model.config.max_position_embeddings)
