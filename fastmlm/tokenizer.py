"""The WordPiece tokenizer: training it (deterministically), loading it, its special tokens.

A ``tokenizers`` WordPiece model with the BERT normaliser and pre-tokeniser, trained on
the corpus (:func:`train_tokenizer`, the same ids in every process) or loaded from
``tokenizer.json`` / ``vocab.txt`` (:func:`load_tokenizer`). Special tokens:
``[PAD] [UNK] [CLS] [SEP] [MASK]`` (:func:`special_ids`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _bert_pipeline(model, lowercase: bool):
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers

    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                      strip_accents=None, lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def _private_use_char(k: int) -> str:
    """The k-th private-use code point of planes 15 and 16 (their last two, noncharacters, skipped).

    The BERT normaliser deletes private-use characters from text (``clean_text``), so after
    normalising none of these can be a character of the corpus.
    """
    per_plane = 0xFFFE
    if k >= 2 * per_plane:
        raise ValueError(f"the tokenizer training text has more than {2 * per_plane} distinct characters")
    return chr(0xF0000 + k if k < per_plane else 0x100000 + k - per_plane)


def _cut_at(pre_tokenizer, char: str) -> Optional[str]:
    """What the pre-tokeniser makes of ``char``, asked of it (its rule is per character): " " for
    whitespace (words end there), " char " for punctuation (a word of its own), None inside words."""
    pieces = pre_tokenizer.pre_tokenize_str(f"a{char}a")
    return {1: None, 2: " ", 3: f" {char} "}[len(pieces)]


def _respelled_documents(documents: Iterable[str], normalizer, pre_tokenizer, stand_in: dict) -> Iterator[str]:
    """Each document as the space-separated words WordPiece training counts, every character after
    a word's first replaced by its private-use stand-in (``stand_in``: ord -> str, filled here in
    order of first appearance); then each in-word character once, as a word of its own, so that it
    is in the trainer's alphabet even if only ever seen inside words, as WordPieceTrainer has it.

    Words are cut with str.translate/split, not ``pre_tokenize_str`` (which builds a Python tuple
    per word and took 3/4 of the time), by the same per-character rule, learnt from the
    pre-tokeniser for each new character.
    """
    cuts: dict[int, str] = {}
    seen: set[str] = set()
    any_words = False
    for n, doc in enumerate(documents):
        if not isinstance(doc, str):  # else tokenizers' "'NoneType' object is not an instance of 'str'"
            raise TypeError(f"documents must be str, got {type(doc).__name__} (document {n})")
        text = normalizer.normalize_str(doc)
        for char in sorted(set(text) - seen):  # sorted: a set's order changes with PYTHONHASHSEED
            seen.add(char)
            cut = _cut_at(pre_tokenizer, char)
            if cut is None:
                stand_in[ord(char)] = _private_use_char(len(stand_in))
            else:
                cuts[ord(char)] = cut
        words = [word for word in text.translate(cuts).split(" ") if word]
        any_words = any_words or bool(words)
        yield " ".join(word[0] + word[1:].translate(stand_in) for word in words)
    if not any_words:
        raise ValueError("the documents hold no text to train a tokenizer on")
    yield " ".join(sorted(map(chr, stand_in)))


def train_tokenizer(documents: Iterable[str], vocab_size: int = 8000, lowercase: bool = True,
                    min_frequency: int = 2):
    """Train a WordPiece tokenizer (``tokenizers.Tokenizer``) on an iterable of documents.

    Deterministic: the same documents in the same order give the same vocabulary with the same
    ids in any process. ``tokenizers``' own WordPieceTrainer is not: it numbers the ``##x``
    pieces in the iteration order of a Rust hash map (seeded afresh for every map) and breaks
    ties between merges of equal count by those numbers, so two trainings differed in ids and,
    at larger vocabularies, in tokens. Here the characters that continue a word are given to
    the (same) BPE merge algorithm as distinct private-use characters, numbered in order of
    first appearance; the trainer sorts its alphabet, so every id and every tie is fixed by the
    data alone. The ``##`` spelling is restored afterwards.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if isinstance(documents, str):  # iterating a str would train on each of its characters as a document
        raise TypeError("documents must be an iterable of str (one per document), got a str; wrap it: [text]")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < len(SPECIAL_TOKENS) + 100:
        raise ValueError(f"vocab_size must be an int of at least {len(SPECIAL_TOKENS) + 100}, got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 0:
        raise ValueError(f"min_frequency must be an int >= 0, got {min_frequency!r}")
    tokenizer = _bert_pipeline(models.WordPiece(unk_token="[UNK]"), lowercase)
    merger = Tokenizer(models.BPE())
    merger.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    stand_in: dict[int, str] = {}
    merger.train_from_iterator(_respelled_documents(documents, tokenizer.normalizer, tokenizer.pre_tokenizer,
                                                    stand_in), trainer=trainer)
    original = {ord(s): chr(c) for c, s in stand_in.items()}
    vocab = {("##" if ord(piece[0]) in original else "") + piece.translate(original): index
             for piece, index in merger.get_vocab().items()}
    if len(vocab) != merger.get_vocab_size():  # cannot happen: a word's first piece never starts with "##"
        raise RuntimeError("train_tokenizer: two trained pieces have the same spelling")
    tokenizer.model = models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100)
    special_ids(tokenizer)  # the trainer put them first; check anyway
    return tokenizer


