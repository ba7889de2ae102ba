"""Block-sparse bidirectional attention: contract, reference, dispatcher.

Same inputs and outputs as :func:`fastmlm.ops.attention` (padded (B, S, H, D)
with ``attention_mask``, or packed (T, H, D) with ``cu_seqlens``), plus a
:class:`~fastmlm.ops.block_layout.BlockSparseLayout` saying which keys each
query may see (positions relative to each sequence's start):

    out[i] = softmax_j∈keep(i) (q_i · k_j * scale) v_j,   keep(i) = layout ∧ real keys

It is *defined* as dense attention under ``layout.to_dense()``; the fast
backends must match that while visiting only the tiles the layout keeps.
A query whose kept set is empty outputs zeros (lse = -inf) with zero gradients.
As for dense attention, padding never contributes (whatever it holds), and a
layout longer than the batch serves it: only its first max_seqlen tokens apply.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import checks
from .attention import attention_reference, validate, validate_options
from .block_layout import BlockSparseLayout
from .dispatch import Registry

REGISTRY = Registry(
    "block_sparse_attention",
    {
        "torch": "fastmlm.ops.torch_impl.block_sparse",
        "triton": "fastmlm_kernels.block_sparse",
        "cuda": "fastmlm.ops.cuda_impl.block_sparse",
    },
)


def block_sparse_attention_reference(q, k, v, layout: BlockSparseLayout, attention_mask=None, cu_seqlens=None,
                                     softmax_scale=None, upcast: bool = True) -> tuple[Tensor, Tensor]:
    """Dense attention under the layout's token mask; returns (out, lse)."""
    return attention_reference(q, k, v, attention_mask, cu_seqlens, softmax_scale,
                               token_mask=layout.to(q.device).to_dense(), upcast=upcast)


# --------------------------------------------------------------------------- custom ops
# The layout travels as tensors and ints: blocks (Hl, nb, nb) int8, kv_index (Hl, nb, K)
# int32, kv_count (Hl, nb) int32, token_mask (Hl, S, S) bool or None, block_size, window, num_global.
@torch.library.custom_op("fastmlm::block_sparse_attention_fwd", mutates_args=())
def _bsa_fwd(
    q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor], cu_seqlens: Optional[Tensor], max_seqlen: int,
    scale: float, blocks: Tensor, kv_index: Tensor, kv_count: Tensor, token_mask: Optional[Tensor],
    block_size: int, window: int, num_global: int, backend: str,
) -> tuple[Tensor, Tensor]:
    return REGISTRY.module(backend).forward(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, blocks,
                                            kv_index, kv_count, token_mask, block_size, window, num_global)


@_bsa_fwd.register_fake
def _(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, blocks, kv_index, kv_count, token_mask,
      block_size, window, num_global, backend):
    # Every backend returns contiguous tensors, whatever the strides of its inputs.
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=checks.accum_dtype(q.dtype))


@torch.library.custom_op("fastmlm::block_sparse_attention_bwd", mutates_args=())
def _bsa_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, attention_mask: Optional[Tensor],
    cu_seqlens: Optional[Tensor], max_seqlen: int, scale: float, blocks: Tensor, kv_index: Tensor,
    kv_count: Tensor, token_mask: Optional[Tensor], block_size: int, window: int, num_global: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return REGISTRY.module(backend).backward(dout, q, k, v, out, lse, attention_mask, cu_seqlens, max_seqlen, scale,
                                             blocks, kv_index, kv_count, token_mask, block_size, window, num_global)


@_bsa_bwd.register_fake
def _(dout, q, k, v, out, lse, attention_mask, cu_seqlens, max_seqlen, scale, blocks, kv_index, kv_count,
      token_mask, block_size, window, num_global, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, blocks, kv_index, kv_count, token_mask, *rest = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, attention_mask, cu_seqlens, blocks, kv_index, kv_count, token_mask)
    ctx.max_seqlen, ctx.scale, ctx.rest = max_seqlen, scale, rest


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, attention_mask, cu_seqlens, blocks, kv_index, kv_count, token_mask = ctx.saved_tensors
    grads = _bsa_bwd(dout.contiguous(), q, k, v, out, lse, attention_mask, cu_seqlens, ctx.max_seqlen, ctx.scale,
                     blocks, kv_index, kv_count, token_mask, *ctx.rest)
    return (*grads,) + (None,) * 12


_bsa_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public op
def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: BlockSparseLayout,
    *,
    attention_mask: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention restricted to ``layout`` (see the module docstring); returns out or (out, lse)."""
    op = "block_sparse_attention"
    max_seqlen = validate(op, q, k, v, attention_mask, cu_seqlens, max_seqlen)
    scale = validate_options(op, backend, softmax_scale, q.shape[-1])
    if not isinstance(layout, BlockSparseLayout):
        checks.fail(op, f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    if layout.seqlen < max_seqlen:
        checks.fail(op, f"layout covers {layout.seqlen} tokens but sequences are up to {max_seqlen} long")
    if layout.num_heads not in (1, q.shape[-2]):
        checks.fail(op, f"layout has {layout.num_heads} heads; q has {q.shape[-2]} (use 1 to share one layout)")
    layout = layout.to(q.device)
    inputs = dict(q=q, k=k, v=v, attention_mask=attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                  scale=scale, layout=layout)
    name = REGISTRY.select(backend, q.device.type, inputs)
    if name == "reference" or q.numel() == 0:  # nothing to launch for an empty batch
        out, lse = block_sparse_attention_reference(q, k, v, layout, attention_mask, cu_seqlens, scale)
    else:
        kv_index, kv_count = layout.kv_blocks
        mask = None if attention_mask is None else attention_mask.bool()
        out, lse = _bsa_fwd(q, k, v, mask, cu_seqlens, max_seqlen, scale, layout.blocks, kv_index, kv_count,
                            layout.token_mask, layout.block_size, layout.window, layout.num_global, name)
    return (out, lse) if return_lse else out
