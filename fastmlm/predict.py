"""Using a trained checkpoint: load it, fill masks, evaluate on text, export to Hugging Face.

Every fastmlm checkpoint loaded here is verified against its manifest.json first, as training
resume does: a folder without one (or with an edited or corrupt file) is refused. Training
checkpoints and FastMLMForMaskedLM.save_pretrained folders carry a manifest. A Hugging Face
``BertForMaskedLM`` folder (a ``config.json`` whose ``model_type`` is not ``"fastmlm"``, as
``export-hf`` and ``transformers`` write it, with its ``tokenizer.json`` or ``vocab.txt``) loads
too, through ``fastmlm.hf.load_hf``; it has no manifest to verify.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from . import checkpoint as ckpt
from . import data
from .model import FastMLMForMaskedLM
from .tokenizer import load_tokenizer, special_ids


def is_hf_folder(path) -> bool:
    """Whether ``path`` is a Hugging Face model folder: its config.json names a ``model_type`` other
    than ``"fastmlm"`` (which fastmlm checkpoints write)."""
    config = Path(path) / "config.json"
    try:
        kind = json.loads(config.read_text()).get("model_type", "fastmlm")
    except (OSError, ValueError, AttributeError):
        return False
    return kind != "fastmlm"


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint), or a Hugging Face folder."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        latest = ckpt.latest_checkpoint(path / "checkpoints")
        if latest is None:
            raise ckpt.CheckpointError(f"{path}/checkpoints holds no complete checkpoint")
        return latest
    if not path.is_dir():
        raise ckpt.CheckpointError(f"no checkpoint folder at {path}")
    return path


def folder_tokenizer(path: Path, hf: bool = False):
    """The tokenizer beside a model's weights: ``path``/tokenizer.json, else ``path``/vocab.txt."""
    for name in ("tokenizer.json", "vocab.txt"):
        if (path / name).is_file():
            return load_tokenizer(path / name)
    raise ckpt.CheckpointError(f"{path} holds no tokenizer.json or vocab.txt" +
                               (" (a Hugging Face folder needs its tokenizer beside the weights)" if hf else ""))


def load_checkpoint(path, device: str = "cpu") -> tuple[FastMLMForMaskedLM, object]:
    """(model in eval mode, tokenizer) from a checkpoint or run folder, verified against its manifest,
    or from a Hugging Face BertForMaskedLM folder (see the module docstring)."""
    path = resolve_checkpoint(path)
    hf = is_hf_folder(path)
    if not hf:
        ckpt.verify_checkpoint(path)  # refuses a folder without manifest.json, as resume does
    tokenizer = folder_tokenizer(path, hf)
    if hf:
        from .hf import load_hf  # fastmlm.hf imports transformers-free helpers only; loaded when needed

        try:
            model = load_hf(path)
        except ckpt.CheckpointError as exc:  # name the folder where fastmlm.hf's message does not
            if str(path) in str(exc):
                raise
            raise ckpt.CheckpointError(f"{path}: {exc}") from None
    else:
        model = FastMLMForMaskedLM.from_pretrained(path)
    # a tokenizer with ids past the embeddings is not the model's (a tokenizer.json swapped in): every
    # fill and evaluation would end in the model's input check, deep in a traceback
    n_tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    if n_tokens > model.config.vocab_size:
        raise ckpt.CheckpointError(f"{path}: the tokenizer has {n_tokens} tokens, more than the model's vocabulary "
                                   f"of {model.config.vocab_size}: it is not the tokenizer the model was trained with")
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def fill_mask(model, tokenizer, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each ``[MASK]`` in ``text``: the ``top_k`` (token, probability) pairs, most likely first."""
    data.check_int("top_k", top_k, 1, model.config.vocab_size)  # at most the whole vocabulary
    try:  # a command-line argument in another encoding arrives with lone surrogates, which tokenizers refuses
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the text holds bytes that are not UTF-8 (at character {exc.start}: {text!r}); "
                         f"give it as UTF-8") from None
    special = special_ids(tokenizer)
    ids = [special.cls] + tokenizer.encode(text, add_special_tokens=False).ids + [special.sep]
    limit = model.config.max_position_embeddings
    if len(ids) > limit:
        raise ValueError(f"the text is {len(ids)} tokens long; this model takes at most {limit}")
    positions = [i for i, t in enumerate(ids) if t == special.mask]
    if not positions:
        raise ValueError(f"the text has no [MASK] token: {text!r}")
    device = next(model.parameters()).device
    logits = model.masked_logits(torch.tensor([ids], device=device),
                                 positions=torch.tensor(positions, device=device))  # (masks, V) fp32
    probs = logits.softmax(dim=-1)
    probs[:, list(special.all)] = 0.0  # a special token is never a fill
    top = probs.topk(top_k, dim=-1)
    return [[(tokenizer.id_to_token(int(i)), float(p)) for p, i in zip(ps.tolist(), ix.tolist())]
            for ps, ix in zip(top.values, top.indices)]


def evaluate_text(model, tokenizer, paths, seq_len: int = 128, batch_size: int = 32, mask_rate: float = 0.15,
                  max_batches: Optional[int] = None, seed: int = 1234, whole_word: bool = False) -> dict:
    """Masked-token accuracy and perplexity on text files (fixed masks from ``seed``; the seed
    training validations use, so a run's own settings reproduce its validation figures)."""
    from .train import evaluate

    data.check_int("seq_len", seq_len, 3)  # [CLS], at least one token, [SEP]
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    data.check_int("batch_size", batch_size, 1)
    if max_batches is not None:
        data.check_int("max_batches", max_batches, 1)
    collator = data.MaskingCollator(tokenizer, seq_len, batch_size, mask_rate, whole_word)
    batches = data.eval_batches(paths, tokenizer, collator, seed=seed, max_batches=max_batches)
    if not batches:
        raise ValueError(f"no text to evaluate in {paths}")
    if not sum(b.n_masked for b in batches):  # else loss, accuracy and perplexity would all be NaN
        raise ValueError(f"no token of {paths} was masked at mask rate {mask_rate:g} (too little text, or only "
                         f"special tokens), so there is nothing to score; give more text or a higher --mask-rate")
    return evaluate(model, batches, next(model.parameters()).device)


def run_settings(path) -> dict:
    """The TrainConfig (as a dict) a checkpoint or run folder was trained with; {} for other folders."""
    try:
        folder = resolve_checkpoint(path)
    except ckpt.CheckpointError:
        return {}
    for candidate in (Path(path) / "train_config.json", folder.parent.parent / "train_config.json"):
        try:
            return json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
    return {}


def export_hf(checkpoint, out_dir) -> Path:
    """Write a Hugging Face ``BertForMaskedLM`` folder (weights, config, vocab.txt, tokenizer files).

    ``out_dir`` must be new or an empty folder (ValueError naming it otherwise).
    """
    from .hf import check_output_dir, save_hf, save_hf_tokenizer

    made = not check_output_dir(out_dir).exists()  # before the checkpoint is loaded, so a wrong path fails at once
    model, tokenizer = load_checkpoint(checkpoint)
    try:
        return save_hf_tokenizer(tokenizer, save_hf(model, out_dir), model.config.max_position_embeddings)
    except BaseException:  # a full disk, Ctrl-C: out_dir back as it was, else a rerun is refused as "not empty"
        if Path(out_dir).is_dir():
            ckpt.undo_folder(out_dir, made)
        raise
