"""``triton`` backend of :func:`fastmlm.ops.block_sparse_attention`.

Runs the same kernel body as dense attention (``_flash.py``), driven by the
layout's per-query-block list of key blocks instead of the full list:

  * skipped tiles are never loaded, in the forward or the backward;
  * fully kept tiles run with no per-element mask (unless they cross the end of
    the sequence or a key-padding mask is given);
  * partially kept tiles evaluate the layout's token rule per element
    (fine tile state, then |i - j| <= window, global tokens, token_mask).

The kernel tile is the layout's block size clamped to [16, 64] (tl.dot needs
at least 16; wider tiles spilled registers in the sm_90 compile): a smaller layout block is pooled (a kernel tile is full only if
every layout block in it is, skipped only if every one is, otherwise partial
and judged per element from the fine states); a larger one is split. The dK/dV
kernel walks the transposed list (per key block, the query blocks that visit
it). Schedules are built on the device with no host synchronisation and cached
per layout tensor, so layers and steps that share a layout build it once.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F

from . import _flash
from .attention import why_not as _dense_why_not

# tl.dot needs 16; 128-wide tiles spilled registers in the sm_90 backward compile, so larger
# layout blocks are split into 64-wide kernel tiles (exact: a split tile keeps its block's state).
MIN_TILE, MAX_TILE = 16, 64
_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_SIZE = 32


def why_not(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, layout=None, **_) -> Optional[str]:
    reason = _dense_why_not(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale)
    if reason is not None:
        return reason
    if layout is not None and layout.block_size & (layout.block_size - 1):
        return f"layout block_size {layout.block_size} is not a power of two"
    return None


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
    full = pooled(blocks == _flash.FULL, True).all(4).all(2)
    some = pooled(blocks != _flash.SKIP, False).any(4).any(2)
    states = torch.where(full, _flash.FULL, torch.where(some, _flash.PARTIAL, _flash.SKIP))
    return states.to(torch.int8).contiguous()


def _visit_lists(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hl, n, n) bool -> ascending kept indices per row (padded with -1, full width, so no
    host read of the maximum count) and (Hl, n) counts."""
    counts = keep.sum(-1, dtype=torch.int32)
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
    slots = torch.arange(keep.shape[-1], device=keep.device)
    return torch.where(slots < counts[..., None], order, -1).to(torch.int32).contiguous(), counts.contiguous()


def schedule(blocks, block_size, seqlen, window, num_global, token_mask) -> _flash.Schedule:
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
    keep = states != _flash.SKIP
    kv_index, kv_count = _visit_lists(keep)
    q_index, q_count = _visit_lists(keep.transpose(1, 2))
    tm = None if token_mask is None else token_mask.contiguous().view(torch.uint8)
    result = _flash.Schedule(tile, states, kv_index, kv_count, q_index, q_count, blocks.to(torch.int8).contiguous(),
                             block_size, seqlen, window, num_global, tm)
    _CACHE[key] = (blocks, token_mask, result)
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return result


def _layout_len(blocks, block_size, token_mask) -> int:
    """The layout's sequence length as the op's tensors tell it: exact with a token mask,
    else rounded up to whole blocks (the extra positions lie past every sequence)."""
    return token_mask.shape[1] if token_mask is not None else blocks.shape[1] * block_size


def forward(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, blocks, kv_index, kv_count, token_mask,
            block_size, window, num_global):
    # kv_index / kv_count describe layout blocks; the kernel works on its own tiles, so the
    # (cached) schedule rebuilds both lists at kernel-tile granularity.
    plan = schedule(blocks, block_size, _layout_len(blocks, block_size, token_mask), window, num_global, token_mask)
    return _flash.forward(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, plan)


def backward(dout, q, k, v, out, lse, attention_mask, cu_seqlens, max_seqlen, scale, blocks, kv_index, kv_count,
             token_mask, block_size, window, num_global):
    plan = schedule(blocks, block_size, _layout_len(blocks, block_size, token_mask), window, num_global, token_mask)
    return _flash.backward(dout, q, k, v, out, lse, attention_mask, cu_seqlens, max_seqlen, scale, plan)