def _read_vocab_txt(path: Path) -> dict[str, int]:
    """A BERT ``vocab.txt``: one token per line, its id the line's index (trailing blanks ignored,
    as ``tokenizers`` reads it). A duplicated token would leave a hole in the ids, so is refused."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{path} is not a UTF-8 text file (byte {exc.start}, on line {line}, is not UTF-8); "
                         f"a vocab.txt holds one token per line") from None
    lines = text.split("\n")  # "\n" only, as tokenizers splits (str.splitlines also cuts at \x85, \u2028...)
    if lines[-1] == "":
        lines.pop()
    vocab: dict[str, int] = {}
    for index, line in enumerate(lines):
        token = line.rstrip()
        if token in vocab:
            raise ValueError(f"{path}:{index + 1}: the token {token!r} is already on line {vocab[token] + 1}; "
                             f"a vocab.txt must list each token once (its line gives its id)")
        vocab[token] = index
    return vocab


def load_tokenizer(path: os.PathLike | str, lowercase: Optional[bool] = None):
    """Load ``tokenizer.json`` or a BERT ``vocab.txt`` (a folder holding either works too).

    For ``vocab.txt`` the BERT normaliser lowercases unless the vocabulary holds
    upper-case word pieces (a cased model) or ``lowercase`` says otherwise; a token listed
    twice is refused. A ``tokenizer.json``'s truncation and padding are turned off.
    """
    from tokenizers import Tokenizer, models

    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "vocab.txt"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"{path} holds neither tokenizer.json nor vocab.txt")
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}")
    if path.suffix == ".json":
        if lowercase is not None:  # it would be ignored: the file's own normaliser decides
            raise ValueError(f"lowercase={lowercase!r} applies to a vocab.txt only; {path} carries its own "
                             f"normaliser, which decides; leave lowercase=None")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ValueError(f"{path} is not a valid tokenizers JSON file: {exc}") from None
        # fastmlm packs whole documents itself: a saved truncation would cut each one short and
        # padding would pack [PAD] ids as text.
        tokenizer.no_truncation()
        tokenizer.no_padding()
    else:
        vocab = _read_vocab_txt(path)
        if lowercase is None:
            lowercase = not any(t != t.lower() for t in vocab if t not in SPECIAL_TOKENS and not t.startswith("[unused"))
        tokenizer = _bert_pipeline(models.WordPiece(vocab, unk_token="[UNK]"), lowercase)
    special_ids(tokenizer)
    return tokenizer


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    @property
    def all(self) -> tuple[int, ...]:
        return (self.pad, self.unk, self.cls, self.sep, self.mask)


def special_ids(tokenizer) -> SpecialIds:
    """Ids of the five special tokens; a clear error when the vocabulary lacks one."""
    ids = {}
    for token in SPECIAL_TOKENS:
        ids[token] = tokenizer.token_to_id(token)
        if ids[token] is None:
            raise ValueError(f"the tokenizer has no {token} token; fastmlm needs {' '.join(SPECIAL_TOKENS)}")
    # Make "[MASK]" typed in text (fill-mask) map to the token, whatever the normaliser does.
    from tokenizers import AddedToken

    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return SpecialIds(*(ids[t] for t in SPECIAL_TOKENS))


def check_whole_encodings(tokenizer) -> None:
    """Packing and counting need every token of a document: refuse a tokenizer that truncates or pads."""
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        raise ValueError(f"the tokenizer has truncation={tokenizer.truncation} and padding={tokenizer.padding}; "
                         f"both must be off (None): call tokenizer.no_truncation() and tokenizer.no_padding() "
                         f"(load_tokenizer does)")


def continuation_flags(tokenizer) -> np.ndarray:
    """(V,) bool: True for word pieces that continue a word (``##…``), for whole-word masking.

    The mark is the model's own (WordPiece's ``continuing_subword_prefix``); a model without one
    (a BPE or Unigram tokenizer.json) is refused, since every token would count as a whole word and
    whole-word masking would silently be token masking."""
    prefix = getattr(tokenizer.model, "continuing_subword_prefix", None)
    if not prefix:
        raise ValueError(f"whole-word masking needs a tokenizer that marks the pieces continuing a word (a "
                         f"WordPiece model's '##'); this one's model is {type(tokenizer.model).__name__} without "
                         f"such a mark: use whole_word=False")
    flags = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=bool)
    for token, index in tokenizer.get_vocab(with_added_tokens=True).items():
        flags[index] = token.startswith(prefix)
    return flags
