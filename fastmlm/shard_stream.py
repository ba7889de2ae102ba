"""Training batches from pretokenised shards, any position reached at once (no replay).

    shard documents ──row table (once)──► rows r = 0..R-1 ──epoch permutation──► batch i of rank k

* **Row table.** One pass over the documents' lengths (no tokens read) finds where each
  row starts: ``(document, offset)``. Row ``r`` is then made by packing from its start
  until the row is full, which gives the same row :class:`fastmlm.data.RowPacker` makes
  when it packs all documents in order.
* **Order.** Epoch ``e`` visits the rows in a random permutation seeded by ``(seed, e)``;
  global batch ``g`` of the epoch is rows ``perm[g*B : (g+1)*B]``, and rank ``k`` of ``W``
  takes global batches ``j*W + k``: ranks never share a row, and each epoch uses every row
  but the last ``R mod (B*W)``.
* **Masks.** Batch ``i`` of rank ``k`` is global batch ``g = i*W + k``, masked with
  ``fastmlm.data.batch_rng(seed, g)``.

So batch ``i`` is a pure function of ``(seed, i, rank)``, and a run on W ranks sees the same
rows and masks as one process with ``grad_accum`` W times larger: a stream made with ``start=i``
costs the same at step 10 as at step 10,000 (one permutation of the rows), and its
batches are the uninterrupted stream's.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from .data import Batch, MaskingCollator, Row, RowPacker, batch_rng, check_int
from .shards import ShardSet


def row_starts(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each packed row starts: (index into ``lengths``, token offset in that document).

    Follows :meth:`fastmlm.data.RowPacker.add` with lengths only: a piece of a document takes
    ``min(left, room - 2)`` tokens plus ``[CLS]`` and ``[SEP]`` (and the 1-2 slots a segment
    cannot use), and a row closes when it is full. Empty documents make no row.
    """
    docs, offsets = [], []
    used = 0
    for d, length in enumerate(lengths.tolist()):
        offset = 0
        while offset < length:
            if used == 0:
                docs.append(d)
                offsets.append(offset)
            room = seq_len - used
            take = min(length - offset, room - 2)
            offset += take
            left = room - take - 2
            used += take + 2 + (left if left < 3 else 0)
            if used == seq_len:
                used = 0
    return np.asarray(docs, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


class ShardStream:
    """An endless, resumable stream of masked batches from a :class:`ShardSet` (module docstring).

    ``docs`` are the documents to train on (e.g. ``shards.select("train", holdout)``).
    The interface is :class:`fastmlm.data.BatchStream`'s: ``position`` (batches yielded,
    counting from ``start``), ``epoch_batches`` (known at once here) and ``efficiency``.
    """

    replays = False  # reaching ``start`` reads nothing before it (fastmlm.train says so on resume)

    def __init__(self, shards: ShardSet, docs: np.ndarray, collator: MaskingCollator, seed: int = 0, rank: int = 0,
                 world_size: int = 1, start: int = 0):
        check_int("world_size", world_size, 1)
        check_int("seed", seed, 0)
        check_int("start", start, 0)
        check_int("rank", rank, 0)
        if rank >= world_size:  # rank == world_size would take the next step's rows of rank 0
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank!r}")
        # The shards hold no special tokens, so ids from another vocabulary of the same size would be
        # trained on silently: the collator's tokenizer must be the one the shards were made with.
        shards.check_tokenizer(collator.tokenizer, "the collator's tokenizer")
        docs = np.asarray(docs)
        if docs.ndim != 1 or (docs.size and (docs.dtype.kind not in "iu" or docs.min() < 0 or
                                             docs.max() >= shards.n_docs)):
            # a negative number would silently wrap around to a document at the end
            got = f"{docs.dtype} values from {docs.min()} to {docs.max()}" if docs.ndim == 1 else f"shape {docs.shape}"
            raise ValueError(f"docs must be a 1-d array of document numbers in [0, {shards.n_docs}) (the "
                             f"documents of {shards.folder}), got {got}")
        self.shards, self.docs, self.collator = shards, docs.astype(np.int64), collator
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.position = start
        self.row_doc, self.row_offset = row_starts(shards.lengths(self.docs), collator.seq_len)
        per_step = collator.batch_size * world_size
        self.epoch_batches = len(self.row_doc) // per_step
        if self.epoch_batches == 0:
            raise ValueError(f"the shard folder {shards.folder} packs into {len(self.row_doc)} rows of "
                             f"{collator.seq_len} tokens, fewer than one batch on every rank needs "
                             f"({collator.batch_size} x {world_size} ranks = {per_step}); use more data or a "
                             f"smaller --batch-size / --seq-len")
        self.real_tokens = 0
        self.slots = 0
        self._epoch, self._order = -1, None

    @property
    def efficiency(self) -> float:
        return self.real_tokens / self.slots if self.slots else 0.0

    def order(self, epoch: int) -> np.ndarray:
        """The rows in epoch ``epoch``'s order (kept for the current epoch)."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch, 1])
            self._epoch, self._order = epoch, rng.permutation(len(self.row_doc))
        return self._order

    def row(self, r: int) -> Row:
        """Packed row ``r``: from its start, documents in order until the row is full (or the data ends)."""
        cls, sep = self.collator.special.cls, self.collator.special.sep
        packer = RowPacker(self.collator.seq_len, cls, sep)
        d, offset = int(self.row_doc[r]), int(self.row_offset[r])
        while d < len(self.docs):
            for row in packer.add(self.shards.tokens(self.docs[d])[offset:]):
                return row
            d, offset = d + 1, 0
        return next(packer.flush())

    def batch(self, index: int) -> Batch:
        """Batch ``index`` of this rank (a pure function of seed, index and rank)."""
        if index < 0:  # else an epoch of -1, refused deep inside numpy's seeding
            raise ValueError(f"the batch index must be >= 0, got {index}")
        epoch, j = divmod(index, self.epoch_batches)
        B = self.collator.batch_size
        first = (j * self.world_size + self.rank) * B
        rows = [self.row(r) for r in self.order(epoch)[first:first + B]]
        top = max(int(seg.max()) for row in rows for seg in row.segments)
        if top >= self.collator.vocab_size:  # a corrupt shard, not an IndexError deep in the collator
            raise ValueError(f"the shard folder {self.shards.folder} holds token id {top}, outside the vocabulary "
                             f"of {self.collator.vocab_size}: a corrupt shard; make the folder again")
        return self.collator(rows, batch_rng(self.seed, index * self.world_size + self.rank))

    def __iter__(self) -> Iterator[Batch]:
        while True:
            batch = self.batch(self.position)
            self.position += 1
            self.real_tokens += batch.n_tokens
            self.slots += self.collator.batch_size * self.collator.seq_len
            yield batch
