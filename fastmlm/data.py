"""Data for MLM training: corpus files, WordPiece tokenizer, packing, dynamic masking.

    text files ──read_documents──► documents ──tokenize──► segments [CLS] … [SEP]
        ──RowPacker──► full rows of seq_len tokens ──MaskingCollator──► Batch

* **Corpus.** ``.txt`` files hold documents separated by blank lines (the lines
  of one document are joined); ``.jsonl`` files hold one ``{"text": ...}``
  object per line; ``.gz`` versions of both work, and folders are searched
  recursively. Files are streamed, so a corpus larger than memory is fine.
  The bundled corpus (``fastmlm/corpus/{train,valid}.txt.gz``) is the default.
  Text is UTF-8 (a byte-order mark is skipped). Bytes that are not UTF-8 are
  read as U+FFFD, which the tokenizer drops, with one :class:`CorpusWarning`
  per file giving their count (a few stray bytes should not stop a run; a
  file in another encoding shows in the count). A file with no text is
  skipped with a warning; a JSONL line that is not ``{"text": "..."}`` and a
  corrupt or truncated ``.gz`` are errors naming the file and line.
* **Tokenizer.** A ``tokenizers`` WordPiece model with the BERT normaliser and
  pre-tokeniser, trained on the corpus (deterministically: see
  :func:`train_tokenizer`) or loaded from ``tokenizer.json`` / ``vocab.txt``.
  Special tokens: ``[PAD] [UNK] [CLS] [SEP] [MASK]``.
* **Packing.** Documents are laid end to end in rows of exactly ``seq_len``
  tokens, as ``[CLS] piece [SEP]`` segments (a document that overflows a row
  is split and continues in the next), so rows carry no padding. In the padded
  layout a row is one attention context (its segments see each other, as in
  RoBERTa's full-sentence packing) and a batch without padding is passed with
  no attention mask at all; in the packed layout every segment is its own
  sequence in ``cu_seqlens`` and attends only to itself.
* **Masking.** A fixed share (``mask_rate``) of the maskable tokens (every
  token but the special ones) is chosen per batch, by token or by whole word;
  80% become ``[MASK]``, 10% a random token, 10% stay. The chosen positions go
  to the model as ``masked_positions``, a static-length ``(R,)`` index padded
  with -1 (R depends only on batch size, sequence length and rate), so tensor
  shapes never change from step to step.

Randomness is derived from ``(seed, epoch)`` for shuffling and ``(seed,
batch index)`` for masking, so a stream restarted at a saved position yields
exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import gzip
import io
import itertools
import json
import math
import os
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
IGNORE_INDEX = -100
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")


# --------------------------------------------------------------------------- corpus files
def bundled_corpus(split: str) -> Path:
    """Path of the bundled corpus split, ``"train"`` or ``"valid"``."""
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    path = CORPUS_DIR / f"{split}.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"the bundled corpus file {path} is missing (see fastmlm/corpus/README.md)")
    return path


def corpus_files(paths: Sequence[os.PathLike | str]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of text/JSONL files."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
            if not found:
                raise FileNotFoundError(f"{path} holds no {'/'.join(TEXT_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            if not path.name.endswith(TEXT_SUFFIXES):
                raise ValueError(f"{path}: unsupported file type; expected one of {TEXT_SUFFIXES}")
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return files


class CorpusWarning(UserWarning):
    """Text of a corpus file was lost in reading (bytes that are not UTF-8) or the file held none."""


# Text that is not Unicode: ``surrogateescape`` reads each byte that is not UTF-8 as one lone
# surrogate (so such bytes are counted line by line without a second decoding pass), and a JSON
# \udc80 escape without its pair gives one too (which tokenizers cannot even take).
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class _Undecodable:
    """What one file held that is not text: replaced by U+FFFD (which the tokenizer drops) and
    counted, for one :class:`CorpusWarning` when the file has been read."""

    def __init__(self, path: Path):
        self.path, self.count, self.lines, self.first_line, self.last_line = path, 0, 0, 0, 0

    def replace(self, text: str, line: int) -> str:
        text, n = _LONE_SURROGATE.subn("\ufffd", text)
        if n:
            self.count += n
            self.lines += line != self.last_line  # a JSONL line is looked at twice: raw, then its "text"
            self.first_line, self.last_line = self.first_line or line, line
        return text

    def warn(self) -> None:
        if self.count:
            warnings.warn(f"{self.path}: {self.count} undecodable byte(s) on {self.lines} line(s), the first on "
                          f"line {self.first_line} (not UTF-8, or in JSONL an unpaired surrogate escape); read as "
                          f"U+FFFD, they are lost to the tokenizer. Re-encode the file as UTF-8 (e.g. iconv -f "
                          f"latin1 -t utf-8) to keep those characters", CorpusWarning)


def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig: a byte-order mark (Windows editors write one) would otherwise make line 1 of a
    # JSONL file invalid JSON.
    opener = gzip.open if path.name.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape")


def _lines_of(path: Path, undecodable: _Undecodable) -> Iterator[tuple[int, str]]:
    """Numbered lines of a text file, undecodable bytes replaced (and counted in ``undecodable``);
    a corrupt or truncated ``.gz`` is a ValueError naming the file and the last line read."""
    number = 0
    try:
        with _open_text(path) as f:
            for number, line in enumerate(f, 1):
                yield number, undecodable.replace(line, number)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:  # what gzip raises for damaged data
        raise ValueError(f"{path}: cannot be read past line {number}: {exc} (the gzip data is corrupt or "
                         f"truncated)") from None


def _describe_record(record) -> str:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}"
    if "text" not in record:
        return f"an object with keys {sorted(record)}"
    return f'a "text" of type {type(record["text"]).__name__}'


def _documents_of(path: Path) -> Iterator[str]:
    undecodable = _Undecodable(path)
    found = 0
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        for number, line in _lines_of(path, undecodable):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f'{path}:{number}: each JSONL line must be an object with a "text" string, '
                                 f'got {_describe_record(record)}')
            if text.strip():  # an empty text is an empty document, not lost data
                found += 1
                yield undecodable.replace(text, number)
    else:
        lines: list[str] = []
        for _, line in _lines_of(path, undecodable):
            if line.strip():
                lines.append(line.strip())
            elif lines:
                found += 1
                yield "\n".join(lines)
                lines = []
        if lines:
            found += 1
            yield "\n".join(lines)
    undecodable.warn()
    if not found:
        warnings.warn(f"{path} holds no text; skipped", CorpusWarning)


def read_documents(paths: Sequence[os.PathLike | str], rank: int = 0, world_size: int = 1) -> Iterator[str]:
    """Stream the documents of ``paths``; with ``world_size > 1`` only every world_size-th one, from ``rank``."""
    index = 0
    for path in corpus_files(paths):
        for doc in _documents_of(path):
            if index % world_size == rank:
                yield doc
            index += 1


# --------------------------------------------------------------------------- tokenizer
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
    for doc in documents:
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

    if vocab_size < len(SPECIAL_TOKENS) + 100:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 100}, got {vocab_size}")
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


def _check_whole_encodings(tokenizer) -> None:
    """Packing and counting need every token of a document: refuse a tokenizer that truncates or pads."""
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        raise ValueError(f"the tokenizer has truncation={tokenizer.truncation} and padding={tokenizer.padding}; "
                         f"both must be off (None): call tokenizer.no_truncation() and tokenizer.no_padding() "
                         f"(load_tokenizer does)")


def continuation_flags(tokenizer) -> np.ndarray:
    """(V,) bool: True for word pieces that continue a word (``##…``), for whole-word masking."""
    flags = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=bool)
    for token, index in tokenizer.get_vocab(with_added_tokens=True).items():
        flags[index] = token.startswith("##")
    return flags


