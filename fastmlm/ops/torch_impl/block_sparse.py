"""``torch`` backend of block-sparse attention: CPU flash attention under the dense layout mask.

It visits every tile (the layout only becomes an additive mask), so it is a
correct, reasonably quick CPU path, not a sparse one.
"""
from __future__ import annotations

from typing import Optional

from ..block_layout import token_keep
from . import attention as dense


def why_not(q, layout, **_) -> Optional[str]:
    return dense.why_not(q, None, None, None, None, None, None)


def forward(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, blocks, kv_index, kv_count, token_mask,
            block_size, window, num_global):
    keep = token_keep(blocks, block_size, max_seqlen, window, num_global, token_mask)
    return dense.forward(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, extra_mask=keep)


def backward(dout, q, k, v, out, lse, attention_mask, cu_seqlens, max_seqlen, scale, blocks, kv_index, kv_count,
             token_mask, block_size, window, num_global):
    keep = token_keep(blocks, block_size, max_seqlen, window, num_global, token_mask)
    return dense.backward(dout, q, k, v, out, lse, attention_mask, cu_seqlens, max_seqlen, scale, extra_mask=keep)
