"""CPU route of the ``torch`` block-sparse backend: ATen's flash kernels on the kept tiles only.

Query blocks are grouped by how many key blocks they keep; each group is one call of
``aten::_scaled_dot_product_flash_attention_for_cpu`` (and its backward) in which every
query block is a batch entry that sees only its kept key blocks, gathered side by side:

    tile states (one head, S = 4 blocks)      groups
      kb: 0 1 2 3
    qb0   F P . .                             2 kept: qb0 -> k[0 1],  qb3 -> k[2 3]
    qb1   P F P .                             3 kept: qb1 -> k[0 1 2], qb2 -> k[1 2 3]
    qb2   . P F P
    qb3   . . P F                             q (n, bs) against k, v (n, c * bs) per group

A group gets an additive bias only where it needs one: partial tiles (the layout's token
rule), padded keys (attention_mask, packed batches) and the key slots past the end of the
sequence that the last, short block brings. Outputs and lse are written back per query
block (each is in exactly one group); in the backward, dq likewise, and dk / dv are
summed over the groups with ``index_add_`` (deterministic on the CPU), one index per key
block rather than per row. Query rows that are one run of blocks in the table (one head,
consecutive query blocks) are read and written as a slice, not gathered. A count with many
query blocks is split into groups that gather at most about GATHER_BYTES of k (and of v).

A layout shared by all heads keeps the heads inside each ATen call (batch = B * query
blocks, heads = H); a per-head layout makes every (head, query block) a pair of its own
(batch = B, heads = pairs). The schedule is read on the host, which on the CPU is no sync.
The rules of the dense route (attention.py) hold here too: padded keys and values were
zeroed by ``_to_padded``, a row with no kept key outputs 0 with lse -inf and gets zero
gradients, and a non-finite query makes its row NaN (ATen's short-sequence kernel would
hide it, and query blocks are short sequences).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .. import checks, padding
from ..block_layout import FULL, PARTIAL, SKIP, per_layout, visit_list, window_global_rule
from ..block_sparse import BlockSparseInputs
from . import attention as dense

_ATEN_FWD, _ATEN_BWD = dense._ATEN_FWD, dense._ATEN_BWD


class _Group(NamedTuple):
    """Query blocks that keep the same number ``c`` of key blocks (n of them; one count may take
    several groups, see GATHER_BYTES)."""

    heads: Tensor  # (n,) int64, the layout head of each query block (all 0 for a shared layout)
    q_tokens: Tensor  # (n, bs) int64, token positions of each query block
    k_tokens: Tensor  # (n, c * bs) int64, token positions of its kept key blocks, side by side
    k_blocks: Tensor  # (n, c) int64, those key blocks
    tile: Optional[Tensor]  # (n, bs, c * bs) bool, the layout's rule on those pairs; None when all tiles are FULL
    last_block: bool  # the group visits the last key block (which may run past the sequence)
    q_run: Optional[tuple[int, int]]  # (head, first query block) when its query blocks follow each other in one head


# A group's gathered k (and v) holds about this many bytes at most (at least one query block). Small
# groups keep every temporary of a call (the gathered blocks, the gradients ATen allocates for them,
# its outputs) at sizes the allocator hands back warm from the previous group, not fresh pages it
# must fault in, and mostly in cache. Profiled at s=2048, 12.5%, b=1, h=4, d=64, fp32, 1 thread (shared
# host): index_select + fill_ took 10.1 ms per forward + backward with one 4 MiB group, 4.7 ms with 1 MiB ones.
GATHER_BYTES = 1 << 20

_SCHEDULES = WeakIdKeyDictionary()  # see block_layout.per_layout


def schedule(inputs: BlockSparseInputs, nblocks: int, heads: int, group_blocks: int) -> list[_Group]:
    """The groups for the first ``nblocks`` x ``nblocks`` tiles of the layout, broadcast to ``heads``
    heads (1: shared by all), each gathering at most ``group_blocks`` key blocks (or one query block's).
    Query blocks that keep nothing are in no group."""
    key = (nblocks, heads, inputs.block_size, inputs.window, inputs.num_global, group_blocks)
    return per_layout(_SCHEDULES, inputs.blocks, inputs.token_mask, key,
                      lambda: _build_schedule(inputs, nblocks, heads, group_blocks))


def _build_schedule(inputs: BlockSparseInputs, nblocks: int, heads: int, group_blocks: int) -> list[_Group]:
    bs = inputs.block_size
    tiles = inputs.blocks[:, :nblocks, :nblocks].expand(heads, nblocks, nblocks)
    index, count = visit_list(tiles != SKIP)
    slots = torch.arange(bs)
    groups = []
    for c in count.unique().tolist():
        if c == 0:
            continue
        h_all, qb_all = (count == c).nonzero(as_tuple=True)
        per_chunk = max(1, group_blocks // c)  # query blocks per group
        for h, qb in zip(h_all.split(per_chunk), qb_all.split(per_chunk)):
            kb = index[h, qb, :c].long()  # (n, c)
            q_tokens, k_tokens = qb[:, None] * bs + slots, (kb[..., None] * bs + slots).flatten(1)
            state = tiles[h[:, None], qb[:, None], kb].repeat_interleave(bs, dim=1)[:, None, :]  # (n, 1, c * bs)
            tile = None
            if bool((state == PARTIAL).any()):
                tile = (state == FULL) | ((state == PARTIAL) & _token_rule(inputs, h, q_tokens, k_tokens))
            run = bool((h == h[0]).all() and (qb == qb[0] + torch.arange(len(qb))).all())
            groups.append(_Group(h, q_tokens, k_tokens, kb, tile, bool((kb == nblocks - 1).any()),
                                 (int(h[0]), int(qb[0])) if run else None))
    return groups


def _token_rule(inputs: BlockSparseInputs, heads: Tensor, q_tokens: Tensor, k_tokens: Tensor) -> Tensor:
    """(n, bs, L) bool: the partial-tile rule of the layout on a group's (query, key) pairs."""
    rows, cols = q_tokens[:, :, None], k_tokens[:, None, :]
    rule = window_global_rule(rows, cols, inputs.window, inputs.num_global)
    tm = inputs.token_mask
    if tm is not None:
        last = tm.shape[-1] - 1  # tokens past the layout are padding (masked or dropped): clamp only to index
        h = heads[:, None, None] if tm.shape[0] > 1 else 0
        rule = rule | tm[h, rows.clamp(max=last), cols.clamp(max=last)]
    return rule


def density(blocks: Tensor, nblocks: int) -> float:
    """Fraction of the first nblocks x nblocks tiles that are visited, over heads."""
    return float((blocks[:, :nblocks, :nblocks] != SKIP).float().mean())


class _Call:
    """One forward or backward: the batch as row tables, and how to gather / scatter a group.

    A row table holds one row per token (shared layout: (B, S, H, ...), rows of H heads) or per
    (head, token) (per-head layout: (B, H * S, ...)), so a group's rows are one ``index_select``.
    """

    def __init__(self, inputs: BlockSparseInputs, tensors: list[Tensor]):
        d = inputs.dense
        padded, self.key_mask, self.coords = dense._to_padded(tensors, d.attention_mask, d.cu_seqlens,
                                                              d.max_seqlen, zero_padding=2)
        self.inputs, self.dtype = inputs, d.q.dtype
        self.batch, self.nheads, self.seqlen = padded[0].shape[:3]
        self.nblocks = -(-self.seqlen // inputs.block_size)
        blocks, tm = inputs.blocks, inputs.token_mask
        self.shared = max(blocks.shape[0], 1 if tm is None else tm.shape[0]) == 1
        # One gathered key block: bs * B * H rows of D (shared layout), or bs * B (a head per pair).
        block_bytes = inputs.block_size * self.batch * (self.nheads if self.shared else 1) * d.q.shape[-1] \
            * d.q.element_size()
        self.groups = schedule(inputs, self.nblocks, 1 if self.shared else self.nheads,
                               max(1, GATHER_BYTES // block_bytes))
        # Every query block in some group: each query row of an output is written.
        self.covered = sum(g.heads.numel() for g in self.groups) == self.nblocks * (1 if self.shared else self.nheads)
        self.tables = [self.table(t) for t in padded]

    def table(self, t: Tensor) -> Tensor:
        """(B, H, S, ...) -> the row table."""
        return t.transpose(1, 2) if self.shared else t.flatten(1, 2)

    def rows(self, g: _Group, tokens: Tensor, length: int) -> Tensor:
        """Flat row indices of ``tokens`` (n, m) in a table of ``length`` tokens per head."""
        return (tokens if self.shared else g.heads[:, None] * length + tokens).flatten()

    def q_slice(self, g: _Group, length: int) -> Optional[slice]:
        """The group's query rows in a table of ``length`` tokens per head as one slice (no copy to
        gather them), or None: not one run of query blocks, or one past the table's end."""
        if g.q_run is None:
            return None
        head, first = g.q_run
        start, size = first * self.inputs.block_size, g.q_tokens.numel()
        if start + size > length:
            return None
        start += 0 if self.shared else head * length
        return slice(start, start + size)

    # ------------------------------------------------------------------ moving rows
    def gather(self, tables: list[Tensor], g: _Group, tokens: Tensor) -> list[Tensor]:
        """The group's rows at ``tokens`` (n, m) of each table, clamped into the sequence (the caller
        masks or drops the slots past its end), as ATen's (B', H', m, ...): batch B * n and heads H
        (shared), or batch B and heads n (per head)."""
        rows = self.rows(g, tokens.clamp(max=self.seqlen - 1), self.seqlen)
        return [self._aten(_take_rows(t, rows), tokens.shape) for t in tables]

    def gather_q(self, tables: list[Tensor], g: _Group) -> list[Tensor]:
        """:meth:`gather` of the group's query rows: views where they are one slice of the table."""
        rows = self.q_slice(g, self.seqlen)
        if rows is None:
            return self.gather(tables, g, g.q_tokens)
        return [self._aten(t[:, rows], g.q_tokens.shape) for t in tables]

    def _aten(self, x: Tensor, shape: torch.Size) -> Tensor:
        """Table rows (B, n * m, [H,] ...) -> ATen's (B', H', m, ...), see :meth:`gather`."""
        x = x.unflatten(1, shape)  # (B, n, m, [H,] ...)
        return x.flatten(0, 1).transpose(1, 2) if self.shared else x

    def buffer(self, trailing: tuple, dtype, fill: float, per_query: bool = True) -> Tensor:
        """An output row table, contiguous, for Sp = whole blocks of tokens: ``fill`` where no group
        writes (per_query: outputs written per query row, left unfilled when every row is)."""
        sp = self.nblocks * self.inputs.block_size
        shape = (self.batch, sp, self.nheads) if self.shared else (self.batch, self.nheads * sp)
        if per_query and self.covered:
            return torch.empty(shape + trailing, dtype=dtype)
        return torch.full(shape + trailing, fill, dtype=dtype)

    def _flat(self, x: Tensor) -> Tensor:
        """ATen's (B', H', m, ...) -> (B, n * m, [H,] ...), the rows of a table."""
        if self.shared:
            return x.transpose(1, 2).unflatten(0, (self.batch, -1)).flatten(1, 2)
        return x.flatten(1, 2)

    def put(self, table: Tensor, x: Tensor, g: _Group) -> None:
        """Write the group's query rows (each query block is in one group)."""
        sp = self.nblocks * self.inputs.block_size
        rows = self.q_slice(g, sp)
        if rows is None:
            table.index_copy_(1, self.rows(g, g.q_tokens, sp), self._flat(x))
        else:
            table[:, rows] = self._flat(x)

    def add(self, table: Tensor, x: Tensor, g: _Group) -> None:
        """Sum the group's key rows (a key block is visited by many query blocks), a whole block at a
        time: ``table`` is a contiguous buffer of whole blocks, so it views as (B, blocks, bs * ...)."""
        bs = self.inputs.block_size
        blocks = table.unflatten(1, (-1, bs)).flatten(2)
        blocks.index_add_(1, self.rows(g, g.k_blocks, self.nblocks), self._flat(x).unflatten(1, (-1, bs)).flatten(2))

    def finish(self, tables: list[Tensor]) -> list[Tensor]:
        """Output row tables -> contiguous tensors shaped like the inputs (padded or packed)."""
        sp = self.nblocks * self.inputs.block_size
        heads_first = [t[:, : self.seqlen].transpose(1, 2) if self.shared
                       else t.unflatten(1, (self.nheads, sp))[:, :, : self.seqlen] for t in tables]
        return dense._from_padded(heads_first, self.inputs.dense.cu_seqlens, self.coords)

    # ------------------------------------------------------------------ masks
    def keep(self, g: _Group) -> Optional[Tensor]:
        """The group's (B' or 1, H' or 1, bs or 1, c * bs) bool mask, True = may attend; None: all keys are kept."""
        inputs, keep = self.inputs, None
        if self.key_mask is not None or (g.last_block and self.nblocks * inputs.block_size > self.seqlen):
            keep = (g.k_tokens < self.seqlen)[None]  # (1, n, L)
            if self.key_mask is not None:
                keep = keep & self.key_mask[:, g.k_tokens.clamp(max=self.seqlen - 1)]  # (B, n, L)
            keep = keep[:, :, None, :]
        if g.tile is not None:
            keep = g.tile[None] if keep is None else keep & g.tile
        if keep is None:
            return None
        if self.shared:  # batch B * n, heads broadcast
            keep = keep.expand(self.batch, *keep.shape[1:]).flatten(0, 1)[:, None]
        return keep

    def bias(self, keep: Optional[Tensor]) -> Optional[Tensor]:
        if keep is None:
            return None
        return torch.zeros(keep.shape, dtype=self.dtype).masked_fill_(~keep, torch.finfo(self.dtype).min)

    def silent(self, g: _Group, keep: Optional[Tensor]) -> Optional[Tensor]:
        """(B'|1, H'|1, bs) rows that must get no gradient: no kept key, or past the sequence (clamped
        copies of its last row); None when there is none."""
        past = g.q_tokens >= self.seqlen  # (n, bs)
        silent = None
        if bool(past.any()):
            silent = past.repeat(self.batch, 1)[:, None] if self.shared else past[None]
        if keep is not None:
            silent = ~keep.any(dim=-1) if silent is None else silent | ~keep.any(dim=-1)
        return silent


def _take_rows(table: Tensor, rows: Tensor) -> Tensor:
    """``table.index_select(1, rows)`` for a (B, N, ...) table: as one index_select on dim 0 of its
    (B * N, rest) view when it has one, which ATen splits over threads, where on dim 1 it copies on one
    thread (1 MiB of fp32 rows of 1 KiB: 90-110 us either way on 1 thread, 45-60 us vs 90-110 us on 2;
    shared host, microbenchmark)."""
    if not table.is_contiguous() or table.numel() == 0:  # no flat view (an empty one has no row size)
        return table.index_select(1, rows)
    b, n = table.shape[:2]
    if b > 1:
        rows = (torch.arange(b)[:, None] * n + rows).flatten()
    return table.view(b * n, -1).index_select(0, rows).view(b, -1, *table.shape[2:])


def forward(inputs: BlockSparseInputs) -> tuple[Tensor, Tensor]:
    """Returns (out shaped like q, lse shaped q.shape[:-1]), both contiguous."""
    d = inputs.dense
    call = _Call(inputs, [d.k, d.v, d.q])
    k, v, q = call.tables
    acc = checks.accum_dtype(d.q.dtype)
    out = call.buffer(d.q.shape[-1:], d.q.dtype, 0.0)
    lse = call.buffer((), acc, float("-inf"))  # rows no group visits keep no key
    for g in call.groups:
        keep = call.keep(g)
        o, l = _ATEN_FWD(*call.gather_q([q], g), *call.gather([k, v], g, g.k_tokens),
                         0.0, False, attn_mask=call.bias(keep), scale=d.scale)
        l = l.to(acc)
        if keep is not None:
            has_key = keep.any(dim=-1)
            o, l = o.masked_fill(~has_key[..., None], 0.0), l.masked_fill(~has_key, float("-inf"))
        call.put(out, o, g)
        call.put(lse, l, g)
    out, lse = call.finish([out, lse])
    # A non-finite query makes its row NaN in the exact math (unless it keeps no key); ATen's
    # short-sequence kernel hides that, and query blocks are short sequences. A finite sum of q
    # rules it out at the cost of one read (an overflowing sum only sends us to the full check).
    if bool(d.q.sum(dtype=acc).isfinite()):
        return out, lse
    bad = ~d.q.isfinite().all(dim=-1) & ~torch.isneginf(lse)
    return out.masked_fill(bad[..., None], float("nan")), lse.masked_fill(bad, float("nan"))


def backward(inputs: BlockSparseInputs, out: Tensor, lse: Tensor, dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv) shaped like q, contiguous."""
    d = inputs.dense
    call = _Call(inputs, [d.k, d.v, d.q, out, dout])
    k, v, q, o, do = call.tables
    lse = lse if call.coords is None else padding.pad(lse, d.cu_seqlens, d.max_seqlen, call.coords)[0]
    lse = call.table(lse.transpose(1, 2))  # (B, S, H) -> a row table
    dq = call.buffer(d.q.shape[-1:], d.q.dtype, 0.0)
    dk, dv = (call.buffer(d.q.shape[-1:], d.q.dtype, 0.0, per_query=False) for _ in range(2))  # summed into
    for g in call.groups:
        keep = call.keep(g)
        qg, og, dog, lg = call.gather_q([q, o, do, lse], g)
        silent = call.silent(g, keep)
        if silent is not None:  # zero upstream gradient and a finite lse: ATen then yields zeros
            dog, lg = dog.masked_fill(silent[..., None], 0.0), lg.masked_fill(silent, 0.0)
        gdq, gdk, gdv = _ATEN_BWD(dog, qg, *call.gather([k, v], g, g.k_tokens), og, lg.contiguous(), 0.0, False,
                                  attn_mask=call.bias(keep), scale=d.scale)
        call.put(dq, gdq, g)
        call.add(dk, gdk, g)
        call.add(dv, gdv, g)
    return tuple(call.finish([dq, dk, dv]))
