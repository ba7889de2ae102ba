"""Pretokenised shards: tokenise a corpus once, then train from memory-mapped token files.

    fastmlm prepare-data --data PATHS --tokenizer T --out DIR
    fastmlm train --data DIR ...

    DIR/index.json              format, token dtype, vocabulary size, tokenizer hash, shards, totals
    DIR/tokenizer.json          the tokenizer that made the shards (a run without --tokenizer uses it)
    DIR/shard_00000.tokens      the documents' token ids end to end, no special tokens (uint16 when
                                the vocabulary fits, else uint32), read with numpy.memmap
    DIR/shard_00000.docs.npy    (D + 1,) int64: where each of the shard's D documents starts (and the end)
    DIR/shard_00000.share.npy   (D,) float64: where each document's text hash falls in [0, 1), so the
                                held-out validation slice (fastmlm.corpus_reader.HeldOut) is the same
                                documents as with the raw text

``index.json`` is written last: a folder without it is not a shard folder. A run whose
tokenizer is not the one the shards were made with (BLAKE2b of ``tokenizer.to_str()``) is
refused. Packing the shards' documents gives exactly the rows :class:`fastmlm.data.RowPacker`
gives for the same text; :class:`ShardStream` (in :mod:`fastmlm.shard_stream`) serves them.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

INDEX = "index.json"
TOKENIZER = "tokenizer.json"
FORMAT = 1
KIND = "fastmlm-shards"
SHARD_TOKENS = 1 << 27  # tokens per shard file: 256 MiB of uint16


def tokenizer_hash(tokenizer) -> str:
    """A fingerprint of everything the tokenizer does (vocabulary, normaliser, pre-tokeniser)."""
    return hashlib.blake2b(tokenizer.to_str().encode("utf-8"), digest_size=16).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def is_shard_folder(path) -> bool:
    return Path(path).is_dir() and (Path(path) / INDEX).is_file()


def shard_folder(paths) -> Optional[Path]:
    """The shard folder that ``--data`` names, or None for text; ValueError when a shard folder is
    given together with other paths (a run reads one shard folder or text, not a mix)."""
    if paths is None:
        return None
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    found = [Path(p) for p in paths if is_shard_folder(p)]
    if found and len(paths) > 1:
        raise ValueError(f"--data: {found[0]} is a shard folder (fastmlm prepare-data); give it alone, not with "
                         f"other paths (got {[str(p) for p in paths]})")
    return found[0] if found else None


# --------------------------------------------------------------------------- writing
def prepare(paths: Sequence, tokenizer, out_dir, shard_tokens: int = SHARD_TOKENS, progress: bool = True,
            chunk: int = 1024) -> dict:
    """Tokenise the documents of ``paths`` into a shard folder ``out_dir``; return its index.

    Documents are tokenised ``chunk`` at a time by ``encode_batch`` (Rust, on every core).
    ``out_dir`` must not exist or be empty. ValueError when the corpus holds no document.
    """
    from .checkpoint import undo_folder
    from .corpus_reader import corpus_files
    from .tokenizer import check_whole_encodings

    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be a positive int, got {shard_tokens!r}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not an empty folder; give a new folder")
    check_whole_encodings(tokenizer)
    files = corpus_files(paths)  # missing paths fail here, before any work
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file on the way there, no permission
        raise ValueError(f"--out {out}: cannot make the folder ({exc.strerror}: {exc.filename})") from None
    try:
        return _write_shards(paths, files, tokenizer, out, shard_tokens, progress, chunk)
    except BaseException:  # an unreadable file, Ctrl-C: leave --out as it was (new or empty), so the same
        undo_folder(out, made)  # command can run again (a half-written folder was refused as "not empty")
        raise


def _write_shards(paths, files, tokenizer, out: Path, shard_tokens: int, progress: bool, chunk: int) -> dict:
    """:func:`prepare`'s work, into the folder ``out`` (new or empty)."""
    from tqdm import tqdm

    from .checkpoint import write_text_atomic
    from .corpus_reader import _hash_share, read_documents

    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab)
    writer = _ShardWriter(out, dtype, shard_tokens)
    bar = tqdm(desc="prepare-data", unit=" docs", disable=not progress)
    batch: list[str] = []

    def flush():
        for text, enc in zip(batch, tokenizer.encode_batch(batch, add_special_tokens=False)):
            writer.add(np.asarray(enc.ids, dtype=dtype), _hash_share(text))
        bar.update(len(batch))
        batch.clear()

    for doc in read_documents(files):
        batch.append(doc)
        if len(batch) == chunk:
            flush()
    flush()
    bar.close()
    shards = writer.close()
    if not shards:
        raise ValueError(f"--data {[str(p) for p in paths]}: holds no document to tokenise")
    tokenizer.save(str(out / TOKENIZER))
    index = {"kind": KIND, "format": FORMAT, "dtype": dtype.name, "vocab_size": vocab,
             "tokenizer_hash": tokenizer_hash(tokenizer), "documents": sum(s["documents"] for s in shards),
             "tokens": sum(s["tokens"] for s in shards), "sources": [str(f) for f in files], "shards": shards}
    write_text_atomic(out / INDEX, json.dumps(index, indent=2))
    return index