# --------------------------------------------------------------------------- packing
@dataclass
class Row:
    """One packed row: the segments that share it, each ``[CLS] … [SEP]``."""
    segments: list[np.ndarray]

    def __len__(self) -> int:
        return sum(len(s) for s in self.segments)


class RowPacker:
    """Fill rows of exactly ``seq_len`` tokens with ``[CLS] piece [SEP]`` segments of documents.

    Documents are laid end to end; a document that does not fit the rest of a
    row is split, and its remainder opens the next row, so every row is full
    (no padding at all) except possibly the last one, given by :meth:`flush`.
    A segment needs at least 3 tokens; when a document ends 1 or 2 tokens short
    of the row's end, those slots get extra ``[SEP]`` tokens (never masked).
    """

    def __init__(self, seq_len: int, cls: int, sep: int):
        if seq_len < 3:
            raise ValueError(f"seq_len must be at least 3 ([CLS] x [SEP]), got {seq_len}")
        self.seq_len, self.cls, self.sep = seq_len, cls, sep
        self.segments: list[np.ndarray] = []
        self.used = 0

    def add(self, ids: Sequence[int]) -> Iterator[Row]:
        """Add one tokenised document (no special tokens); yield the rows it completes."""
        ids = np.asarray(ids, dtype=np.int64)
        while len(ids):
            room = self.seq_len - self.used
            take = min(len(ids), room - 2)
            piece, ids = ids[:take], ids[take:]
            left = room - take - 2
            tail = [self.sep] * (1 + (left if left < 3 else 0))  # 1-2 slots cannot hold a segment
            self.segments.append(np.concatenate(([self.cls], piece, tail)))
            self.used += len(self.segments[-1])
            if self.used == self.seq_len:
                yield self._close()

    def flush(self) -> Iterator[Row]:
        """The last, partly filled row, if any."""
        if self.segments:
            yield self._close()

    def _close(self) -> Row:
        row = Row(self.segments)
        self.segments, self.used = [], 0
        return row


