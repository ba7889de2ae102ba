"""``triton`` backend of :func:`fastmlm.ops.block_sparse_attention`.

Runs the same kernel body as dense attention (``_flash.py``), driven by the
layout's per-query-block list of key blocks instead of the full list:

  * skipped tiles are never loaded, in the forward or the backward;
  * fully kept tiles run with no per-element mask (unless they cross the end of
    the sequence or a key-padding mask is given);
  * partially kept tiles evaluate the layout's token rule per element
    (fine tile state, then |i - j| <= window, global tokens, token_mask).

The kernel tile is the layout's block size clamped to [16, 64] (tl.dot needs
at least 16; wider tiles spilled registers in the sm_90 compile): a smaller
layout block is pooled (a kernel tile is full only if every layout block in it
is, skipped only if every one is, otherwise partial and judged per element from
the fine states); a larger one is split. The dK/dV
kernel walks the transposed list (per key block, the query blocks that visit
it). Schedules (``attention.Schedule``, built by :func:`sparse_schedule` with the
one visit-list builder, ``block_layout.visit_list``) are built on the device with
no host synchronisation and cached per layout tensor, so layers and steps that
share a layout build it once.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F

from fastmlm.ops.block_layout import FULL, PARTIAL, SKIP, visit_list

from . import attention

# tl.dot needs 16; 128-wide tiles spilled registers in the sm_90 backward compile, so larger
# layout blocks are split into 64-wide kernel tiles (exact: a split tile keeps its block's state).
MIN_TILE, MAX_TILE = 16, 64
_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_SIZE = 32


def why_not(inputs) -> Optional[str]:
    """None when the kernels can run ``inputs`` (a BlockSparseInputs), else a short reason."""
    reason = attention.why_not(inputs.dense)
    if reason is not None:
        return reason
    if inputs.block_size & (inputs.block_size - 1):
        return f"layout block_size {inputs.block_size} is not a power of two"
    return None


def forward(inputs):
    """Returns (out shaped like q, lse shaped q.shape[:-1] fp32), contiguous."""
    return attention.launch_forward(inputs.dense, _schedule_of(inputs))


def backward(inputs, out, lse, dout):
    """Returns (dq, dk, dv) shaped like q, contiguous."""
    return attention.launch_backward(inputs.dense, out, lse, dout, _schedule_of(inputs))


# --------------------------------------------------------------------------- schedules
def kernel_tile(block_size: int) -> int:
    return min(max(block_size, MIN_TILE), MAX_TILE)


def _tile_states(blocks: torch.Tensor, block_size: int, seqlen: int, tile: int) -> torch.Tensor:
    """Layout-block states (Hl, nb, nb) -> kernel-tile states (Hl, nt, nt), nt = ceil(seqlen / tile)."""
    heads, nb = blocks.shape[0], blocks.shape[1]
    nt = -(-seqlen // tile)
    if tile == block_size:
        return blocks.contiguous()
    if tile < block_size:  # split: every kernel tile inherits its layout block's state
        r = block_size // tile
        return blocks.repeat_interleave(r, 1).repeat_interleave(r, 2)[:, :nt, :nt].contiguous()
    # pool r x r layout blocks; blocks past the end count as full for "all" and as skipped for "any"
    r = tile // block_size
    pad = nt * r - nb
    pooled = lambda m, fill: F.pad(m, (0, pad, 0, pad), value=fill).view(heads, nt, r, nt, r)
    full = pooled(blocks == FULL, True).all(4).all(2)
    some = pooled(blocks != SKIP, False).any(4).any(2)
    states = torch.where(full, FULL, torch.where(some, PARTIAL, SKIP))
    return states.to(torch.int8).contiguous()


def sparse_schedule(blocks, block_size, seqlen, window, num_global, token_mask) -> attention.Schedule:
    """The kernel schedule of a layout, cached per (layout tensors, tile). The cache holds
    the layout tensors themselves, so their memory (and data_ptr) cannot be reused while cached."""
    tile = kernel_tile(block_size)
    key = (blocks.data_ptr(), blocks._version, tuple(blocks.shape), str(blocks.device), block_size, seqlen, window,
           num_global, None if token_mask is None else (token_mask.data_ptr(), token_mask._version))
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is blocks and (token_mask is None or hit[1] is token_mask):
        _CACHE.move_to_end(key)
        return hit[2]
    states = _tile_states(blocks, block_size, seqlen, tile)
    keep = states != SKIP
    kv_index, kv_count = visit_list(keep)
    q_index, q_count = visit_list(keep.transpose(1, 2))
    tm = None if token_mask is None else token_mask.contiguous().view(torch.uint8)
    schedule = attention.Schedule(tile, states, kv_index, kv_count, q_index, q_count,
                                  blocks.to(torch.int8).contiguous(), block_size, seqlen, window, num_global, tm)
    _CACHE[key] = (blocks, token_mask, schedule)
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return schedule


def _schedule_of(inputs) -> attention.Schedule:
    """The (cached) schedule of the layout in ``inputs``. Its sequence length as the op's tensors
    tell it: exact with a token mask, else rounded up to whole blocks (the extra positions lie
    past every sequence)."""
    blocks, token_mask = inputs.blocks, inputs.token_mask
    layout_len = token_mask.shape[1] if token_mask is not None else blocks.shape[1] * inputs.block_size
    return sparse_schedule(blocks, inputs.block_size, layout_len, inputs.window, inputs.num_global, token_mask)
