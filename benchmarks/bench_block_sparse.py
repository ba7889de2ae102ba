"""Benchmark of fastmlm.ops.block_sparse_attention: time against the kept fraction of tiles.

Layouts are BigBird-style random blocks (``block_layout.random_blocks``), the same
for every head, with ``round(density * nb)`` key blocks per query block, so the
kept fraction is exact up to rounding (the label shows the real one); a shape with a
``window`` is a pure sliding window (``block_layout.sliding_window``, |i - j| <= window)
instead, where varlen_attn's own sliding window is a peer.

Providers:
  reference               the dense fp32 oracle under the layout's token mask
  fastmlm-torch / -triton / -cuda   block_sparse_attention
  dense-torch / -triton / -cuda     fastmlm's *dense* attention on the same q, k, v:
                          the baseline a sparse kernel must beat ("ideal" = dense x density)
  flex                    compiled FlexAttention with a BlockMask of the same tiles
                          (block size 128, FlexAttention's own tile size)
  torch-varlen-window     window shapes, GPU: ``varlen_attn(..., window_size=(w, w))`` on the
                          batch as one packed sequence per row (its own autograd)

FLOPs count the kept tiles only: forward = 4 * B * H * D * (kept tiles * block²),
fwd+bwd = 3.5 x forward; the dense baselines are charged the same useful work.
"""
from __future__ import annotations

import torch

from fastmlm.ops import attention, attention_reference, block_sparse_attention, block_sparse_attention_reference
from fastmlm.ops.block_layout import random_blocks, sliding_window
from fastmlm.testing import check_error_ratios, oracle_dtype, outputs_and_grads, reference_runs

from . import bench_attention
from .bench_attention import NAMES, RATIOS
from .common import (fastmlm_backend, generator, preset_dtypes, preset_shapes, randn, require_backend_device,
                     require_cuda, require_module, zero_grads)
from .harness import Skip, Workload

OP = "block_sparse_attention"
MAX_DENSE_SCORES = 1 << 31
MAX_CPU_DENSE_SCORES = 1 << 26  # the CPU reference at s=8192 (fp32 scores, probabilities and their grads) takes minutes


def _shape(seqlen, heads, density, batch=1, head_dim=64, block=128, window=None):
    shape = {"batch": batch, "seqlen": seqlen, "heads": heads, "head_dim": head_dim, "density": density,
             "block": block, "pass": "fwd+bwd"}
    if window is not None:  # a pure sliding window; density is then what the window keeps
        shape["window"] = window
    return shape


SHAPES = {  # preset -> its shapes
    "smoke": [_shape(64, 2, d, head_dim=16, block=16) for d in (0.5, 1.0)] + [
        _shape(64, 2, None, head_dim=16, block=16, window=8)],
    # issue 16: 12.5% against 100% density (and dense-torch, the same shape's dense attention) at s=2048 and 8192
    "cpu": [_shape(2048, 4, d) for d in (0.125, 0.25, 0.5, 1.0)] + [_shape(8192, 4, d) for d in (0.125, 1.0)],
    "gpu-check": [_shape(8192, 12, d) for d in (0.1, 0.5, 1.0)] + [_shape(8192, 12, None, window=512)],
    "gpu": [_shape(s, 12, d) for s in (8192, 16384) for d in (0.1, 0.25, 0.5, 0.75, 1.0)]  # issue 9
           + [_shape(s, 12, None, window=w) for s in (8192, 16384) for w in (256, 1024)],
}
shapes, dtypes = preset_shapes(SHAPES), preset_dtypes


