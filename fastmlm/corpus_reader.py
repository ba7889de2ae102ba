"""Corpus files: finding them and reading their documents (text, JSONL, gzip), streamed.

    files and folders ──corpus_files──► sorted .txt/.jsonl(.gz) files ──read_documents──► documents (str)

``.txt`` files hold documents separated by blank lines (the lines of one document are
joined); ``.jsonl`` files hold one ``{"text": ...}`` object per line; ``.gz`` versions of
both work, and folders are searched recursively. Files are streamed, so a corpus larger
than memory is fine. The bundled corpus (``fastmlm/corpus/{train,valid}.txt.gz``) is the
default (:func:`bundled_corpus`).

Text is UTF-8 (a byte-order mark is skipped). Bytes that are not UTF-8 are read as
U+FFFD, which the tokenizer drops, with one :class:`CorpusWarning` per file giving their
count (a few stray bytes should not stop a run; a file in another encoding shows in the
count). A file with no text is skipped with a warning; a JSONL line that is not
``{"text": "..."}`` and a corrupt or truncated ``.gz`` are errors naming the file and line.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import re
import warnings
import zlib
from pathlib import Path
from typing import Iterator, Sequence

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")


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
