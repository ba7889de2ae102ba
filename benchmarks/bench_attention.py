"""Benchmark of fastmlm.ops.attention against its reference, PyTorch SDPA and FlexAttention.

Layouts (the ``layout`` field of a shape):
  full    (B, S, H, D), every token real, no mask: SDPA's best case
  padded  (B, S, H, D) + (B, S) padding mask, lengths uniform in [S/2, S] (first row full)
  packed  (T, H, D) + cu_seqlens, the same lengths packed back to back; SDPA has no
          packed entry point, so only fastmlm and FlexAttention (document mask) run it

Providers: reference (fastmlm's fp32 oracle), fastmlm-torch / -triton / -cuda,
fastmlm-torch-sdpa (padded, GPU: the torch backend's SDPA route instead of its default
unpad -> varlen -> repad, to say which is faster), sdpa-flash / -efficient / -cudnn / -math
(one SDPA backend each, forced with ``sdpa_kernel``, given the padding mask as a boolean
``attn_mask``), torch-varlen (packed, GPU: ``torch.nn.attention.varlen.varlen_attn``
called directly, with its own autograd: the peer of fastmlm's packed path), and flex
(``torch.compile``d FlexAttention; the padded and packed layouts get a BlockMask
built once, outside the timed call).

FLOPs are the useful work, counted on real tokens only: forward = 4 * sum(len²) * H * D,
backward = 2.5 x forward (so fwd+bwd = 3.5 x forward). Gradients flow only from real
query rows (the upstream gradient is zero on padding rows), and the check compares
real rows only.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastmlm.ops import attention, attention_reference
from fastmlm.testing import check_error_ratios, cu_seqlens_of, oracle_dtype, outputs_and_grads, reference_runs

from .common import (fastmlm_backend, generator, preset_dtypes, preset_shapes, randn, random_lengths,
                     require_backend_device, require_cuda, require_module, zero_grads)
from .harness import Skip, Workload

OP = "attention"
NAMES = ("out", "dq", "dk", "dv")  # the checked tensors: the output, then one gradient per input
RATIOS = {"out": 2.0, "dq": 3.0, "dk": 3.0, "dv": 3.0}  # the error-ratio rule: outputs 2x, gradients 3x
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}
MAX_DENSE_SCORES = 1 << 31  # reference / sdpa-math materialise B*H*S*S scores: skip beyond this


def _shape(batch, seqlen, heads, head_dim, layout, pass_="fwd+bwd", flex=True):
    """One benchmark case; ``flex=False`` leaves FlexAttention out (each new shape costs a compile)."""
    return {"batch": batch, "seqlen": seqlen, "heads": heads, "head_dim": head_dim, "layout": layout, "pass": pass_,
            "flex": flex}


LAYOUTS = ("full", "padded", "packed")
SHAPES = {  # preset -> its shapes
    "smoke": [_shape(2, 24, 2, 16, layout) for layout in LAYOUTS],
    "cpu": [_shape(4096 // s, s, 12, 64, layout) for s in (128, 512, 2048) for layout in LAYOUTS],  # 4096 tokens
    # issue 3's headline: 16k tokens at seq 512, 12 and 32 heads; one long shape
    "gpu-check": [_shape(16384 // s, s, h, 64, layout, flex=(s, h) == (512, 12))
                  for s, h in ((512, 12), (512, 32), (2048, 12)) for layout in LAYOUTS],
    "gpu": [_shape(16384 // s, s, h, 64, layout, p) for s in (128, 512, 2048, 8192) for h in (12, 32)  # issue 3's table
            for layout in LAYOUTS for p in ("fwd", "fwd+bwd")],
}
shapes, dtypes = preset_shapes(SHAPES), preset_dtypes


def label(shape: dict) -> str:
    return (f"{shape['layout']} b={shape['batch']} s={shape['seqlen']} h={shape['heads']} d={shape['head_dim']} "
            f"{shape['pass']}")


def providers(shape: dict, device: str) -> list[str]:
    names = ["reference", "fastmlm-torch", "fastmlm-triton", "fastmlm-cuda"]
    if shape["layout"] == "padded" and device != "cpu":
        names.append("fastmlm-torch-sdpa")
    if shape["layout"] != "packed":
        names += ["sdpa-flash", "sdpa-math"] if device == "cpu" else list(SDPA_BACKENDS)
    else:
        names.append("torch-varlen")
    return names + (["flex"] if shape.get("flex", True) else [])


# --------------------------------------------------------------------------- providers
def _sdpa(name: str, mask: torch.Tensor | None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[name], None)
    if backend is None:
        raise Skip(f"this torch has no SDPBackend.{SDPA_BACKENDS[name]}")
    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, S), True = attend

    def run(q, k, v):
        try:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     attn_mask=attn_mask)
        except RuntimeError as exc:
            if "No available kernel" in str(exc):
                raise Skip(f"{name} cannot run these inputs on this device") from None
            raise
        return out.transpose(1, 2)

    return run


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    flex = require_module("torch.nn.attention.flex_attention", "FlexAttention")
    # Every benchmark shape is a new static graph: allow more of them than dynamo's default of 8.
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    return torch.compile(flex.flex_attention, dynamic=False), flex.create_block_mask


def _flex(layout: str, lengths: torch.Tensor, cu: torch.Tensor | None, device: str, heads: int):
    flex_attention, create_block_mask = _compiled_flex()
    if layout == "full":
        block_mask = None
    elif layout == "padded":
        lens = lengths.to(device)
        batch, seqlen = lengths.numel(), int(lengths.max())
        block_mask = create_block_mask(lambda b, h, qi, ki: ki < lens[b], batch, None, seqlen, seqlen, device=device)
    else:  # packed: one long sequence with a document mask
        doc = torch.repeat_interleave(torch.arange(lengths.numel()), lengths).to(device)
        total = int(lengths.sum())
        block_mask = create_block_mask(lambda b, h, qi, ki: doc[qi] == doc[ki], 1, None, total, total, device=device)

    def run(q, k, v):
        if layout == "packed":  # (T, H, D) -> (1, H, T, D)
            out = flex_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask)
            return out[0].transpose(0, 1)
        out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
        return out.transpose(1, 2)

    return run


def _varlen(cu: torch.Tensor, max_seqlen: int):
    """varlen_attn itself on the packed batch (its autograd gives the backward)."""
    varlen = require_module("torch.nn.attention.varlen", "torch.nn.attention.varlen (torch >= 2.10)")
    return lambda q, k, v: varlen.varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen)


def _fastmlm_sdpa(mask):
    from fastmlm.ops.torch_impl.attention_cuda import prefer

    def run(q, k, v):
        with prefer("sdpa"):
            return attention(q, k, v, attention_mask=mask, backend="torch")

    return run


def _fastmlm(backend: str, layout: str, mask, cu, max_seqlen):
    if layout == "packed":
        return lambda q, k, v: attention(q, k, v, cu_seqlens=cu, max_seqlen=max_seqlen, backend=backend)
    return lambda q, k, v: attention(q, k, v, attention_mask=mask, backend=backend)


# --------------------------------------------------------------------------- workload
def make(provider: str, shape: dict, dtype: torch.dtype, device: str) -> Workload:
    b, s, h, d, layout = (shape[k] for k in ("batch", "seqlen", "heads", "head_dim", "layout"))
    gen = generator(0)
    lengths = torch.full((b,), s) if layout == "full" else random_lengths(b, s, gen, low_fraction=0.5)
    real = (torch.arange(s)[None, :] < lengths[:, None]).to(device)  # (B, S) True = real token
    q, k, v, dout = (randn((b, s, h, d), dtype, device, gen) for _ in range(4))
    dout = dout * real[:, :, None, None]  # no gradient from padding rows
    cu = cu_seqlens_of(lengths, device) if layout == "packed" else None
    mask = real if layout == "padded" else None
    if layout == "packed":
        q, k, v, dout = (t[real] for t in (q, k, v, dout))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))

    backend = fastmlm_backend(provider)
    if provider == "reference":
        if b * h * s * s > MAX_DENSE_SCORES and layout != "packed":
            raise Skip(f"the reference materialises {b * h * s * s / 2**30:.0f} Gi scores; too large to time")
        fn = _fastmlm("reference", layout, mask, cu, s)
    elif backend is not None:
        require_backend_device(backend, device)
        fn = _fastmlm(backend, layout, mask, cu, s)
    elif provider == "fastmlm-torch-sdpa":
        require_cuda(provider, device, "the torch backend's GPU route through memory-efficient SDPA")
        fn = _fastmlm_sdpa(mask)
    elif provider == "torch-varlen":
        require_cuda(provider, device, "varlen_attn wraps FlashAttention's CUDA kernels")
        fn = _varlen(cu, s)
    elif provider in SDPA_BACKENDS:
        if provider == "sdpa-math" and b * h * s * s > MAX_DENSE_SCORES:
            raise Skip(f"sdpa-math materialises {b * h * s * s / 2**30:.0f} Gi scores; too large to time")
        fn = _sdpa(provider, mask)
    elif provider == "flex":
        if device == "cpu" and shape["pass"] != "fwd":
            raise Skip("FlexAttention has no backward on the CPU")
        fn = _flex(layout, lengths, cu, device, h)
    else:
        raise ValueError(f"unknown attention provider {provider!r}")

    def step():
        if shape["pass"] == "fwd":
            with torch.no_grad():
                fn(q, k, v)
            return
        fn(q, k, v).backward(dout)
        zero_grads(q, k, v)  # after, not before: the peak-memory baseline then holds no gradients

    fwd_flops = 4.0 * float((lengths.double() ** 2).sum()) * h * d
    flops = fwd_flops if shape["pass"] == "fwd" else 3.5 * fwd_flops
    return Workload(step=step, check=lambda: _check(fn, q, k, v, dout, real, lengths, layout, cu, device),
                    flops=flops)


def _check(fn, q, k, v, dout, real, lengths, layout, cu, device) -> str:
    """Provider vs reference on a slice small enough for the dense oracle (sequences and heads are independent)."""
    fast = outputs_and_grads(fn, (q, k, v), dout, names=NAMES)

    s, h = real.shape[1], q.shape[-2]
    n_seq = max(1, min(lengths.numel(), (1 << 22) // (s * s)))
    n_head = max(1, min(h, (1 << 24) // (n_seq * s * s)))
    if layout == "packed":  # the first n_seq sequences, n_head heads: (tokens, heads, D)
        sub = lambda t: t[: int(cu[n_seq]), :n_head]
        real_rows = lambda t: t
        sub_mask, sub_cu = None, cu[: n_seq + 1]
    else:
        rows = real[:n_seq]
        sub = lambda t: t[:n_seq, :, :n_head]
        real_rows = lambda t: t[rows]  # real tokens only: (tokens, heads, D)
        sub_mask, sub_cu = (real[:n_seq] if layout == "padded" else None), None
    fast = {name: real_rows(sub(t)) for name, t in fast.items()}

    def reference(q, k, v, upcast):
        return attention_reference(q, k, v, attention_mask=sub_mask, cu_seqlens=sub_cu, upcast=upcast)[0]

    exact, lowp = ({name: real_rows(t) for name, t in run.items()}
                   for run in reference_runs(reference, [sub(t) for t in (q, k, v)], sub(dout), low_dtype=q.dtype,
                                             exact_dtype=oracle_dtype(device), names=NAMES))
    return check_error_ratios(fast, exact, lowp, RATIOS)
