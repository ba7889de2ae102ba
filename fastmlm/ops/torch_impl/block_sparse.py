"""``torch`` backend of block-sparse attention.

CPU: flash attention under the dense layout mask. It visits every tile (the layout only
becomes an additive mask), so it is a correct, reasonably quick CPU path, not a sparse one.
CUDA: block_sparse_cuda.py (varlen_attn's sliding window, or FlexAttention with a cached
BlockMask), which skips the tiles the layout skips.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..block_layout import token_keep
from ..block_sparse import BlockSparseInputs
from . import attention as dense
from . import attention_cuda, block_sparse_cuda


def _on_cuda(inputs: BlockSparseInputs) -> bool:
    return attention_cuda.device_type(inputs.dense.q) == "cuda"


def why_not(inputs: BlockSparseInputs) -> Optional[str]:
    """Why these inputs cannot run here (None: they can)."""
    if _on_cuda(inputs):
        return block_sparse_cuda.why_not(inputs)
    return dense.why_not(inputs.dense)


def _keep(inputs: BlockSparseInputs) -> Tensor:
    """(H or 1, S, S) bool with S = max_seqlen: the layout as a token mask."""
    return token_keep(inputs.blocks, inputs.block_size, inputs.dense.max_seqlen, inputs.window, inputs.num_global,
                      inputs.token_mask)


def forward(inputs: BlockSparseInputs) -> tuple[Tensor, Tensor]:
    if _on_cuda(inputs):
        return block_sparse_cuda.forward(inputs)
    return dense.masked_forward(inputs.dense, _keep(inputs))


def backward(inputs: BlockSparseInputs, out: Tensor, lse: Tensor, dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if _on_cuda(inputs):
        return block_sparse_cuda.backward(inputs, out, lse, dout)
    return dense.masked_backward(inputs.dense, out, lse, dout, _keep(inputs))