class _ShardWriter:
    """Appends documents to ``shard_NNNNN.*`` files, starting a new shard past ``shard_tokens`` tokens."""

    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int):
        self.out, self.dtype, self.shard_tokens = out, dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None

    def add(self, ids: np.ndarray, share: float) -> None:
        if self.file is None:
            self.name = f"shard_{len(self.shards):05d}"
            self.file = open(self.out / f"{self.name}.tokens", "wb")
            self.offsets, self.shares = [0], []
        self.file.write(ids.tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))
        self.shares.append(share)
        if self.offsets[-1] >= self.shard_tokens:
            self._finish()

    def _finish(self) -> None:
        self.file.close()
        self.file = None
        np.save(self.out / f"{self.name}.docs.npy", np.asarray(self.offsets, dtype=np.int64))
        np.save(self.out / f"{self.name}.share.npy", np.asarray(self.shares, dtype=np.float64))
        self.shards.append({"name": self.name, "documents": len(self.shares), "tokens": self.offsets[-1]})

    def close(self) -> list[dict]:
        if self.file is not None:
            self._finish()
        return self.shards


# --------------------------------------------------------------------------- reading
class ShardSet:
    """A shard folder, opened: its documents' token ids, memory-mapped.

    ``ShardSet(folder)`` checks the index and every file's size (a missing, truncated or
    foreign file is a ValueError naming it). Documents are numbered 0..``n_docs``-1 across
    the shards in order; :meth:`tokens` gives one document's ids (a view of the memmap).
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        index = self._read_index()
        self.index, self.vocab_size, self.dtype = index, index["vocab_size"], np.dtype(index["dtype"])
        self._tokens, starts, ends, shares, shard_of = [], [], [], [], []
        for n, shard in enumerate(index["shards"]):
            tokens, offsets, share = self._open_shard(shard)
            self._tokens.append(tokens)
            starts.append(offsets[:-1])
            ends.append(offsets[1:])
            shares.append(share)
            shard_of.append(np.full(len(share), n, dtype=np.int32))
        self.starts, self.ends = np.concatenate(starts), np.concatenate(ends)
        self.shares, self.shard_of = np.concatenate(shares), np.concatenate(shard_of)
        self.n_docs = len(self.starts)

    def _read_index(self) -> dict:
        path = self.folder / INDEX
        if not path.is_file():
            raise ValueError(f"{self.folder} is not a shard folder (no {INDEX}); make one with fastmlm prepare-data")
        try:
            index = json.loads(path.read_text())
            ok = index.get("kind") == KIND and isinstance(index.get("shards"), list)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            ok = False
        if not ok:
            raise ValueError(f"{path} is corrupt or not a fastmlm shard index; make the folder again with "
                             f"fastmlm prepare-data")
        if index.get("format") != FORMAT:
            raise ValueError(f"{path}: shard format {index.get('format')!r}, this fastmlm reads format {FORMAT}; "
                             f"make the folder again with fastmlm prepare-data")
        # The fields the reader uses, each of the type prepare() writes (else a KeyError, or numpy's TypeError
        # on a dtype, from deep inside the reader).
        fields_ok = (isinstance(index.get("vocab_size"), int) and isinstance(index.get("tokenizer_hash"), str)
                     and index.get("dtype") in ("uint16", "uint32")  # token_dtype's two
                     and all(isinstance(s, dict) and isinstance(s.get("name"), str)
                             and all(isinstance(s.get(k), int) and s[k] >= 0 for k in ("documents", "tokens"))
                             for s in index["shards"]))
        if not fields_ok:
            raise ValueError(f"{path}: a field is missing or of the wrong type (vocab_size, tokenizer_hash, dtype, "
                             f"or a shard's name, documents, tokens): corrupt; make the folder again with "
                             f"fastmlm prepare-data")
        return index

    def _open_shard(self, shard: dict):
        name = shard["name"]
        files = [self.folder / f"{name}{suffix}" for suffix in (".tokens", ".docs.npy", ".share.npy")]
        for f in files:
            if not f.is_file():
                raise ValueError(f"shard folder {self.folder} is incomplete: {f.name} is missing")
        want = shard["tokens"] * self.dtype.itemsize
        if files[0].stat().st_size != want:
            raise ValueError(f"{files[0]}: {files[0].stat().st_size} bytes, the index says {want} "
                             f"({shard['tokens']} {self.dtype.name} tokens): truncated or corrupt")
        try:
            offsets, share = np.load(files[1], mmap_mode="r"), np.load(files[2], mmap_mode="r")
        except ValueError as exc:
            raise ValueError(f"shard {name} of {self.folder}: cannot read its document table ({exc})") from None
        if len(offsets) != shard["documents"] + 1 or len(share) != shard["documents"] or \
                (len(offsets) and (offsets[0] != 0 or offsets[-1] != shard["tokens"])) or \
                bool(np.any(np.diff(offsets) < 0)):  # out of order: documents dropped or read twice, silently
            raise ValueError(f"shard {name} of {self.folder}: its document table does not match the index (corrupt)")
        tokens = (np.memmap(files[0], dtype=self.dtype, mode="r") if want else np.zeros(0, dtype=self.dtype))
        return tokens, np.asarray(offsets), np.asarray(share)

    def check_tokenizer(self, tokenizer, what: str = "the run's tokenizer") -> None:
        """ValueError unless ``tokenizer`` is the one the shards were made with."""
        if tokenizer_hash(tokenizer) != self.index["tokenizer_hash"]:
            raise ValueError(f"{self.folder} was tokenised with another tokenizer than {what} (tokenizer hash "
                             f"{self.index['tokenizer_hash']} vs {tokenizer_hash(tokenizer)}); train with the "
                             f"folder's own ({self.folder / TOKENIZER}), or run fastmlm prepare-data again "
                             f"with this tokenizer")

    def tokens(self, doc: int) -> np.ndarray:
        """Document ``doc``'s token ids (no special tokens), a read-only view."""
        return self._tokens[self.shard_of[doc]][self.starts[doc]:self.ends[doc]]

    def lengths(self, docs: np.ndarray) -> np.ndarray:
        return self.ends[docs] - self.starts[docs]

    def select(self, part: str, fraction: float) -> np.ndarray:
        """The documents of one part, as :class:`fastmlm.corpus_reader.HeldOut` splits the text: "valid" is
        document 0 and every document whose hash share is below ``fraction``, "train" the others; with
        ``fraction`` 0 "train" is every document (and "valid" none)."""
        held = self.shares < fraction
        if fraction > 0 and self.n_docs:
            held[0] = True
        return np.flatnonzero(held if part == "valid" else ~held)

    def unigram_counts(self, docs: np.ndarray) -> np.ndarray:
        """(V,) int64 counts of every token id in ``docs`` (what fastmlm.data.unigram_counts gives for text)."""
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for doc in docs:
            counts += np.bincount(self.tokens(doc), minlength=self.vocab_size)
        return counts