def iter_rows(documents: Iterable[str], tokenizer, seq_len: int) -> Iterator[Row]:
    """Tokenise documents (64 at a time, in Rust) and pack them into rows of ``seq_len`` tokens."""
    _check_whole_encodings(tokenizer)
    special = special_ids(tokenizer)
    packer = RowPacker(seq_len, special.cls, special.sep)
    chunk: list[str] = []
    for doc in itertools.chain(documents, [None]):
        if doc is not None:
            chunk.append(doc)
        if len(chunk) == 64 or (doc is None and chunk):
            for enc in tokenizer.encode_batch(chunk, add_special_tokens=False):
                yield from packer.add(enc.ids)
            chunk.clear()
    yield from packer.flush()


# --------------------------------------------------------------------------- masking collator
@dataclass
class Batch:
    """One model input. Padded layout: (B, S) tensors, ``attention_mask`` None when no row has
    padding; packed layout: (T = B*S,) tensors + cu_seqlens (row padding is a sequence of its own).

    ``masked_positions`` (R,) int64 flat indices into the B*S (or T) tokens, sorted, padded with -1;
    ``labels`` the original token at masked positions, -100 elsewhere. ``n_masked`` and
    ``n_tokens`` (real, non-padding tokens) are host integers known without reading the device.
    """
    input_ids: torch.Tensor
    labels: torch.Tensor
    masked_positions: torch.Tensor
    attention_mask: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: Optional[int] = None
    n_masked: int = 0
    n_tokens: int = 0

    def to(self, device, non_blocking: bool = False) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.masked_positions), move(self.attention_mask),
                     move(self.cu_seqlens), self.max_seqlen, self.n_masked, self.n_tokens)

    def model_inputs(self) -> dict:
        """Keyword arguments for ``FastMLMForMaskedLM.__call__``."""
        inputs = dict(input_ids=self.input_ids, labels=self.labels, masked_positions=self.masked_positions)
        if self.cu_seqlens is not None:
            inputs.update(cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen)
        elif self.attention_mask is not None:
            inputs.update(attention_mask=self.attention_mask)
        return inputs


def masked_slots(batch_size: int, seq_len: int, mask_rate: float) -> int:
    """The static length R of ``masked_positions``: enough for ``mask_rate`` of a full batch."""
    return max(1, math.ceil(mask_rate * batch_size * seq_len))


