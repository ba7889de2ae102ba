"""A small train/valid corpus cut from the bundled one, with a tokenizer trained on it (training/CLI tests)."""
import itertools
from pathlib import Path

import pytest

from fastmlm.config import train_preset
from fastmlm.corpus_reader import bundled_corpus, read_documents
from fastmlm.tokenizer import train_tokenizer


def write_small_corpus(root: Path, n_train: int = 360, n_valid: int = 40) -> list[str]:
    """Write the first ``n_train`` + ``n_valid`` bundled documents as train.txt and valid.txt under
    ``root``; return the training documents."""
    docs = list(itertools.islice(read_documents([bundled_corpus("train")]), n_train + n_valid))
    (root / "train.txt").write_text("\n\n".join(docs[:n_train]))
    (root / "valid.txt").write_text("\n\n".join(docs[n_train:]))
    return docs[:n_train]


def make_small_corpus(root: Path, n_train: int = 360, n_valid: int = 40, vocab_size: int = 400) -> Path:
    """Write train.txt, valid.txt and tokenizer.json under ``root``; return ``root``."""
    train_docs = write_small_corpus(root, n_train, n_valid)
    train_tokenizer(train_docs, vocab_size=vocab_size).save(str(root / "tokenizer.json"))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A module's small corpus folder (train.txt, valid.txt, tokenizer.json)."""
    return make_small_corpus(tmp_path_factory.mktemp("corpus"))


def tiny(corpus: Path, out_dir, **overrides):
    """The ``tiny`` training preset on the small corpus in ``corpus``, writing to ``out_dir``."""
    base = dict(data=[str(corpus / "train.txt")], valid_data=[str(corpus / "valid.txt")],
                tokenizer=str(corpus / "tokenizer.json"), out_dir=str(out_dir), progress=False)
    return train_preset("tiny", **{**base, **overrides})


def one_thread():
    """Generator for an autouse fixture: tiny models run fastest on one thread (and no
    OpenMP spinning against other processes on a busy CI machine); restores the count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
