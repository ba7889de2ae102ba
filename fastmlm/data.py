"""Data for MLM training: packing tokenised documents into rows, dynamic masking, batch streams.

    text files ──read_documents──► documents ──tokenize──► segments [CLS] … [SEP]
        ──RowPacker──► full rows of seq_len tokens ──MaskingCollator──► Batch

* **Corpus** (:mod:`fastmlm.corpus_reader`): ``.txt`` / ``.jsonl`` files, gzipped or
  not, files or folders, streamed; the bundled corpus is the default.
* **Tokenizer** (:mod:`fastmlm.tokenizer`): a WordPiece model with the BERT normaliser
  and pre-tokeniser, trained deterministically or loaded from ``tokenizer.json`` /
  ``vocab.txt``. Special tokens: ``[PAD] [UNK] [CLS] [SEP] [MASK]``.
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
batch index, rank)`` for masking (:func:`batch_rng`), so a stream restarted at a
saved position yields exactly the batches an uninterrupted one would.
Pretokenised shards (:mod:`fastmlm.shards`) pack the same rows from token files
and jump to any position at once.
"""
from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from .corpus_reader import read_documents
from .tokenizer import check_whole_encodings, continuation_flags, special_ids


IGNORE_INDEX = -100  # the label of a token that is not predicted (fastmlm.model reads it from here)


def check_int(name: str, value, low: int, high: Optional[int] = None, why: str = "") -> None:
    """ValueError naming ``name`` unless ``value`` is an int (not a bool or a float) in [low, high]
    (no upper bound when high is None); ``why`` is said after the range."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low \
        and (high is None or value <= high)
    if not ok:
        wanted = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"{name} must be {wanted}{why}, got {value!r}")


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
        check_int("seq_len", seq_len, 3, why=" ([CLS] x [SEP])")
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
    if isinstance(documents, str):  # iterating a str would make every character a document of its own
        raise TypeError("documents must be an iterable of str (one per document), got a str; wrap it: [text]")
    check_whole_encodings(tokenizer)
    special = special_ids(tokenizer)
    packer = RowPacker(seq_len, special.cls, special.sep)
    chunk: list[str] = []
    end = object()  # not None: a None among the documents would have ended them silently
    for n, doc in enumerate(itertools.chain(documents, [end])):
        if doc is not end:
            if not isinstance(doc, str):
                raise TypeError(f"documents must be str, got {type(doc).__name__} (document {n})")
            chunk.append(doc)
        if len(chunk) == 64 or (doc is end and chunk):
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


def batch_rng(seed: int, index: int, rank: int = 0) -> np.random.Generator:
    """The masking randomness of batch ``index`` (``step * grad_accum + micro-batch``) on ``rank``.

    A pure function of its arguments, so any batch's masks can be made again without the
    batches before it. Rank 0 keeps the stream single-process runs always used (so their
    saved runs resume unchanged); other ranks draw their own instead of repeating rank 0's.
    """
    return np.random.default_rng([seed, index, 2] + ([rank] if rank else []))


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
        check_int("seq_len", seq_len, 3, why=" ([CLS] x [SEP])")
        check_int("batch_size", batch_size, 1)
        for name, value in (("mask_rate", mask_rate), ("mask_prob", mask_prob), ("random_prob", random_prob)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if not 0.0 < mask_rate < 1.0:  # written so that NaN fails too
            raise ValueError(f"mask_rate must lie in (0, 1), got {mask_rate}")
        if layout not in ("padded", "packed"):
            raise ValueError(f"layout must be 'padded' or 'packed', got {layout!r}")
        if not (mask_prob >= 0 and random_prob >= 0 and mask_prob + random_prob <= 1):  # NaN fails too
            raise ValueError(f"mask_prob and random_prob must be >= 0 and sum to at most 1, got "
                             f"mask_prob={mask_prob}, random_prob={random_prob}")
        self.tokenizer = tokenizer  # kept so that a shard stream can check its shards were made with it
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
        lengths = np.zeros(B, dtype=np.int64)
        seg_lens: list[int] = []
        for r, row in enumerate(rows):
            if len(row) > S:
                raise ValueError(f"a row of {len(row)} tokens does not fit seq_len={S}")
            flat = np.concatenate(row.segments) if row.segments else np.zeros(0, dtype=np.int64)
            if flat.dtype.kind not in "iu":  # float ids would be truncated to other tokens
                raise TypeError(f"a row's token ids must be integers, got dtype {flat.dtype}")
            ids[r, :len(flat)] = flat
            lengths[r] = len(flat)
            seg_lens.extend(len(s) for s in row.segments)
            if len(flat) < S:  # the row's padding is a sequence of its own in the packed layout
                seg_lens.append(S - len(flat))
        seg_lens.extend([S] * (B - len(rows)))  # missing rows (end of data): all padding
        # Ids outside the vocabulary would index the tables below out of bounds (or, negative, wrap
        # around to other tokens); two reductions of the batch, trivial next to the masking.
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"token id {low if low < 0 else high} is outside the tokenizer's vocabulary of "
                             f"{self.vocab_size} (ids 0..{self.vocab_size - 1}): rows made with another tokenizer?")
        # Padding is where the rows end, not where the [PAD] id is: text that spells "[PAD]" tokenises
        # to that id (a special token), and it is text the rows' other tokens attend to.
        real = np.arange(S) < lengths[:, None]
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
    with ``start=position`` continues with exactly the batches that follow.

    Getting there: every epoch yields the same number of batches (the same rows,
    shuffled differently; the rows left over at its end are dropped), counted in
    ``epoch_batches`` once the stream has finished an epoch. Given that count
    (``epoch_batches=``, from the checkpoint), a restarted stream starts at the
    epoch of ``start`` at once; within that epoch it re-reads and re-tokenises the
    documents up to ``start`` (without masking them): at most one epoch's
    tokenisation, which the first ``next()`` pays (:func:`fastmlm.train` times it
    as a phase of its own). Pretokenised shards (fastmlm.shard_stream) jump there at once.
    Packing efficiency (real tokens / batch slots) is kept in ``efficiency``.
    """

    def __init__(self, paths, tokenizer, collator: MaskingCollator, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle_rows: int = 2048, start: int = 0,
                 epoch_batches: Optional[int] = None):
        check_int("seed", seed, 0)
        check_int("shuffle_rows", shuffle_rows, 1)
        check_int("start", start, 0)
        self.paths, self.tokenizer, self.collator = paths, tokenizer, collator
        self.seed, self.rank, self.world_size, self.shuffle_rows = seed, rank, world_size, shuffle_rows
        self.position = start
        self.epoch_batches = epoch_batches
        self.real_tokens = 0
        self.slots = 0

    @property
    def efficiency(self) -> float:
        return self.real_tokens / self.slots if self.slots else 0.0

    def _row_batches(self, epoch: int = 0) -> Iterator[list[Row]]:
        B, S = self.collator.batch_size, self.collator.seq_len
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
            yield None  # the epoch's end
            epoch += 1

    def __iter__(self) -> Iterator[Batch]:
        epoch = 0
        if self.epoch_batches:  # skip whole epochs without reading them
            epoch = self.position // self.epoch_batches
        index = epoch_start = epoch * (self.epoch_batches or 0)
        for rows in self._row_batches(epoch):
            if rows is None:
                self.epoch_batches = index - epoch_start
                epoch_start = index
                continue
            if index >= self.position:
                batch = self.collator(rows, batch_rng(self.seed, index, self.rank))
                self.position = index + 1
                self.real_tokens += batch.n_tokens
                self.slots += self.collator.batch_size * self.collator.seq_len
                yield batch
            index += 1


