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

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import checks
from .attention import AttentionInputs, attention_reference, validated_inputs
from .block_layout import BlockSparseLayout
from .dispatch import Registry, score_elements

REGISTRY = Registry(
    "block_sparse_attention",
    {
        "torch": "fastmlm.ops.torch_impl.block_sparse",
        "triton": "fastmlm_kernels.block_sparse",
        "cuda": "fastmlm.ops.cuda_impl.block_sparse",
    },
    work=lambda inputs: score_elements(inputs.dense),  # the reference is dense under the layout's mask
    oracle="fastmlm.ops.torch_impl.oracle:block_sparse_attention",
)


# --------------------------------------------------------------------------- the backends' bundle
class BlockSparseInputs(NamedTuple):
    """The inputs of one block-sparse attention call, as every backend's why_not / forward / backward receives them.

    The dense-attention inputs plus the layout as tensors and ints (a
    :class:`~fastmlm.ops.block_layout.BlockSparseLayout` does not pass through a custom op).

    Arguments:
        dense: the :class:`~fastmlm.ops.attention.AttentionInputs` (q, k, v, attention_mask,
            cu_seqlens, max_seqlen, scale), as for dense attention.
        blocks: (nheads or 1, nb, nb) int8 tile states (SKIP / FULL / PARTIAL of block_layout.py),
            nb = ceil(layout seqlen / block_size).
        token_mask: (nheads or 1, layout seqlen, layout seqlen) bool, the layout's extra token rule, or None.
        block_size: the layout's block edge in tokens.
        window: the sliding-window half width of partial tiles, -1 for none.
        num_global: how many leading tokens attend to and are attended by everything.
    """

    dense: AttentionInputs
    blocks: Tensor
    token_mask: Optional[Tensor]
    block_size: int
    window: int
    num_global: int

    @classmethod
    def from_layout(cls, dense: AttentionInputs, layout: BlockSparseLayout) -> "BlockSparseInputs":
        return cls(dense, layout.blocks, layout.token_mask, layout.block_size, layout.window, layout.num_global)

    def flat(self) -> tuple:
        """The custom ops' flat arguments: the dense inputs, then the layout's."""
        return (*self.dense, *self[1:])


def block_sparse_attention_reference(q, k, v, layout: BlockSparseLayout, attention_mask=None, cu_seqlens=None,
                                     softmax_scale=None, upcast: bool = True) -> tuple[Tensor, Tensor]:
    """Dense attention under the layout's token mask; returns (out, lse) as :func:`attention_reference` does."""
    return attention_reference(q, k, v, attention_mask, cu_seqlens, softmax_scale,
                               token_mask=layout.to(q.device).to_dense(), upcast=upcast)


# --------------------------------------------------------------------------- custom ops
# Flat schemas, as torch.library needs; the bundle is built here, below them. The layout
# travels as blocks (Hl, nb, nb) int8, token_mask (Hl, S, S) bool or None, block_size,
# window and num_global: each backend builds its own visit lists from the tile states.
@torch.library.custom_op("fastmlm::block_sparse_attention_fwd", mutates_args=())
def _bsa_fwd(
    q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor], cu_seqlens: Optional[Tensor], max_seqlen: int,
    scale: float, blocks: Tensor, token_mask: Optional[Tensor], block_size: int, window: int, num_global: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    dense = AttentionInputs(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale)
    inputs = BlockSparseInputs(dense, blocks, token_mask, block_size, window, num_global)
    return REGISTRY.module(backend).forward(inputs)


@_bsa_fwd.register_fake
def _(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, blocks, token_mask, block_size, window, num_global,
      backend):
    # Every backend returns contiguous tensors, whatever the strides of its inputs.
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=checks.accum_dtype(q.dtype))


@torch.library.custom_op("fastmlm::block_sparse_attention_bwd", mutates_args=())
def _bsa_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, attention_mask: Optional[Tensor],
    cu_seqlens: Optional[Tensor], max_seqlen: int, scale: float, blocks: Tensor, token_mask: Optional[Tensor],
    block_size: int, window: int, num_global: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    dense = AttentionInputs(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale)
    inputs = BlockSparseInputs(dense, blocks, token_mask, block_size, window, num_global)
    return REGISTRY.module(backend).backward(inputs, out, lse, dout)


@_bsa_bwd.register_fake
def _(dout, q, k, v, out, lse, attention_mask, cu_seqlens, max_seqlen, scale, blocks, token_mask, block_size, window,
      num_global, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, blocks, token_mask, *layout_ints, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, attention_mask, cu_seqlens, blocks, token_mask)
    ctx.max_seqlen, ctx.scale, ctx.layout_ints, ctx.backend = max_seqlen, scale, layout_ints, backend


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, attention_mask, cu_seqlens, blocks, token_mask = ctx.saved_tensors
    grads = _bsa_bwd(dout.contiguous(), q, k, v, out, lse, attention_mask, cu_seqlens, ctx.max_seqlen, ctx.scale,
                     blocks, token_mask, *ctx.layout_ints, ctx.backend)
    return (*grads,) + (None,) * 10  # nothing for the layout and options


_bsa_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public op
def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, *,
                           attention_mask: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                           max_seqlen: Optional[int] = None, softmax_scale: Optional[float] = None,
                           return_lse: bool = False, backend: str = "auto"):
    """Attention restricted to ``layout`` (see the module docstring).

    Arguments:
        q, k, v, attention_mask, cu_seqlens, max_seqlen, softmax_scale, return_lse, backend: as for
            :func:`fastmlm.ops.attention` (q, k, v (batch_size, seqlen, nheads, headdim) padded or
            (total_tokens, nheads, headdim) packed).
        layout: a :class:`~fastmlm.ops.block_layout.BlockSparseLayout` with 1 or nheads heads,
            covering at least max_seqlen tokens (positions relative to each sequence's start).
    Returns:
        out: shaped like q, in q's dtype, contiguous. A row whose kept set is empty is zeros.
        lse [with return_lse]: q.shape[:-1], fp32 (fp64 for fp64 inputs): the logsumexp of each
            row's scaled scores over the keys the layout keeps, -inf where it keeps none.
    """
    op = "block_sparse_attention"
    dense = validated_inputs(op, q, k, v, attention_mask, cu_seqlens, max_seqlen, softmax_scale, backend)
    if not isinstance(layout, BlockSparseLayout):
        checks.fail(op, f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    if layout.seqlen < dense.max_seqlen:
        checks.fail(op, f"layout covers {layout.seqlen} tokens but sequences are up to {dense.max_seqlen} long")
    if layout.num_heads not in (1, q.shape[-2]):
        checks.fail(op, f"layout has {layout.num_heads} heads; q has {q.shape[-2]} (use 1 to share one layout)")
    if layout.token_mask is not None and layout.token_mask.shape[0] not in (1, q.shape[-2]):
        checks.fail(op, f"layout token_mask has {layout.token_mask.shape[0]} heads; q has {q.shape[-2]} "
                        "(use 1 to share one mask)")
    layout = layout.to(q.device)
    inputs = BlockSparseInputs.from_layout(dense, layout)
    name = REGISTRY.select(backend, q.device.type, inputs)
    if name == "reference" or q.numel() == 0:  # nothing to launch for an empty batch
        out, lse = block_sparse_attention_reference(q, k, v, layout, attention_mask, cu_seqlens, dense.scale)
    else:
        out, lse = _bsa_fwd(*inputs.flat(), name)
    return (out, lse) if return_lse else out
