"""``cuda`` backend of attention: the tensor-core kernels of csrc/attention.cuh.

Forward: one fused kernel (online softmax, fp32 statistics) writes out and lse.
Backward: delta = rowsum(dout * out), then dK/dV and dQ in two kernels without atomics,
so gradients are deterministic. Both layouts go through the same kernels: packed via
cu_seqlens; padded with the (B, S) mask applied per key inside the kernel (no host
sync, any mask pattern), skipping the key tiles past each sequence's last real key.
Takes fp16/bf16 on sm_80+ GPUs, head_dim a multiple of 8 up to 128 (fp32 goes to the
triton or torch backend).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..attention import AttentionInputs
from . import contiguous_aligned16, kernel_ops, why_not_device

DTYPES = (torch.float16, torch.bfloat16)
MAX_GRID_YZ = 65535  # heads and sequences index the grid's y and z
MAX_HEAD_DIM = 128  # the largest bucket of csrc/head_dims.h (tests/test_cuda_build.py checks they agree)


def why_not(inputs: AttentionInputs) -> Optional[str]:
    """Why these inputs cannot run here (None: they can)."""
    q = inputs.q
    where = why_not_device(q)
    if where:
        return where
    if q.dtype not in DTYPES:
        return f"the tensor-core kernels take float16/bfloat16, not {q.dtype} (use the triton or torch backend)"
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > MAX_HEAD_DIM:
        return f"head_dim must be a multiple of 8 and at most {MAX_HEAD_DIM}, got {head_dim}"
    if q.shape[-2] > MAX_GRID_YZ or inputs.batch > MAX_GRID_YZ:
        return f"at most {MAX_GRID_YZ} heads and sequences per call, got {q.shape[-2]} and {inputs.batch}"
    return None


def _layout(inputs: AttentionInputs):
    """(key_mask, key_len, cu_seqlens) as the kernels take them.

    key_len[b] = last real key + 1 (0 for an all-padding sequence), computed on the device,
    so the kernels skip the key tiles of right padding without a host sync.
    """
    if inputs.attention_mask is None:
        return None, None, None if inputs.cu_seqlens is None else inputs.cu_seqlens.contiguous()
    key_mask = contiguous_aligned16(inputs.attention_mask.bool())
    return key_mask, inputs.key_lengths().contiguous(), None


def forward(inputs: AttentionInputs, sparse: tuple = ()) -> tuple[Tensor, Tensor]:
    """Returns (out shaped like q, lse shaped q.shape[:-1] fp32), contiguous.

    sparse: the block-sparse layout arguments of the ``block_sparse_fwd`` op (built by
    block_sparse.py), or () for dense attention: one driver, one kernel, two ops.
    """
    q, k, v = (contiguous_aligned16(t) for t in inputs[:3])
    key_mask, key_len, cu_seqlens = _layout(inputs)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    op = kernel_ops().block_sparse_fwd if sparse else kernel_ops().attention_fwd
    op(q, k, v, key_mask, key_len, cu_seqlens, inputs.max_seqlen, inputs.scale, *sparse, out, lse)
    return out, lse


def backward(inputs: AttentionInputs, out: Tensor, lse: Tensor, dout: Tensor,
             sparse: tuple = ()) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv) shaped like q, contiguous. sparse: as for :func:`forward`."""
    dout, q, k, v, out, lse = (contiguous_aligned16(t) for t in (dout, *inputs[:3], out, lse))
    key_mask, key_len, cu_seqlens = _layout(inputs)
    delta = torch.empty_like(lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    op = kernel_ops().block_sparse_bwd if sparse else kernel_ops().attention_bwd
    op(dout, q, k, v, out, lse, key_mask, key_len, cu_seqlens, inputs.max_seqlen, inputs.scale, *sparse,
       delta, dq, dk, dv)
    return dq, dk, dv
