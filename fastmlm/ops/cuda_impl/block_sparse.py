"""``cuda`` backend of block-sparse attention: the dense tensor-core kernels of csrc/attention.cuh,
walking the layout's visit lists.

The forward and dQ kernels (one block per 64-query tile) walk, instead of every key tile up to
the last real key, the key tiles of the layout blocks on their query block's visit list
(``block_layout.visit_list``, ascending, built here on the device with no host sync); the dK/dV
kernel (one block per 64-key tile) walks the transposed list. Skipped layout blocks are never
loaded; full ones need only the key mask; partial ones apply the layout's token rule per element
(|i - j| <= window, global tokens, token_mask). Dense attention is the same walk over every tile,
so the two ops share one kernel per direction (csrc/attention.cuh, ``TileWalk``).

Tile vs. layout block: a CUDA block owns 64 query rows (4 warps x 16) and steps through 64 keys
(32 at head dim 128), and every kernel tile must lie inside one layout block to take its state,
so the layout's block_size must be a multiple of 64 (the constructors' default); other block
sizes are refused in :func:`why_not` and ``auto`` falls back to the triton or torch backend.
Everything else is as for dense attention (attention.py): fp16/bf16 on sm_80+, head dims a
multiple of 8 up to 128, packed and padded layouts, per-head or shared layouts.
"""
from __future__ import annotations

from typing import Optional

from ..block_layout import SKIP, visit_list
from . import attention

QUERY_TILE = 64  # kBlockRows of csrc/attention.cuh: the rows one CUDA block owns


def why_not(inputs) -> Optional[str]:
    """Why these BlockSparseInputs cannot run here (None: they can)."""
    reason = attention.why_not(inputs.dense)
    if reason is not None:
        return reason
    if inputs.block_size % QUERY_TILE:
        return (f"the CUDA kernels need a layout block_size that is a multiple of {QUERY_TILE} (their query tile), "
                f"got {inputs.block_size} (use the triton or torch backend)")
    return None


def _sparse_arguments(inputs) -> tuple:
    """The layout arguments of the block_sparse_fwd / _bwd ops: tile states, both visit lists
    (per query block the key blocks, per key block the query blocks), the token rule."""
    blocks = inputs.blocks.contiguous()
    keep = blocks != SKIP
    kv_index, kv_count = visit_list(keep)
    q_index, q_count = visit_list(keep.transpose(1, 2))
    token_mask = None if inputs.token_mask is None else inputs.token_mask.contiguous()
    return (blocks, kv_index, kv_count, q_index, q_count, token_mask, inputs.block_size, inputs.window,
            inputs.num_global)


def forward(inputs):
    """Returns (out shaped like q, lse shaped q.shape[:-1] fp32), contiguous."""
    return attention.forward(inputs.dense, _sparse_arguments(inputs))


def backward(inputs, out, lse, dout):
    """Returns (dq, dk, dv) shaped like q, contiguous."""
    return attention.backward(inputs.dense, out, lse, dout, _sparse_arguments(inputs))
