"""Corpus files: finding them and reading their documents (text, JSONL, gzip), streamed.

    files and folders ──corpus_files──► sorted .txt/.jsonl(.gz) files ──read_documents──► documents (str)

``.txt`` files hold documents separated by blank lines (the lines of one document are
joined); ``.jsonl`` files hold one ``{"text": ...}`` object per line; ``.gz`` versions of
both work, and folders are searched recursively. Files are streamed, so a corpus larger
than memory is fine. The bundled corpus (``fastmlm/corpus/{train,valid}.txt.gz``) is the
default (:func:`bundled_corpus`). :func:`split_holdout` cuts a fixed validation slice out of
a corpus (:class:`HeldOut`: by a hash of each document's text).

Text is UTF-8 (a byte-order mark is skipped). Bytes that are not UTF-8 are read as
U+FFFD, which the tokenizer drops, with one :class:`CorpusWarning` per file giving their
count (a few stray bytes should not stop a run; a file in another encoding shows in the
count). A file with no text is skipped with a warning; a JSONL line that is not
``{"text": "..."}`` and a corrupt or truncated ``.gz`` are errors naming the file and line.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import numbers
import os
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

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
    """Expand files and folders (recursively) into a sorted list of text/JSONL files; a file named
    twice (also as part of a folder given) is refused, since its documents would be read twice."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if paths is None:
        raise TypeError("paths must be a file or folder or a list of them, got None")
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
    first: dict[Path, Path] = {}
    for f in files:
        if first.setdefault(f.resolve(), f) is not f:
            raise ValueError(f"{f} is given twice (as {first[f.resolve()]} too, directly or inside a folder); "
                             f"its documents would be read twice: give each file once")
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


class UnreadableFile(ValueError):
    """A text file that cannot be read to its end (a corrupt or truncated ``.gz``, an I/O error);
    ``line`` is the last line read (0: none), ``detail`` what went wrong."""

    def __init__(self, path: Path, line: int, detail: str):
        super().__init__(f"{path}: cannot be read past line {line}: {detail}")
        self.path, self.line, self.detail = path, line, detail


def _lines_of(path: Path, undecodable: _Undecodable) -> Iterator[tuple[int, str]]:
    """Numbered lines of a text file, undecodable bytes replaced (and counted in ``undecodable``);
    a corrupt or truncated ``.gz`` (or an I/O error) is an :class:`UnreadableFile`."""
    number = 0
    try:
        with _open_text(path) as f:
            for number, line in enumerate(f, 1):
                yield number, undecodable.replace(line, number)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:  # what gzip raises for damaged data
        raise UnreadableFile(path, number, f"{exc} (the gzip data is corrupt or truncated)") from None
    except OSError as exc:  # permission denied, a folder, a file gone since it was listed
        raise UnreadableFile(path, number, f"{type(exc).__name__}: {exc.strerror or exc}") from None


