"""``fastmlm export-hf`` for fine-tuned runs: a transformers BertForSequenceClassification /
BertForTokenClassification folder (fastmlm.hf.checkpoints.save_hf_classifier) with its tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

from .. import checkpoint as ckpt
from ..tokenizer import load_tokenizer
from .heads import is_task_folder, load_task_model
from .loop import BEST


def finetuned_folder(path) -> Path | None:
    """The model folder of a fine-tuned run (its best/), checkpoint or model folder; None when ``path`` is none."""
    path = Path(path)
    if is_task_folder(path / BEST):
        return path / BEST
    if is_task_folder(path):
        return path
    latest = ckpt.latest_checkpoint(path / "checkpoints")
    return latest if latest is not None and is_task_folder(latest) else None


def export_finetuned(path, out_dir) -> Path:
    """Write the fine-tuned model at ``path`` as a transformers folder: weights, config (with
    id2label), tokenizer.json, vocab.txt and tokenizer_config.json. ``out_dir`` must be new or empty."""
    from ..hf.checkpoints import check_output_dir, save_hf_classifier

    check_output_dir(out_dir)
    folder = finetuned_folder(path)
    if folder is None:
        raise ValueError(f"{path} is not a fine-tuned fastmlm run or model folder (no task.json)")
    ckpt.verify_checkpoint(folder)
    model = load_task_model(folder)
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    out = save_hf_classifier(model, out_dir)
    # The tokenizer files, as fastmlm.predict.export_hf writes them for an MLM.
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer.model.save(str(out))  # vocab.txt, for BertTokenizer
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": bool(getattr(tokenizer.normalizer, "lowercase", True)),
        "model_max_length": model.config.max_position_embeddings, "unk_token": "[UNK]", "sep_token": "[SEP]",
        "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}, indent=2))
    return out
