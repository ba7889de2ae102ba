"""``fastmlm export-hf`` for fine-tuned runs: a transformers BertForSequenceClassification /
BertForTokenClassification folder (fastmlm.hf.save_hf_classifier) with its tokenizer."""
from __future__ import annotations

from pathlib import Path

from .. import checkpoint as ckpt
from ..tokenizer import load_tokenizer
from .heads import is_task_folder, load_task_model
from .config import CONFIG_FILE
from .loop import BEST


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
        return latest
    if (path / CONFIG_FILE).is_file():
        raise ValueError(f"{path} is a fine-tuning run with no model yet (no {BEST}/ nor checkpoint: it stopped "
                         f"before its first epoch ended); finish it with `fastmlm finetune ... --out-dir {path}`")
    return None


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