def read_jsonl(path, undecodable: Optional[_Undecodable] = None,
               error: type = ValueError) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON value) of every non-blank line of a JSONL file, gzipped or not.

    With ``undecodable`` (a corpus), bytes that are not UTF-8 are read as U+FFFD and counted
    there; without it (a labelled file, where a changed character changes an example) they are
    an error. A line that is not JSON or not UTF-8 raises ``error`` (a ValueError subclass)
    naming ``file:line``; a file that cannot be read to its end, :class:`UnreadableFile`.
    """
    path = Path(path)
    strict = undecodable is None
    undecodable = undecodable if undecodable is not None else _Undecodable(path)
    for number, line in _lines_of(path, undecodable):
        if strict and undecodable.count:
            raise error(f"{path}:{number}: holds bytes that are not UTF-8 text (re-encode the file as UTF-8, "
                        f"e.g. iconv -f latin1 -t utf-8)")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:  # json gives up on deep nesting (e.g. a line of "[[[[..."), not a JSONDecodeError
            raise error(f"{path}:{number}: not valid JSON for a corpus (nested too deeply to parse)") from None
        yield number, record


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
        for number, record in read_jsonl(path, undecodable):
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


def read_documents(paths: "Sequence[os.PathLike | str] | HeldOut", rank: int = 0, world_size: int = 1) -> Iterator[str]:
    """Stream the documents of ``paths`` (or of a :class:`HeldOut` part of them); with ``world_size > 1``
    only every world_size-th one, from ``rank``."""
    ok_ints = all(isinstance(n, int) and not isinstance(n, bool) for n in (rank, world_size))
    if not (ok_ints and 0 <= rank < world_size):  # else a ZeroDivisionError, or no documents at all
        raise ValueError(f"rank and world_size must be ints with 0 <= rank < world_size, got rank={rank!r}, "
                         f"world_size={world_size!r}")
    if isinstance(paths, HeldOut):
        documents = paths.documents()
    else:
        documents = (doc for path in corpus_files(paths) for doc in _documents_of(path))
    for index, doc in enumerate(documents):
        if index % world_size == rank:
            yield doc


# --------------------------------------------------------------------------- the held-out validation slice
def _hash_share(text: str) -> float:
    """Where the text's 64-bit BLAKE2b hash falls in [0, 1): the same on every machine and Python."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


@dataclass(frozen=True)
class HeldOut:
    """One part of a corpus split into training text and a held-out validation slice.

    The validation slice (``part="valid"``) is the first document of the corpus (of its first
    file, files sorted) and every document whose 64-bit BLAKE2b hash of its text falls in
    the lowest ``fraction`` of the hash range; ``part="train"`` is every other document. The
    rule depends on each document's text alone, so the slice is the same on every machine,
    in every file order and for every number of ranks, adding documents never moves others
    between the parts, and it is never empty. Pass it wherever corpus paths go
    (:func:`read_documents` and everything built on it).
    """

    paths: tuple
    part: str  # "train" or "valid"
    fraction: float

    def __post_init__(self):
        if self.part not in ("train", "valid"):
            raise ValueError(f"part must be 'train' or 'valid', got {self.part!r}")
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, numbers.Real):
            raise TypeError(f"the held-out fraction must be a number, got {self.fraction!r}")
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"the held-out fraction must lie in (0, 1), got {self.fraction!r}")

    def documents(self) -> Iterator[str]:
        want_valid = self.part == "valid"
        for index, doc in enumerate(doc for path in corpus_files(list(self.paths)) for doc in _documents_of(path)):
            if (index == 0 or _hash_share(doc) < self.fraction) == want_valid:
                yield doc

    def __str__(self) -> str:
        share = f"{self.fraction * 100:.3g}%"
        what = "the held-out validation slice" if self.part == "valid" else "all but the held-out validation slice"
        return f"{what} ({share} of the documents) of {', '.join(map(str, self.paths))}"


def split_holdout(paths, fraction: float) -> tuple[HeldOut, HeldOut]:
    """(training part, validation part) of the corpus ``paths`` (see :class:`HeldOut`)."""
    paths = (paths,) if isinstance(paths, (str, os.PathLike)) else tuple(paths)
    return HeldOut(paths, "train", fraction), HeldOut(paths, "valid", fraction)


def training_sources(data, valid_data, holdout: float):
    """(training text, validation text or None) of a run, as TrainConfig's fields say: the bundled
    corpus and its validation split when ``data`` is None; ``data`` and ``valid_data`` when both are
    given; with ``data`` alone, ``data`` split by :func:`split_holdout` (no validation when
    ``holdout`` is 0)."""
    if data is None:
        return [bundled_corpus("train")], list(valid_data) if valid_data else [bundled_corpus("valid")]
    if valid_data:
        return list(data), list(valid_data)
    if holdout > 0:
        return split_holdout(data, holdout)
    return list(data), None
