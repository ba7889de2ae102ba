"""``torch`` backend of attention: ATen's CPU flash-attention kernels, and PyTorch's GPU kernels.

CUDA tensors go to attention_cuda.py (varlen_attn / memory-efficient SDPA); this file is the
CPU path, described below.


Uses ``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward,
which return and consume the log-sum-exp, so forward and backward are the
same fused kernels SDPA runs on the CPU. Padding keys get a large negative
additive bias rather than -inf, so an all-padding row stays finite inside ATen;
we then zero its output and gradients as the contract says. Packed batches are
padded to (B, max_seqlen) on the device and unpadded afterwards; the tensors
that travel together are stacked so each direction is one gather/scatter.

Three things ATen does not do for us: it needs the head dim at unit stride
(other views are copied), it lets 0 * NaN from padded keys and values into real
rows (they are zeroed first), and its short-sequence kernel hides a NaN query
(such rows are set to NaN).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import checks, padding
from ..attention import AttentionInputs
from . import attention_cuda

_ATEN_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_ATEN_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def why_not(inputs: AttentionInputs) -> Optional[str]:
    """Why these inputs cannot run here (None: they can)."""
    device = attention_cuda.device_type(inputs.q)
    if device == "cuda":
        return attention_cuda.why_not(inputs)
    if device != "cpu":
        return f"runs on CPU and CUDA tensors, got {device}"
    return None


def _unit_stride(t: Tensor) -> Tensor:
    """ATen's CPU flash kernels assume the head dim has stride 1 and silently read the wrong
    elements otherwise (x[..., ::2], a transposed (S, D) view): copy only those."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _to_padded(tensors, attention_mask, cu_seqlens, max_seqlen, zero_padding: int):
    """(T, H, D) packed or (B, S, H, D) padded tensors -> (B, H, S, D) views ATen can read, the
    (B, S) key mask, and the packed coordinates (None when padded).

    The first ``zero_padding`` tensors (the keys and values) are zero at padded positions:
    ATen masks their scores, but 0 * NaN is NaN, so whatever padding holds would otherwise
    reach the real rows. Packed batches are padded with zeros, which does that by itself.
    """
    if cu_seqlens is None:
        if attention_mask is not None:
            real = attention_mask[:, :, None, None]
            tensors = [torch.where(real, t, 0) if i < zero_padding else t for i, t in enumerate(tensors)]
        return [_unit_stride(t).transpose(1, 2) for t in tensors], attention_mask, None
    coords = padding.packed_coords(cu_seqlens, tensors[0].shape[0])
    stacked, mask = padding.pad(torch.stack(tensors, dim=1), cu_seqlens, max_seqlen, coords)  # (B, S, n, H, D)
    return [t.transpose(1, 2) for t in stacked.unbind(2)], mask, coords


def _from_padded(tensors, cu_seqlens, coords):
    """(B, H, S, ...) -> contiguous (B, S, H, ...) or packed (T, H, ...)."""
    tensors = [t.transpose(1, 2) for t in tensors]
    if coords is not None:
        tensors = [padding.unpad(t, cu_seqlens, coords[0].shape[0], coords) for t in tensors]
    return [t.contiguous() for t in tensors]


def _bias(mask: Optional[Tensor], extra_mask: Optional[Tensor], dtype,
          shape) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Additive float bias and the (B, H, S) "row has a key" flags; (None, None) without any mask
    (every row sees every key: nothing to add, nothing to zero)."""
    if mask is None and extra_mask is None:
        return None, None
    b, h, s = shape
    keep = torch.ones(b, 1, 1, s, dtype=torch.bool) if mask is None else mask[:, None, None, :]
    if extra_mask is not None:
        keep = keep & extra_mask[None, :, :s, :s]  # (B, H or 1, S, S)
    has_key = keep.any(dim=-1).expand(b, h, s)
    bias = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, torch.finfo(dtype).min)
    return bias, has_key


def forward(inputs: AttentionInputs) -> tuple[Tensor, Tensor]:
    """Returns (out shaped like q, lse shaped q.shape[:-1]), both contiguous."""
    if attention_cuda.device_type(inputs.q) == "cuda":
        return attention_cuda.forward(inputs)
    return masked_forward(inputs, None)


def backward(inputs: AttentionInputs, out: Tensor, lse: Tensor, dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv) shaped like q, contiguous."""
    if attention_cuda.device_type(inputs.q) == "cuda":
        return attention_cuda.backward(inputs, out, lse, dout)
    return masked_backward(inputs, out, lse, dout, None)


def masked_forward(inputs: AttentionInputs, extra_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """:func:`forward` with an extra (H or 1, S, S) bool mask, True = may attend (block-sparse attention)."""
    q, k, v, attention_mask, cu_seqlens, max_seqlen, scale = inputs
    (kp, vp, qp), mask, coords = _to_padded([k, v, q], attention_mask, cu_seqlens, max_seqlen, zero_padding=2)
    bias, has_key = _bias(mask, extra_mask, q.dtype, qp.shape[:3])
    out, lse = _ATEN_FWD(qp, kp, vp, 0.0, False, attn_mask=bias, scale=scale)
    # ATen's kernel for short unmasked sequences turns a NaN query into a finite row; a
    # non-finite query makes its row NaN in the exact math, so say so explicitly.
    finite = qp.isfinite().all(dim=-1)
    out, lse = torch.where(finite[..., None], out, float("nan")), torch.where(finite, lse, float("nan"))
    if has_key is not None:
        out = out.masked_fill(~has_key[..., None], 0.0)
        lse = lse.masked_fill(~has_key, float("-inf"))  # (B, H, S)
    lse = lse.to(checks.accum_dtype(q.dtype))
    out, lse = _from_padded([out, lse], cu_seqlens, coords)
    return out, lse


def masked_backward(inputs: AttentionInputs, out: Tensor, lse: Tensor, dout: Tensor,
                    extra_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`backward` under the extra mask of :func:`masked_forward`."""
    q, k, v, attention_mask, cu_seqlens, max_seqlen, scale = inputs
    (kp, vp, qp, outp, doutp), mask, coords = _to_padded([k, v, q, out, dout], attention_mask, cu_seqlens,
                                                         max_seqlen, zero_padding=2)
    if coords is not None:
        lse, _ = padding.pad(lse, cu_seqlens, max_seqlen, coords)
    bias, has_key = _bias(mask, extra_mask, q.dtype, qp.shape[:3])
    # Rows without keys: zero upstream gradient and a finite lse, so ATen yields zeros.
    lse = lse.transpose(1, 2)
    if has_key is not None:
        doutp, lse = doutp.masked_fill(~has_key[..., None], 0.0), lse.masked_fill(~has_key, 0.0)
    doutp, lse = doutp.contiguous(), lse.to(checks.accum_dtype(q.dtype))
    dq, dk, dv = _ATEN_BWD(doutp, qp, kp, vp, outp, lse.contiguous(), 0.0, False, attn_mask=bias, scale=scale)
    return tuple(_from_padded([dq, dk, dv], cu_seqlens, coords))