def eval_batches(paths, tokenizer, collator: MaskingCollator, seed: int = 1234,
                 max_batches: Optional[int] = None, rank: int = 0, world_size: int = 1) -> list[Batch]:
    """The validation set as a fixed list of masked batches (same masks on every call); with
    ``max_batches``, the first ones only (and only their text is read)."""
    rows = iter_rows(read_documents(paths, rank, world_size), tokenizer, collator.seq_len)
    return fixed_batches(rows, collator, seed, max_batches, f"the validation data ({paths})", rank)


def fixed_batches(rows: Iterable[Row], collator: MaskingCollator, seed: int, max_batches: Optional[int],
                  what: str, rank: int = 0) -> list[Batch]:
    """Consecutive rows as masked batches with fixed masks (:func:`eval_batches`; shards' validation too);
    ValueError naming ``what`` when there are no rows."""
    if max_batches is not None:  # 0 would read no rows and then blame the data for holding no text
        check_int("max_batches", max_batches, 1, why=" (or None: every batch)")
    check_int("seed", seed, 0)
    rows = list(rows if max_batches is None else itertools.islice(rows, max_batches * collator.batch_size))
    if not rows:  # no batches would mean no validation at all, not a validation of nothing
        raise ValueError(f"{what} holds no text for rank {rank}")
    batches = []
    for start in range(0, len(rows), collator.batch_size):
        if max_batches is not None and len(batches) >= max_batches:
            break
        batches.append(collator(rows[start:start + collator.batch_size], np.random.default_rng([seed, start])))
    return batches


_LAST_COUNTS: dict = {}  # the last unigram_counts answer, by what it counted


def unigram_counts(paths, tokenizer, max_documents: Optional[int] = None) -> np.ndarray:
    """(V,) int64 counts of every token id in the documents (no special tokens).

    The last answer is kept (for the same paths, tokenizer vocabulary and ``max_documents``),
    so the demo's baseline reuses the counts its run's ``unigram_bias`` took instead of reading
    the corpus twice.
    """
    check_whole_encodings(tokenizer)
    key = (repr(paths), tokenizer.to_str(), max_documents)
    if _LAST_COUNTS.get("key") == key:
        return _LAST_COUNTS["counts"].copy()
    counts = _count_tokens(paths, tokenizer, max_documents)
    _LAST_COUNTS.update(key=key, counts=counts.copy())
    return counts


def _count_tokens(paths, tokenizer, max_documents: Optional[int]) -> np.ndarray:
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
