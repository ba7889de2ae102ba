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

import weakref
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import checks, dispatch
from .attention import AttentionInputs, attention_reference, validate_metadata, validate_options
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

    @classmethod
    def from_flat(cls, flat: tuple) -> "BlockSparseInputs":
        """The bundle of the custom ops' flat arguments (:meth:`flat`, without the backend name)."""
        return cls(AttentionInputs(*flat[:7]), *flat[7:])

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
    inputs = BlockSparseInputs.from_flat((q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, blocks, token_mask,
                                          block_size, window, num_global))
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
    dout = dout.contiguous()
    if dispatch.plain_eager(dout, q, k, v, out, lse, attention_mask, cu_seqlens, blocks, token_mask) \
            and not torch.is_grad_enabled():
        inputs = BlockSparseInputs.from_flat((q, k, v, attention_mask, cu_seqlens, ctx.max_seqlen, ctx.scale, blocks,
                                              token_mask, *ctx.layout_ints))
        grads = REGISTRY.module(ctx.backend).backward(inputs, out, lse, dout)
    else:  # traced, under a mode, or create_graph=True: the custom op (not differentiable again)
        grads = _bsa_bwd(dout, q, k, v, out, lse, attention_mask, cu_seqlens, ctx.max_seqlen, ctx.scale,
                         blocks, token_mask, *ctx.layout_ints, ctx.backend)
    return (*grads,) + (None,) * 10  # nothing for the layout and options


_bsa_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerBlockSparse(torch.autograd.Function):
    """``fastmlm::block_sparse_attention_fwd`` with its autograd rule (the same setup_context and
    backward) but without the custom op's dispatcher round trips, for the plain eager path (the
    classic ``forward(ctx, ...)`` form: ``Function.apply`` then binds no signature per call)."""

    @staticmethod
    def forward(ctx, *flat):
        output = REGISTRY.module(flat[-1]).forward(BlockSparseInputs.from_flat(flat[:-1]))
        _setup_context(ctx, flat, output)
        return output

    backward = staticmethod(_backward)


def _run_forward(inputs: BlockSparseInputs, backend: str) -> tuple[Tensor, Tensor]:
    """(out, lse) from backend ``backend`` (a :meth:`Registry.select` name): through the custom op
    when traced or under a mode, else the same call with the same autograd rule, unwrapped."""
    q, k, v, attention_mask, cu_seqlens = inputs.dense[:5]
    if not dispatch.plain_eager(q, k, v, attention_mask, cu_seqlens, inputs.blocks, inputs.token_mask):
        return _bsa_fwd(*inputs.flat(), backend)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _EagerBlockSparse.apply(*inputs.flat(), backend)
    return REGISTRY.module(backend).forward(inputs)


def _check_layout(op: str, layout, max_seqlen: int, nheads: int) -> None:
    if not isinstance(layout, BlockSparseLayout):
        checks.fail(op, f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    if layout.seqlen < max_seqlen:
        checks.fail(op, f"layout covers {layout.seqlen} tokens but sequences are up to {max_seqlen} long")
    if layout.num_heads not in (1, nheads):
        checks.fail(op, f"layout has {layout.num_heads} heads; q has {nheads} (use 1 to share one layout)")
    if layout.token_mask is not None and layout.token_mask.shape[0] not in (1, nheads):
        checks.fail(op, f"layout token_mask has {layout.token_mask.shape[0]} heads; q has {nheads} "
                        "(use 1 to share one mask)")


def _plan(q, k, v, layout, attention_mask, cu_seqlens, max_seqlen, softmax_scale, backend) -> tuple[int, float, str]:
    """What the public op derives from metadata and the layout alone, memoised per signature:
    (max_seqlen, softmax scale, the backend name :meth:`Registry.select` returns)."""
    op = "block_sparse_attention"
    max_seqlen = validate_metadata(op, q, k, v, attention_mask, cu_seqlens, max_seqlen)
    scale = validate_options(op, backend, softmax_scale, q.shape[-1])
    _check_layout(op, layout, max_seqlen, q.shape[-2])
    mask = None if attention_mask is None else attention_mask.bool()
    inputs = BlockSparseInputs.from_layout(AttentionInputs(q, k, v, mask, cu_seqlens, max_seqlen, scale),
                                           layout.to(q.device))
    return max_seqlen, scale, REGISTRY.select(backend, q.device.type, inputs)


def _layout_key(layout: BlockSparseLayout) -> tuple:
    tm = layout.token_mask
    return weakref.ref(layout), layout.blocks._version, None if tm is None else tm._version


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
    key = dispatch.call_key(q, k, v, attention_mask, cu_seqlens, max_seqlen, softmax_scale, backend)
    if key is not None:  # (None under torch.compile, which memoises nothing.) The layout counts by identity and
        # by the versions of its tensors (backends read its tile states, e.g. whether it is a pure window), held
        # weakly: the memo keeps no layout (nor its token mask) alive, and a dead layout's entry never matches.
        key = key + _layout_key(layout) if isinstance(layout, BlockSparseLayout) else None
    max_seqlen, scale, name = REGISTRY.memo(
        key, lambda: _plan(q, k, v, layout, attention_mask, cu_seqlens, max_seqlen, softmax_scale, backend))
    if cu_seqlens is not None:  # a value check: every call
        checks.check_cu_seqlens("block_sparse_attention", cu_seqlens, q.shape[0], max_seqlen)
    layout = layout.to(q.device)
    if name == "reference" or q.numel() == 0:  # nothing to launch for an empty batch
        out, lse = block_sparse_attention_reference(q, k, v, layout, attention_mask, cu_seqlens, scale)
    else:
        mask = None if attention_mask is None else attention_mask.bool()
        dense = AttentionInputs(q, k, v, mask, cu_seqlens, max_seqlen, scale)
        out, lse = _run_forward(BlockSparseInputs.from_layout(dense, layout), name)
    return (out, lse) if return_lse else out