def iter_doc_rows(shards: ShardSet, docs: np.ndarray, seq_len: int, cls: int, sep: int) -> Iterator:
    """Pack documents ``docs`` of ``shards`` in order into rows, exactly as fastmlm.data.iter_rows packs their text."""
    from .data import RowPacker

    packer = RowPacker(seq_len, cls, sep)
    for doc in docs:
        yield from packer.add(shards.tokens(doc))
    yield from packer.flush()


# --------------------------------------------------------------------------- the command
def add_parser(subparsers, **kwargs) -> None:
    """Register ``fastmlm prepare-data`` (``kwargs`` go to ``add_parser``, e.g. the CLI's formatter)."""
    p = subparsers.add_parser(
        "prepare-data", help="tokenise text once into memory-mapped token shards for fastmlm train --data DIR",
        description="Tokenise text files once (on every core) into memory-mapped token shards plus an index "
                    "(shard sizes, document offsets, the tokenizer's hash). `fastmlm train --data DIR` then reads "
                    "the shards directly and resumes at its saved position at once, without re-tokenising.",
        **kwargs)
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="text: .txt (blank-line separated documents) or .jsonl files, gzipped or not, or folders "
                        "(default: none, required)")
    p.add_argument("--tokenizer", required=True, metavar="T",
                   help="the tokenizer.json or BERT vocab.txt the training run will use (default: none, required)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="a new (or empty) folder for the shards (default: none, required)")
    p.add_argument("--shard-tokens", type=_positive_int, default=SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard file (default: {SHARD_TOKENS})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: off: a progress bar is shown)")
    p.set_defaults(func=cmd_prepare_data)


def _positive_int(text: str) -> int:
    """``--shard-tokens``: refused by the parser, naming the flag (prepare() named only shard_tokens)."""
    from .cli import _positive_int as positive

    return positive(text)


def cmd_prepare_data(args) -> int:
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    index = prepare(args.data, tokenizer, args.out, shard_tokens=args.shard_tokens, progress=not args.no_progress)
    print(f"wrote {index['documents']:,} documents, {index['tokens']:,} tokens ({index['dtype']}) in "
          f"{len(index['shards'])} shard(s) to {args.out}")
    return 0
