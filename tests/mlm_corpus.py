"""A small train/valid corpus cut from the bundled one, with a tokenizer trained on it (training/CLI tests)."""
import itertools
from pathlib import Path

from fastmlm import data


def write_small_corpus(root: Path, n_train: int = 360, n_valid: int = 40) -> list[str]:
    """Write the first ``n_train`` + ``n_valid`` bundled documents as train.txt and valid.txt under
    ``root``; return the training documents."""
    docs = list(itertools.islice(data.read_documents([data.bundled_corpus("train")]), n_train + n_valid))
    (root / "train.txt").write_text("\n\n".join(docs[:n_train]))
    (root / "valid.txt").write_text("\n\n".join(docs[n_train:]))
    return docs[:n_train]


def make_small_corpus(root: Path, n_train: int = 360, n_valid: int = 40, vocab_size: int = 400) -> Path:
    """Write train.txt, valid.txt and tokenizer.json under ``root``; return ``root``."""
    train_docs = write_small_corpus(root, n_train, n_valid)
    data.train_tokenizer(train_docs, vocab_size=vocab_size).save(str(root / "tokenizer.json"))
    return root


def one_thread():
    """Generator for an autouse fixture: tiny models run fastest on one thread (and no
    OpenMP spinning against other processes on a busy CI machine); restores the count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
