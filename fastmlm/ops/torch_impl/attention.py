"""``torch`` backend of attention: ATen's CPU flash-attention kernels.

Uses ``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward,
which return and consume the log-sum-exp, so forward and backward are the
same fused kernels SDPA runs on the CPU. Padding keys get a large negative
additive bias rather than -inf, so an all-padding row stays finite inside ATen;
we then zero its output and gradients as the contract says. Packed batches are
padded to (B, max_seqlen) on the device and unpadded afterwards.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import padding

_ATEN_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_ATEN_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def why_not(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, **_) -> Optional[str]:
    if q.device.type != "cpu":
        return f"runs on the CPU only; {q.device.type} tensors go to the triton or cuda backend"
    return None


def _padded(q, k, v, attention_mask, cu_seqlens, max_seqlen):
    """Bring both layouts to (B, H, S, D) plus a (B, S) key mask."""
    if cu_seqlens is not None:
        q, mask = padding.pad(q, cu_seqlens, max_seqlen)
        k, _ = padding.pad(k, cu_seqlens, max_seqlen)
        v, _ = padding.pad(v, cu_seqlens, max_seqlen)
    else:
        mask = attention_mask
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask


def _bias(mask: Optional[Tensor], extra_mask: Optional[Tensor], dtype, shape) -> tuple[Optional[Tensor], Tensor]:
    """Additive float bias and the (B, H, S) "row has a key" flags."""
    b, h, s = shape
    keep = torch.ones(b, 1, 1, s, dtype=torch.bool) if mask is None else mask[:, None, None, :]
    if extra_mask is not None:
        keep = keep & extra_mask[None, :, :s, :s]  # (B, H or 1, S, S)
    has_key = keep.any(dim=-1).expand(b, h, s)
    if mask is None and extra_mask is None:
        return None, has_key
    bias = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, torch.finfo(dtype).min)
    return bias, has_key


def forward(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, extra_mask=None):
    total = q.shape[0]
    qp, kp, vp, mask = _padded(q, k, v, attention_mask, cu_seqlens, max_seqlen)
    bias, has_key = _bias(mask, extra_mask, q.dtype, (qp.shape[0], qp.shape[1], qp.shape[2]))
    out, lse = _ATEN_FWD(qp, kp, vp, 0.0, False, attn_mask=bias, scale=scale)
    out = (out * has_key[..., None]).transpose(1, 2)  # (B, S, H, D)
    lse = lse.masked_fill(~has_key, float("-inf")).transpose(1, 2)  # (B, S, H)
    if cu_seqlens is not None:
        out, lse = padding.unpad(out, cu_seqlens, total), padding.unpad(lse, cu_seqlens, total)
    return out.contiguous(), lse.float().contiguous()


def backward(dout, q, k, v, out, lse, attention_mask, cu_seqlens, max_seqlen, scale, extra_mask=None):
    total = q.shape[0]
    qp, kp, vp, mask = _padded(q, k, v, attention_mask, cu_seqlens, max_seqlen)
    if cu_seqlens is not None:
        out, _ = padding.pad(out, cu_seqlens, max_seqlen)
        dout, _ = padding.pad(dout, cu_seqlens, max_seqlen)
        lse, _ = padding.pad(lse, cu_seqlens, max_seqlen)
    bias, has_key = _bias(mask, extra_mask, q.dtype, (qp.shape[0], qp.shape[1], qp.shape[2]))
    # Rows without keys: zero upstream gradient, finite lse, so ATen yields zeros.
    dout = (dout.transpose(1, 2) * has_key[..., None]).contiguous()
    lse = lse.transpose(1, 2).masked_fill(~has_key, 0.0).contiguous()
    grads = _ATEN_BWD(dout, qp, kp, vp, out.transpose(1, 2), lse, 0.0, False, attn_mask=bias, scale=scale)
    grads = [g.transpose(1, 2) for g in grads]
    if cu_seqlens is not None:
        grads = [padding.unpad(g, cu_seqlens, total) for g in grads]
    return tuple(g.contiguous() for g in grads)
