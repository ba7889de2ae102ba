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

from . import kernel_ops, ready, unavailable

DTYPES = (torch.float16, torch.bfloat16)
MAX_GRID_YZ = 65535  # heads and sequences index the grid's y and z


def why_not(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, **_) -> Optional[str]:
    where = unavailable(q)
    if where:
        return where
    if q.dtype not in DTYPES:
        return f"the tensor-core kernels take float16/bfloat16, not {q.dtype} (use the triton or torch backend)"
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > 128:
        return f"head_dim must be a multiple of 8 and at most 128, got {head_dim}"
    batch = q.shape[0] if q.dim() == 4 else cu_seqlens.numel() - 1
    if q.shape[-2] > MAX_GRID_YZ or batch > MAX_GRID_YZ:
        return f"at most {MAX_GRID_YZ} heads and sequences per call, got {q.shape[-2]} and {batch}"
    return None


def _layout(attention_mask, cu_seqlens):
    """(key_mask, key_len, cu_seqlens) as the kernels take them.

    key_len[b] = last real key + 1 (0 for an all-padding sequence), computed on the device,
    so the kernels skip the key tiles of right padding without a host sync.
    """
    if attention_mask is None:
        return None, None, None if cu_seqlens is None else cu_seqlens.contiguous()
    key_mask = ready(attention_mask.bool())
    position = torch.arange(1, key_mask.shape[1] + 1, device=key_mask.device, dtype=torch.int32)
    key_len = torch.where(key_mask, position, 0).amax(dim=1).to(torch.int32).contiguous()
    return key_mask, key_len, None


def forward(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale):
    q, k, v = ready(q), ready(k), ready(v)
    key_mask, key_len, cu_seqlens = _layout(attention_mask, cu_seqlens)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    kernel_ops().attention_fwd(q, k, v, key_mask, key_len, cu_seqlens, max_seqlen, scale, out, lse)
    return out, lse


def backward(dout, q, k, v, out, lse, attention_mask, cu_seqlens, max_seqlen, scale):
    dout, q, k, v, out, lse = (ready(t) for t in (dout, q, k, v, out, lse))
    key_mask, key_len, cu_seqlens = _layout(attention_mask, cu_seqlens)
    delta = torch.empty_like(lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kernel_ops().attention_bwd(dout, q, k, v, out, lse, key_mask, key_len, cu_seqlens, max_seqlen, scale, delta, dq,
                               dk, dv)
    return dq, dk, dv
