"""fastmlm.predict: loading a checkpoint (verified or refused), fill-mask, evaluation and export
arguments. A tiny model and a word-level vocab.txt, no training."""
import math

import pytest

from fastmlm import checkpoint as ckpt
from fastmlm import predict
from fastmlm.config import preset
from fastmlm.tokenizer import SPECIAL_TOKENS
from fastmlm.model import FastMLMForMaskedLM

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "is", "empty", "."]
VOCAB = len(SPECIAL_TOKENS) + len(WORDS)


@pytest.fixture
def folder(tmp_path):
    """What save_pretrained writes, plus a vocab.txt beside it: a folder load_checkpoint takes."""
    model = FastMLMForMaskedLM(preset("tiny", vocab_size=VOCAB, hidden_size=32, num_heads=2, intermediate_size=48,
                                      max_position_embeddings=32))
    path = model.save_pretrained(tmp_path / "model")
    (path / "vocab.txt").write_text("\n".join(SPECIAL_TOKENS + tuple(WORDS)) + "\n")
    return path


def test_load_checkpoint_verifies_the_manifest_or_refuses(folder):
    model, tokenizer = predict.load_checkpoint(folder)
    assert not model.training and model.config.vocab_size == VOCAB == tokenizer.get_vocab_size()
    config = folder / "config.json"
    original = config.read_text()
    config.write_text(original.replace('"hidden_dropout": 0.1', '"hidden_dropout": 0.5'))  # an edited config
    with pytest.raises(ckpt.CheckpointError, match="corrupt: config.json does not match its sha256"):
        predict.load_checkpoint(folder)
    config.write_text(original)
    (folder / ckpt.MANIFEST).unlink()  # refused as resume refuses it, not loaded unverified
    with pytest.raises(ckpt.CheckpointError, match="has no manifest.json"):
        predict.load_checkpoint(folder)


def test_fill_mask_top_k_must_fit_the_vocabulary(folder):
    model, tokenizer = predict.load_checkpoint(folder)
    (options,) = predict.fill_mask(model, tokenizer, "the cat [MASK] on the mat .", top_k=VOCAB)
    assert len(options) == VOCAB and [p for _, p in options[-len(SPECIAL_TOKENS):]] == [0.0] * len(SPECIAL_TOKENS)
    for bad in (0, -1, VOCAB + 1, 2.0, True):
        with pytest.raises(ValueError, match=rf"top_k must be an int in \[1, {VOCAB}\], got {bad!r}"):
            predict.fill_mask(model, tokenizer, "the [MASK] sat .", top_k=bad)


def test_evaluate_text_argument_errors(folder, tmp_path):
    model, tokenizer = predict.load_checkpoint(folder)
    text = tmp_path / "valid.txt"
    text.write_text("the cat sat on the mat .\n\nthe dog ran .\n")
    metrics = predict.evaluate_text(model, tokenizer, [text], seq_len=8, batch_size=2)
    assert metrics["n_masked"] > 0 and math.isfinite(metrics["loss"])
    for kwargs, message in [
        (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
        (dict(seq_len=2), "seq_len must be an int >= 3, got 2"),
        (dict(seq_len=33), "seq_len 33 exceeds the model's max_position_embeddings 32"),
        (dict(max_batches=0), "max_batches must be an int >= 1, got 0"),
        (dict(mask_rate=0.0), r"mask_rate must lie in \(0, 1\), got 0.0"),
        (dict(mask_rate=1.0), r"mask_rate must lie in \(0, 1\), got 1.0"),
        (dict(mask_rate=float("nan")), r"mask_rate must lie in \(0, 1\), got nan"),
    ]:
        with pytest.raises(ValueError, match=message):
            predict.evaluate_text(model, tokenizer, [text], **{"seq_len": 8, **kwargs})


def test_export_hf_refuses_an_existing_file_or_a_non_empty_folder(folder, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=f"output directory {tmp_path / 'file'} is an existing file"):
        predict.export_hf(folder, tmp_path / "file")
    with pytest.raises(ValueError, match=f"output directory {folder} is not empty"):
        predict.export_hf(folder, folder)  # onto the checkpoint itself
    ckpt.verify_checkpoint(folder)  # refused before anything was written
    (tmp_path / "empty").mkdir()
    out = predict.export_hf(folder, tmp_path / "empty")  # an existing empty folder is fine
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer.json"} <= {p.name for p in out.iterdir()}
