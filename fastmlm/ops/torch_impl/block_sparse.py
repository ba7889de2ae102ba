"""``torch`` backend of block-sparse attention.

CPU: block_sparse_cpu.py runs ATen's flash kernels on the kept tiles only (query blocks
grouped by how many key blocks they keep), when skipping pays (see DENSE_ABOVE). Otherwise,
and always when no tile of the batch's sequence is skipped, dense flash attention: with no
mask at all when every tile is FULL (100% density is dense ``attention``), else under the
layout's token mask as an additive bias.
CUDA: block_sparse_cuda.py (varlen_attn's sliding window, or FlexAttention with a cached
BlockMask), which skips the tiles the layout skips.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ..block_layout import FULL, per_layout, token_keep
from ..block_sparse import BlockSparseInputs
from . import attention as dense
from . import attention_cuda, block_sparse_cpu, block_sparse_cuda

# When the CPU skips tiles (measured on fp32 fwd+bwd, 1 thread, see
# benchmarks/results/cpu-block-sparse-summary.md): below DENSE_ABOVE kept tiles, with layout
# blocks of at least MIN_BLOCK tokens and sequences of at least MIN_SEQLEN. Otherwise the dense
# kernel under the layout's mask is quicker: gathering key blocks per query block, and ATen's
# kernel on short query blocks, cost more than the tiles skipped.
DENSE_ABOVE, MIN_BLOCK, MIN_SEQLEN = 0.7, 32, 512

# The dense route's masks per layout (block_layout.per_layout), for masks of at most MASK_CACHE_ELEMENTS: short
# sequences, where building the (H, S, S) mask on every call (forward and backward) cost more than the attention
# itself (~0.4 ms per call at b=2 s=32 h=2 d=64, cProfile, shared host).
_DENSE_MASKS = WeakIdKeyDictionary()
MASK_CACHE_ELEMENTS = 1 << 22


def _on_cuda(inputs: BlockSparseInputs) -> bool:
    return attention_cuda.device_type(inputs.dense.q) == "cuda"


def why_not(inputs: BlockSparseInputs) -> Optional[str]:
    """Why these inputs cannot run here (None: they can)."""
    if _on_cuda(inputs):
        return block_sparse_cuda.why_not(inputs)
    return dense.why_not(inputs.dense)


def _dense_mask(inputs: BlockSparseInputs) -> Optional[Tensor]:
    """The mask of the dense CPU route: None when every tile of the batch's sequence is FULL
    (plain dense attention), else the (H or 1, S, S) token mask of the layout (remembered per
    layout when small: a layout is immutable). The tile states are read on the host, which on
    the CPU is no device sync."""
    seqlen = inputs.dense.max_seqlen
    heads = max(inputs.blocks.shape[0], 1 if inputs.token_mask is None else inputs.token_mask.shape[0])
    if heads * seqlen * seqlen > MASK_CACHE_ELEMENTS:
        return _build_dense_mask(inputs)
    key = (seqlen, inputs.block_size, inputs.window, inputs.num_global)
    return per_layout(_DENSE_MASKS, inputs.blocks, inputs.token_mask, key, lambda: _build_dense_mask(inputs))


def _build_dense_mask(inputs: BlockSparseInputs) -> Optional[Tensor]:
    nblocks = -(-inputs.dense.max_seqlen // inputs.block_size)
    if bool((inputs.blocks[:, :nblocks, :nblocks] == FULL).all()):
        return None
    return token_keep(inputs.blocks, inputs.block_size, inputs.dense.max_seqlen, inputs.window, inputs.num_global,
                      inputs.token_mask)


def _sparse(inputs: BlockSparseInputs) -> bool:
    """Whether the CPU takes the tile-skipping route (see DENSE_ABOVE)."""
    seqlen, heads = inputs.dense.max_seqlen, inputs.dense.q.shape[-2]
    if inputs.block_size < MIN_BLOCK or seqlen < MIN_SEQLEN:
        return False
    if inputs.token_mask is not None and inputs.token_mask.shape[0] not in (1, heads):
        return False  # not a layout for these heads: the dense route refuses it as it always has
    return block_sparse_cpu.density(inputs.blocks, -(-seqlen // inputs.block_size)) < DENSE_ABOVE


def forward(inputs: BlockSparseInputs) -> tuple[Tensor, Tensor]:
    if _on_cuda(inputs):
        return block_sparse_cuda.forward(inputs)
    if _sparse(inputs):
        return block_sparse_cpu.forward(inputs)
    return dense.masked_forward(inputs.dense, _dense_mask(inputs))


def backward(inputs: BlockSparseInputs, out: Tensor, lse: Tensor, dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if _on_cuda(inputs):
        return block_sparse_cuda.backward(inputs, out, lse, dout)
    if _sparse(inputs):
        return block_sparse_cpu.backward(inputs, out, lse, dout)
    return dense.masked_backward(inputs.dense, out, lse, dout, _dense_mask(inputs))
