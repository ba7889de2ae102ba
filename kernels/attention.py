"""``triton`` backend of :func:`fastmlm.ops.attention`: fused FlashAttention-style kernels.

The kernels live in ``_flash.py`` (shared with block-sparse attention); dense
attention is the schedule that visits every key block up to each sequence's last
real key. Padded (B, S, H, D) batches take an arbitrary (B, S) key mask (applied
per element; key blocks past the last real key are skipped); packed (T, H, D)
batches take cu_seqlens. Backward is deterministic (no atomics).

Supports fp16, bf16 and fp32 (IEEE dot products), head_dim a multiple of 8 up to
128 (32, 64, 128 are the tuned ones), any sequence length, CUDA tensors, and CPU
tensors under ``TRITON_INTERPRET=1`` except bf16 (the interpreter's bf16 dot is wrong).
"""
from __future__ import annotations

from typing import Optional

import torch

from fastmlm.ops.dispatch import triton_interpret

from . import _flash

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128
MAX_BATCH = 65535  # the launch grid's third axis


def why_not(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, **_) -> Optional[str]:
    """None when the kernels can run these inputs, else a short reason."""
    if q.device.type == "cpu":
        if not triton_interpret():
            return "CPU tensors run only under the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)"
        if q.dtype == torch.bfloat16:
            return "bf16 is not supported under the Triton interpreter (its bf16 dot products are wrong); use a GPU"
    elif q.device.type != "cuda":
        return f"needs CUDA tensors, got {q.device.type}"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (fp16, bf16, fp32)"
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} is not supported: use a multiple of 8 up to {MAX_HEAD_DIM} (e.g. 32, 64, 128)"
    batch = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    if batch > MAX_BATCH:
        return f"batch {batch} exceeds {MAX_BATCH} sequences per launch"
    return None


def forward(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale):
    return _flash.forward(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, _flash.Schedule())


def backward(dout, q, k, v, out, lse, attention_mask, cu_seqlens, max_seqlen, scale):
    return _flash.backward(dout, q, k, v, out, lse, attention_mask, cu_seqlens, max_seqlen, scale, _flash.Schedule())