class MaskingCollator:
    """Rows -> a masked :class:`Batch` of static shape (see the module docstring).

    ``mask_rate`` of the maskable tokens of the batch (rounded stochastically)
    are chosen; with ``whole_word`` whole words are chosen until that budget is
    reached. Of the chosen ones, ``mask_prob`` become [MASK], ``random_prob`` a
    random non-special token, and the rest stay as they are.
    """

    def __init__(self, tokenizer, seq_len: int, batch_size: int, mask_rate: float = 0.15,
                 whole_word: bool = False, layout: str = "padded", mask_prob: float = 0.8, random_prob: float = 0.1):
        if not 0.0 < mask_rate < 1.0:
            raise ValueError(f"mask_rate must lie in (0, 1), got {mask_rate}")
        if layout not in ("padded", "packed"):
            raise ValueError(f"layout must be 'padded' or 'packed', got {layout!r}")
        if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
            raise ValueError("mask_prob and random_prob must be >= 0 and sum to at most 1")
        self.special = special_ids(tokenizer)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.seq_len, self.batch_size, self.mask_rate = seq_len, batch_size, mask_rate
        self.whole_word, self.layout = whole_word, layout
        self.mask_prob, self.random_prob = mask_prob, random_prob
        self.slots = masked_slots(batch_size, seq_len, mask_rate)
        is_special = np.zeros(self.vocab_size, dtype=bool)
        is_special[list(self.special.all)] = True
        self.is_special = is_special
        self.random_ids = np.flatnonzero(~is_special)  # replacement tokens: never a special one
        self.is_continuation = continuation_flags(tokenizer) if whole_word else None

    def __call__(self, rows: Sequence[Row], rng: np.random.Generator) -> Batch:
        if len(rows) > self.batch_size:
            raise ValueError(f"got {len(rows)} rows for a batch of {self.batch_size}")
        B, S = self.batch_size, self.seq_len
        ids = np.full((B, S), self.special.pad, dtype=np.int64)
        seg_lens: list[int] = []
        for r, row in enumerate(rows):
            if len(row) > S:
                raise ValueError(f"a row of {len(row)} tokens does not fit seq_len={S}")
            flat = np.concatenate(row.segments) if row.segments else np.zeros(0, dtype=np.int64)
            ids[r, :len(flat)] = flat
            seg_lens.extend(len(s) for s in row.segments)
            if len(flat) < S:  # the row's padding is a sequence of its own in the packed layout
                seg_lens.append(S - len(flat))
        seg_lens.extend([S] * (B - len(rows)))  # missing rows (end of data): all padding
        real = ids != self.special.pad
        flat_ids = ids.reshape(-1)
        chosen = self._choose(flat_ids, rng)                     # sorted flat positions
        labels = np.full(B * S, IGNORE_INDEX, dtype=np.int64)
        labels[chosen] = flat_ids[chosen]
        inputs = flat_ids.copy()
        action = rng.random(len(chosen))
        to_mask = chosen[action < self.mask_prob]
        to_random = chosen[(action >= self.mask_prob) & (action < self.mask_prob + self.random_prob)]
        inputs[to_mask] = self.special.mask
        inputs[to_random] = self.random_ids[rng.integers(0, len(self.random_ids), len(to_random))]
        positions = np.full(self.slots, -1, dtype=np.int64)
        positions[:len(chosen)] = chosen

        batch = Batch(input_ids=torch.from_numpy(inputs), labels=torch.from_numpy(labels),
                      masked_positions=torch.from_numpy(positions), n_masked=len(chosen), n_tokens=int(real.sum()))
        if self.layout == "padded":
            batch.input_ids, batch.labels = batch.input_ids.view(B, S), batch.labels.view(B, S)
            batch.attention_mask = None if real.all() else torch.from_numpy(real)  # full rows need no mask
        else:
            batch.cu_seqlens = torch.from_numpy(np.concatenate(([0], np.cumsum(seg_lens))).astype(np.int32))
            batch.max_seqlen = max(seg_lens)
        return batch

    def _choose(self, flat_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Sorted flat positions to predict: ``mask_rate`` of the maskable tokens, never special ones."""
        maskable = np.flatnonzero(~self.is_special[flat_ids])
        budget = min(int(math.floor(self.mask_rate * len(maskable) + rng.random())), self.slots)
        if budget == 0:
            return np.zeros(0, dtype=np.int64)
        if not self.whole_word:
            return np.sort(rng.choice(maskable, size=budget, replace=False))
        # Whole words: a word starts at a maskable token that is not a "##" piece (or that
        # follows a non-maskable token); its pieces are the run of "##" tokens after it.
        starts = ~self.is_continuation[flat_ids[maskable]]
        starts[1:] |= np.diff(maskable) != 1
        word_of = np.cumsum(starts) - 1
        word_starts = np.flatnonzero(starts)
        word_sizes = np.diff(np.append(word_starts, len(maskable)))
        picked, total = [], 0
        for w in rng.permutation(len(word_starts)):
            if total + word_sizes[w] <= budget:
                picked.append(w)
                total += word_sizes[w]
                if total == budget:
                    break
        keep = np.isin(word_of, np.asarray(picked, dtype=np.int64))
        return maskable[keep]


# --------------------------------------------------------------------------- batch streams
class BatchStream:
    """An endless, resumable stream of masked training batches.

    Epoch after epoch: documents are read (this rank's share), tokenised and
    packed, rows are shuffled through a buffer of ``shuffle_rows`` rows (seeded
    by ``(seed, epoch)``) and grouped into batches; batch ``i`` is masked with
    ``(seed, i)``. ``position`` counts the batches yielded; a new stream made
    with ``start=position`` replays the data up to there (tokenising it again,
    but not masking it) and continues with exactly the batches that follow.
    Packing efficiency (real tokens / batch slots) is kept in ``efficiency``.
    """

    def __init__(self, paths, tokenizer, collator: MaskingCollator, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle_rows: int = 2048, start: int = 0):
        self.paths, self.tokenizer, self.collator = paths, tokenizer, collator
        self.seed, self.rank, self.world_size, self.shuffle_rows = seed, rank, world_size, shuffle_rows
        self.position = start
        self.real_tokens = 0
        self.slots = 0

    @property
    def efficiency(self) -> float:
        return self.real_tokens / self.slots if self.slots else 0.0

    def _row_batches(self) -> Iterator[list[Row]]:
        B, S = self.collator.batch_size, self.collator.seq_len
        epoch = 0
        while True:
            rng = np.random.default_rng([self.seed, epoch, 1])
            buffer: list[Row] = []
            batch: list[Row] = []
            produced = False

            def take(row: Row):
                batch.append(row)
                if len(batch) == B:
                    out = list(batch)
                    batch.clear()
                    return out
                return None

            docs = read_documents(self.paths, self.rank, self.world_size)
            for row in iter_rows(docs, self.tokenizer, S):
                if len(buffer) < self.shuffle_rows:
                    buffer.append(row)
                    continue
                slot = int(rng.integers(len(buffer)))
                row, buffer[slot] = buffer[slot], row
                full = take(row)
                if full:
                    produced = True
                    yield full
            rng.shuffle(buffer)
            for row in buffer:
                full = take(row)
                if full:
                    produced = True
                    yield full
            if batch and not produced:  # a corpus smaller than one batch: use partial batches
                yield list(batch)
                produced = True
            if not produced:
                raise ValueError(f"the training data ({self.paths}) holds no text for rank {self.rank}")
            epoch += 1

    def __iter__(self) -> Iterator[Batch]:
        index = 0
        for rows in self._row_batches():
            if index >= self.position:
                batch = self.collator(rows, np.random.default_rng([self.seed, index, 2]))
                self.position = index + 1
                self.real_tokens += batch.n_tokens
                self.slots += self.collator.batch_size * self.collator.seq_len
                yield batch
            index += 1


def eval_batches(paths, tokenizer, collator: MaskingCollator, seed: int = 1234,
                 max_batches: Optional[int] = None, rank: int = 0, world_size: int = 1) -> list[Batch]:
    """The validation set as a fixed list of masked batches (same masks on every call)."""
    rows = list(iter_rows(read_documents(paths, rank, world_size), tokenizer, collator.seq_len))
    if not rows:  # no batches would mean no validation at all, not a validation of nothing
        raise ValueError(f"the validation data ({paths}) holds no text for rank {rank}")
    batches = []
    for start in range(0, len(rows), collator.batch_size):
        if max_batches is not None and len(batches) >= max_batches:
            break
        batches.append(collator(rows[start:start + collator.batch_size], np.random.default_rng([seed, start])))
    return batches


def unigram_counts(paths, tokenizer, max_documents: Optional[int] = None) -> np.ndarray:
    """(V,) int64 counts of every token id in the documents (no special tokens)."""
    _check_whole_encodings(tokenizer)
    counts = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    chunk: list[str] = []
    for n, doc in enumerate(read_documents(paths)):
        if max_documents is not None and n >= max_documents:
            break
        chunk.append(doc)
        if len(chunk) == 256:
            for enc in tokenizer.encode_batch(chunk, add_special_tokens=False):
                counts += np.bincount(enc.ids, minlength=len(counts))
            chunk.clear()
    for enc in tokenizer.encode_batch(chunk, add_special_tokens=False):
        counts += np.bincount(enc.ids, minlength=len(counts))
    return counts


def unigram_baseline(counts: np.ndarray, batches: Iterable[Batch]) -> dict:
    """Masked-token accuracy and perplexity of predicting from token frequencies alone.

    Accuracy: always guess the most frequent token. Perplexity: the add-one
    smoothed unigram distribution's, over the same masked targets.
    """
    probs = (counts + 1) / (counts + 1).sum()
    top = int(np.argmax(counts))
    hits, nll, n = 0, 0.0, 0
    for batch in batches:
        targets = batch.labels.reshape(-1).numpy()
        targets = targets[targets != IGNORE_INDEX]
        hits += int((targets == top).sum())
        nll += float(-np.log(probs[targets]).sum())
        n += len(targets)
    return {"accuracy": hits / max(n, 1), "perplexity": math.exp(nll / n) if n else float("nan"), "n_masked": n}