def layout_of(shape: dict):
    if shape.get("window") is not None:
        return sliding_window(shape["seqlen"], shape["window"], shape["block"])
    nb = -(-shape["seqlen"] // shape["block"])
    per_row = max(1, round(shape["density"] * nb))
    return random_blocks(shape["seqlen"], per_row, shape["block"], num_heads=1, seed=0)


def label(shape: dict) -> str:
    kind = f"window={shape['window']} " if shape.get("window") is not None else ""
    return (f"b={shape['batch']} s={shape['seqlen']} h={shape['heads']} d={shape['head_dim']} "
            f"block={shape['block']} {kind}density={layout_of(shape).density:.3f}")


def providers(shape: dict, device: str) -> list[str]:
    names = (["reference"] + [f"fastmlm-{b}" for b in ("torch", "triton", "cuda")]
             + [f"dense-{b}" for b in ("torch", "triton", "cuda")] + ["flex"])
    return names + (["torch-varlen-window"] if shape.get("window") is not None else [])


def _varlen_window(shape: dict, device: str):
    """varlen_attn with window_size=(w, w): the batch's rows as packed sequences of seqlen tokens."""
    varlen = require_module("torch.nn.attention.varlen", "torch.nn.attention.varlen (torch >= 2.10)")
    b, s, w = shape["batch"], shape["seqlen"], shape["window"]
    cu = torch.arange(0, b * s + 1, s, dtype=torch.int32, device=device)

    def run(q, k, v):
        flat = [t.reshape(b * s, *t.shape[2:]) for t in (q, k, v)]
        return varlen.varlen_attn(*flat, cu, cu, s, s, window_size=(w, w)).reshape(q.shape)

    return run


def _flex(layout, shape, device):
    flex_attention, create_block_mask = bench_attention._compiled_flex()
    blocks = layout.blocks.to(device)
    bs, s = layout.block_size, shape["seqlen"]
    block_mask = create_block_mask(lambda b, h, qi, ki: blocks[0, qi // bs, ki // bs] != 0, 1, None, s, s,
                                   device=device, BLOCK_SIZE=bs)
    return lambda q, k, v: flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          block_mask=block_mask).transpose(1, 2)


def make(provider: str, shape: dict, dtype: torch.dtype, device: str) -> Workload:
    b, s, h, d = (shape[k] for k in ("batch", "seqlen", "heads", "head_dim"))
    layout = layout_of(shape)
    gen = generator(0)
    q, k, v, dout = (randn((b, s, h, d), dtype, device, gen) for _ in range(4))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))

    if provider.startswith("dense-"):
        backend = provider[len("dense-"):]
        require_backend_device(backend, device)
        fn = lambda q, k, v: attention(q, k, v, backend=backend)
    elif provider == "reference":
        limit = MAX_CPU_DENSE_SCORES if device == "cpu" else MAX_DENSE_SCORES
        if b * h * s * s > limit:
            raise Skip(f"the reference materialises {b * h * s * s / 2**20:.0f} Mi scores, more than the {limit / 2**20:.0f} Mi "
                       f"timed on {device}")
        fn = lambda q, k, v: block_sparse_attention(q, k, v, layout, backend="reference")
    elif fastmlm_backend(provider) is not None:
        backend = fastmlm_backend(provider)
        require_backend_device(backend, device)
        fn = lambda q, k, v: block_sparse_attention(q, k, v, layout, backend=backend)
    elif provider == "flex":
        if device == "cpu":
            raise Skip("FlexAttention has no backward on the CPU")
        fn = _flex(layout, shape, device)
    elif provider == "torch-varlen-window":
        require_cuda(provider, device, "varlen_attn wraps FlashAttention's CUDA kernels")
        fn = _varlen_window(shape, device)
    else:
        raise ValueError(f"unknown block_sparse_attention provider {provider!r}")

    def step():
        fn(q, k, v).backward(dout)
        zero_grads(q, k, v)  # after, not before: the peak-memory baseline then holds no gradients

    kept_pairs = float((layout.blocks != 0).sum()) * layout.block_size ** 2
    flops = 3.5 * 4.0 * b * h * d * min(kept_pairs, float(s * s))
    dense = provider.startswith("dense-")
    return Workload(step=step, check=lambda: _check(fn, q, k, v, dout, layout, dense, device), flops=flops)


def _check(fn, q, k, v, dout, layout, dense: bool, device) -> str:
    """Against the reference of what the provider computes (dense attention for the dense-* baselines),
    on the first sequence and as many heads as a dense oracle affords."""
    fast = outputs_and_grads(fn, (q, k, v), dout, names=NAMES)
    s = q.shape[1]
    n_head = max(1, min(q.shape[2], (1 << 24) // (s * s)))
    pick = lambda t: t[:1, :, :n_head]
    fast = {name: pick(t) for name, t in fast.items()}

    def reference(q, k, v, upcast):
        if dense:
            return attention_reference(q, k, v, upcast=upcast)[0]
        return block_sparse_attention_reference(q, k, v, layout, upcast=upcast)[0]

    exact, lowp = reference_runs(reference, [pick(t) for t in (q, k, v)], pick(dout), low_dtype=q.dtype,
                                 exact_dtype=oracle_dtype(device), names=NAMES)
    return check_error_ratios(fast, exact, lowp, RATIOS)
