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


def test_a_tokenizer_larger_than_the_model_is_refused(folder):
    """A tokenizer that is not the model's (more ids than its embeddings) is refused on loading; fill-mask
    and eval ended in "RuntimeError: FastMLMForMaskedLM: input_ids must lie in [0, 16)", a traceback."""
    (folder / "vocab.txt").write_text("\n".join(SPECIAL_TOKENS + tuple(WORDS) + ("more", "words")) + "\n")
    with pytest.raises(ckpt.CheckpointError, match=f"the tokenizer has {VOCAB + 2} tokens, more than the model's "
                                                   f"vocabulary of {VOCAB}: it is not the tokenizer"):
        predict.load_checkpoint(folder)


def test_evaluating_text_with_nothing_masked_is_an_error_not_nan(folder, tmp_path):
    """Text whose every token is special (or too short for one mask) had NaN loss, accuracy and perplexity
    printed as results (and `eval --json` wrote NaN, which is not JSON)."""
    model, tokenizer = predict.load_checkpoint(folder)
    for text in ("[CLS] [SEP] [MASK] [PAD]\n", "cat\n"):
        (tmp_path / "valid.txt").write_text(text)
        with pytest.raises(ValueError, match=r"no token of .*valid.txt.* was masked at mask rate 0.01"):
            predict.evaluate_text(model, tokenizer, [tmp_path / "valid.txt"], seq_len=8, mask_rate=0.01)


def test_a_config_of_another_model_type_names_the_folder(tmp_path):
    """A RoBERTa (or any non-BERT) config.json said "cannot load this Hugging Face config: model_type is
    'roberta'; ...", naming no folder."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta", "vocab_size": VOCAB}))
    (tmp_path / "vocab.txt").write_text("\n".join(SPECIAL_TOKENS + tuple(WORDS)) + "\n")
    with pytest.raises(ckpt.CheckpointError, match=rf"(?s)^{tmp_path}: cannot load this Hugging Face config:\n.*"
                                                   r"model_type is 'roberta'"):
        predict.load_checkpoint(tmp_path)


def test_fill_mask_text_that_is_not_utf8_is_named(folder):
    """A latin-1 command-line argument reaches Python as lone surrogates: it ended in tokenizers'
    "TypeError: TextInputSequence must be str", a traceback."""
    model, tokenizer = predict.load_checkpoint(folder)
    text = b"caf\xe9 [MASK] .".decode("utf-8", "surrogateescape")  # what sys.argv holds for those bytes
    with pytest.raises(ValueError, match="the text holds bytes that are not UTF-8 \\(at character 3"):
        predict.fill_mask(model, tokenizer, text)


def test_a_failed_export_leaves_the_folder_as_it_was(folder, tmp_path, monkeypatch):
    """A write that fails half way (a full disk, Ctrl-C) left config.json and model.safetensors behind, and the
    export run again was refused: "output directory ... is not empty"."""
    from fastmlm import hf

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf, "save_hf_tokenizer", full_disk)
    (tmp_path / "empty").mkdir()
    for out, existed in ((tmp_path / "new", False), (tmp_path / "empty", True)):
        with pytest.raises(OSError, match="No space left"):
            predict.export_hf(folder, out)
        assert (out.is_dir() and not any(out.iterdir())) if existed else not out.exists()
    monkeypatch.undo()
    assert (predict.export_hf(folder, tmp_path / "new") / "config.json").is_file()  # the same export, again
