"""Bidirectional (non-causal) softmax attention: contract, reference, dispatcher.

Two layouts, one semantics (every query attends to every real key of its own
sequence, with no causal mask):

  padded  q, k, v: (B, S, H, D)   attention_mask: (B, S), True/1 = real token
  packed  q, k, v: (T, H, D)      cu_seqlens: (B+1,) int32, max_seqlen: int

      keys ->   k0 k1 k2 k3 [pad]
    q0          x  x  x  x   .        x: scored, softmax-normalised
    q1          x  x  x  x   .        .: never contributes
    q2          x  x  x  x   .
    q3          x  x  x  x   .
    [pad row]   x  x  x  x   .        (padded query rows are computed but meaningless)

Returns ``out`` shaped like ``q`` in q's dtype and, with ``return_lse``, the fp32
(fp64 for fp64 inputs) log-sum-exp of each query row's scaled scores, shaped
``q.shape[:-1]``. Outputs and gradients are contiguous, whatever the input strides.
A row with no real key (an all-padding sequence, a zero-length packed
sequence) outputs zeros with lse = -inf, and gets zero gradients.

Padding never contributes to a real row, in outputs or gradients, whatever it
holds: a NaN stored at a padded key or value (or, packed, in another sequence)
stays there. A NaN or inf that a row does see makes that row NaN (non-finite).

Backends: ``reference`` (below, fp32/fp64 math, plain autograd), ``torch``
(CPU flash attention through ATen; on CUDA varlen_attn / memory-efficient SDPA,
torch_impl/attention_cuda.py), ``triton`` (kernels/attention.py),
``cuda`` (csrc/). The non-reference ones run as the ``fastmlm::attention_fwd``
/ ``fastmlm::attention_bwd`` custom ops, so torch.compile traces through them; below
those ops every backend receives one :class:`AttentionInputs` bundle.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import checks, dispatch
from .dispatch import Registry, score_elements

REGISTRY = Registry(
    "attention",
    {
        "torch": "fastmlm.ops.torch_impl.attention",
        "triton": "fastmlm_kernels.attention",
        "cuda": "fastmlm.ops.cuda_impl.attention",
    },
    work=score_elements,  # what the reference materialises: auto refuses it beyond a small size on CUDA
    oracle="fastmlm.ops.torch_impl.oracle:attention",
)


# --------------------------------------------------------------------------- the backends' bundle
class AttentionInputs(NamedTuple):
    """The inputs of one attention call, as every backend's ``why_not`` / ``forward`` / ``backward`` receives them.

    Built inside the custom ops (whose schemas stay flat) after validation.

    Arguments:
        q, k, v: (batch_size, seqlen, nheads, headdim) padded or (total_tokens, nheads, headdim)
            packed; one float dtype, any strides.
        attention_mask: (batch_size, seqlen) bool, True = real key; padded layout only, or None.
        cu_seqlens: (batch_size + 1,) int32, the first token of each sequence and total_tokens
            last; packed layout only, or None.
        max_seqlen: seqlen (padded) or the longest sequence (packed), a Python int.
        scale: the softmax scale applied to q·k (a positive float; 1/sqrt(headdim) by default).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    attention_mask: Optional[Tensor]
    cu_seqlens: Optional[Tensor]
    max_seqlen: int
    scale: float

    @property
    def batch(self) -> int:
        """Number of sequences: B when padded, len(cu_seqlens) - 1 when packed."""
        return self.q.shape[0] if self.cu_seqlens is None else self.cu_seqlens.numel() - 1

    def key_lengths(self) -> Optional[Tensor]:
        """(batch_size,) int32: the last real key of each sequence + 1 (0 for an all-padding one).

        Computed on the device (no host sync); None without an attention_mask. Key tiles at or
        past it hold only padding, so the kernels skip them.
        """
        if self.attention_mask is None:
            return None
        mask = self.attention_mask.bool()
        position = torch.arange(1, mask.shape[1] + 1, device=mask.device, dtype=torch.int32)
        return torch.where(mask, position, 0).amax(dim=1).to(torch.int32)


# --------------------------------------------------------------------------- reference
def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attention_mask: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    token_mask: Optional[Tensor] = None,
    upcast: bool = True,
) -> tuple[Tensor, Tensor]:
    """Obviously-correct attention; returns (out, lse).

    Computes in fp32 (fp64 for fp64 inputs); ``upcast=False`` keeps the input
    dtype throughout, the low-precision baseline of the error-ratio tests.
    ``token_mask`` ((H or 1, S, S) bool, True = may attend) restricts which
    keys each query sees; block-sparse attention is defined through it.
    The packed layout loops over sequences on the host: this is an oracle.
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    acc = checks.accum_dtype(q.dtype)  # the dtype of lse
    if cu_seqlens is not None:
        # Slicing each sequence out keeps the other sequences' tokens out of its products.
        outs, lses = [q.new_zeros((0,) + q.shape[1:])], [q.new_zeros((0, q.shape[1]), dtype=acc)]
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            o, l = attention_reference(q[None, start:end], k[None, start:end], v[None, start:end],
                                       None, None, scale, token_mask, upcast)
            outs.append(o[0])
            lses.append(l[0])
        return torch.cat(outs), torch.cat(lses)

    compute = acc if upcast else q.dtype
    qc, kc, vc = (t.to(compute) for t in (q, k, v))
    seqlen = q.shape[1]
    keep = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device)[None, None]  # (B, H, S, S) broadcast
    if attention_mask is not None:
        real = attention_mask.bool()
        keep = keep & real[:, None, None, :]
        # Masking the scores is not enough: 0 * NaN is NaN, so a NaN stored under a padded
        # key or value would still reach every real row. Zero them before the products.
        kc, vc = (torch.where(real[:, :, None, None], t, 0) for t in (kc, vc))
    if token_mask is not None:
        keep = keep & token_mask[None, :, :seqlen, :seqlen]  # one layout serves shorter batches
    scores = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * scale  # (B, H, S, S)
    scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores.to(acc), dim=-1)  # (B, H, S)
    has_key = keep.any(dim=-1)
    probs = torch.where(has_key[..., None], torch.softmax(scores, dim=-1), 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vc)
    lse = lse.masked_fill(~has_key, float("-inf")).transpose(1, 2)  # (B, S, H)
    return out.to(q.dtype), lse


# --------------------------------------------------------------------------- validation
def validate(op, q, k, v, attention_mask, cu_seqlens, max_seqlen) -> int:
    """Check the attention inputs of either layout; return max_seqlen (S when padded)."""
    max_seqlen = validate_metadata(op, q, k, v, attention_mask, cu_seqlens, max_seqlen)
    if cu_seqlens is not None:
        checks.check_cu_seqlens(op, cu_seqlens, q.shape[0], max_seqlen)
    return max_seqlen


def validate_metadata(op, q, k, v, attention_mask, cu_seqlens, max_seqlen) -> int:
    """The checks of :func:`validate` that read only types, shapes, dtypes and devices (the
    public op memoises them per signature); return max_seqlen (S when padded)."""
    checks.check_tensor(op, "q", q, ndim=(3, 4), dtypes=checks.FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        checks.check_tensor(op, name, t, dtypes=(q.dtype,), device=q.device)
        if t.shape != q.shape:
            checks.fail(op, f"{name} has shape {tuple(t.shape)} but q has {tuple(q.shape)} (self-attention: q, k, v share one shape)")
    if q.shape[-1] == 0 or q.shape[-2] == 0:
        checks.fail(op, f"heads and head_dim must be positive, got q shape {tuple(q.shape)}")
    if q.dim() == 4:
        if cu_seqlens is not None:
            checks.fail(op, "cu_seqlens is for the packed (T, H, D) layout, but q is padded (B, S, H, D)")
        if attention_mask is not None:
            checks.check_tensor(op, "attention_mask", attention_mask, ndim=2, device=q.device)
            if attention_mask.dtype.is_floating_point:
                checks.fail(op, "attention_mask must be bool or integer (True/1 = real token), not a float additive bias")
            if tuple(attention_mask.shape) != tuple(q.shape[:2]):
                checks.fail(op, f"attention_mask shape {tuple(attention_mask.shape)} must be (batch, seqlen) = {tuple(q.shape[:2])}")
        if max_seqlen is not None and max_seqlen != q.shape[1]:  # it would be ignored: S is every row's length
            checks.fail(op, f"max_seqlen is for the packed (T, H, D) layout; padded q has seqlen {q.shape[1]}, "
                            f"got max_seqlen={max_seqlen!r} (leave it out, or give it as {q.shape[1]})")
        return q.shape[1]
    if attention_mask is not None:
        checks.fail(op, "attention_mask is for the padded (B, S, H, D) layout; packed inputs use cu_seqlens")
    if cu_seqlens is None or max_seqlen is None:
        checks.fail(op, "packed (T, H, D) inputs need cu_seqlens and max_seqlen")
    checks.check_tensor(op, "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device)
    if cu_seqlens.numel() < 1:
        checks.fail(op, "cu_seqlens needs at least one entry (0)")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        checks.fail(op, f"max_seqlen must be a non-negative Python int, got {max_seqlen!r}")
    return max_seqlen


def validated_inputs(op, q, k, v, attention_mask, cu_seqlens, max_seqlen, softmax_scale, backend) -> AttentionInputs:
    """Check the inputs and options of an attention op; return them as the backends' bundle
    (max_seqlen filled in, the scale resolved, the mask as bool)."""
    max_seqlen = validate(op, q, k, v, attention_mask, cu_seqlens, max_seqlen)
    scale = validate_options(op, backend, softmax_scale, q.shape[-1])
    mask = None if attention_mask is None else attention_mask.bool()
    return AttentionInputs(q, k, v, mask, cu_seqlens, max_seqlen, scale)


def validate_options(op: str, backend: str, softmax_scale, head_dim: int) -> float:
    """Check backend/scale options; return the softmax scale."""
    if not isinstance(backend, str):
        checks.fail(op, f"backend must be a string, got {type(backend).__name__}")
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
            or not math.isfinite(softmax_scale) or softmax_scale <= 0:  # True would be taken as 1.0
        checks.fail(op, f"softmax_scale must be a positive finite float, got {softmax_scale!r}")
    return float(softmax_scale)


# --------------------------------------------------------------------------- custom ops
# Flat schemas, as torch.library needs; the bundle is built here, below them.
@torch.library.custom_op("fastmlm::attention_fwd", mutates_args=())
def _attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor], cu_seqlens: Optional[Tensor],
    max_seqlen: int, scale: float, backend: str,
) -> tuple[Tensor, Tensor]:
    inputs = AttentionInputs(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale)
    return REGISTRY.module(backend).forward(inputs)


@_attention_fwd.register_fake
def _(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, backend):
    # Every backend returns contiguous tensors, whatever the strides of its inputs.
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=checks.accum_dtype(q.dtype))


@torch.library.custom_op("fastmlm::attention_bwd", mutates_args=())
def _attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    attention_mask: Optional[Tensor], cu_seqlens: Optional[Tensor], max_seqlen: int, scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    inputs = AttentionInputs(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale)
    return REGISTRY.module(backend).backward(inputs, out, lse, dout)


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, attention_mask, cu_seqlens, max_seqlen, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, attention_mask, cu_seqlens)
    ctx.max_seqlen, ctx.scale, ctx.backend = max_seqlen, scale, backend


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, attention_mask, cu_seqlens = ctx.saved_tensors
    dout = dout.contiguous()
    if dispatch.plain_eager(dout, q, k, v, out, lse, attention_mask, cu_seqlens) and not torch.is_grad_enabled():
        inputs = AttentionInputs(q, k, v, attention_mask, cu_seqlens, ctx.max_seqlen, ctx.scale)
        dq, dk, dv = REGISTRY.module(ctx.backend).backward(inputs, out, lse, dout)
    else:  # traced, under a mode, or create_graph=True: the custom op (not differentiable again)
        dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, attention_mask, cu_seqlens,
                                    ctx.max_seqlen, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """``fastmlm::attention_fwd`` with its autograd rule (the same setup_context and backward)
    but without the custom op's dispatcher round trips, for the plain eager path.

    The classic ``forward(ctx, ...)`` form on purpose: with a separate ``setup_context``,
    ``Function.apply`` binds the arguments through ``inspect.signature`` on every call (~30 µs)."""

    @staticmethod
    def forward(ctx, q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, backend):
        inputs = AttentionInputs(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale)
        output = REGISTRY.module(backend).forward(inputs)
        _setup_context(ctx, (*inputs, backend), output)
        return output

    backward = staticmethod(_backward)


class _Plan(NamedTuple):
    """What the public op derives from a call's metadata alone, memoised per signature.

    max_seqlen, scale: as in :class:`AttentionInputs`.
    name: the backend :meth:`Registry.select` returns ("reference", "torch", "auto:torch", ...).
    module: that backend's module (or fallback chain); None for the reference.
    native: autograd may record the backend's forward itself (:meth:`~dispatch.Registry.differentiable`).
    plain: every tensor argument is a plain tensor (:func:`dispatch.plain_types`).
    native_offsets: :func:`checks.native_reads` of cu_seqlens (False when padded).
    """

    max_seqlen: int
    scale: float
    name: str
    module: object
    native: bool
    plain: bool
    native_offsets: bool


def _run_forward(inputs: AttentionInputs, plan: _Plan, want_lse: bool) -> tuple[Tensor, Optional[Tensor]]:
    """(out, lse) from the backend of ``plan``: through the custom op when traced or under a mode,
    else the same call unwrapped, with the op's autograd rule or, when ``plan.native``, PyTorch's own
    (and there lse is None unless ``want_lse``: the backend may skip laying it out)."""
    q, k, v = inputs.q, inputs.k, inputs.v
    if not (plan.plain and dispatch.no_modes()):
        return _attention_fwd(*inputs, plan.name)
    if not plan.native and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _EagerAttention.apply(*inputs, plan.name)
    # No gradient wanted, or a backend built of differentiable PyTorch ops (ATen's CPU flash
    # attention has its own derivative): autograd records it natively, with no Python node to
    # call back in the backward pass (tens of µs a call, issue 22).
    return plan.module.forward(inputs) if want_lse else (dispatch.forward_out(plan.module, inputs), None)


def _plan(q, k, v, attention_mask, cu_seqlens, max_seqlen, softmax_scale, backend) -> _Plan:
    """The :class:`_Plan` of a call (validating its metadata on the way)."""
    max_seqlen = validate_metadata("attention", q, k, v, attention_mask, cu_seqlens, max_seqlen)
    scale = validate_options("attention", backend, softmax_scale, q.shape[-1])
    mask = None if attention_mask is None else attention_mask.bool()
    bundle = AttentionInputs(q, k, v, mask, cu_seqlens, max_seqlen, scale)
    name = REGISTRY.select(backend, q.device.type, bundle)
    native_offsets = cu_seqlens is not None and checks.native_reads(cu_seqlens, (torch.int32,))
    if name == "reference":
        return _Plan(max_seqlen, scale, name, None, False, False, native_offsets)
    return _Plan(max_seqlen, scale, name, REGISTRY.module(name), REGISTRY.differentiable(name, bundle),
                 dispatch.plain_types(q, k, v, attention_mask, cu_seqlens), native_offsets)


# --------------------------------------------------------------------------- public op
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attention_mask: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Bidirectional attention over a padded or packed batch (see the module docstring).

    Arguments:
        q, k, v: (batch_size, seqlen, nheads, headdim) padded, or (total_tokens, nheads, headdim)
            packed; fp16, bf16, fp32 or fp64, one dtype, any strides.
        attention_mask: (batch_size, seqlen) bool or integer, True/1 = real token; padded only.
            None: every token is real.
        cu_seqlens: (batch_size + 1,) int32, cumulative sequence lengths starting at 0; packed only.
        max_seqlen: the longest sequence, a Python int; packed only (and then required).
        softmax_scale: the scaling of q·k before the softmax; default 1/sqrt(headdim).
        return_lse: also return the log-sum-exp of each query row.
        backend: "auto" | "reference" | "torch" | "triton" | "cuda".
    Returns:
        out: shaped like q, in q's dtype, contiguous. A row with no real key is zeros.
        lse [with return_lse]: q.shape[:-1], i.e. (batch_size, seqlen, nheads) or
            (total_tokens, nheads), fp32 (fp64 for fp64 inputs): the logsumexp of each row of
            q·kᵀ·scale over its real keys, -inf for a row with no real key.
    """
    key = dispatch.call_key(q, k, v, attention_mask, cu_seqlens, max_seqlen, softmax_scale, backend)
    plan = REGISTRY.memo(key, lambda: _plan(q, k, v, attention_mask, cu_seqlens, max_seqlen, softmax_scale, backend))
    if cu_seqlens is not None:  # a value check: every call
        checks.check_cu_seqlens("attention", cu_seqlens, q.shape[0], plan.max_seqlen, plan.native_offsets)
    if plan.module is None or q.numel() == 0:  # the reference; or nothing to launch for an empty batch
        out, lse = attention_reference(q, k, v, attention_mask, cu_seqlens, plan.scale)
    else:
        if attention_mask is not None and attention_mask.dtype != torch.bool:  # (a bool one is kept as is)
            attention_mask = attention_mask.bool()
        out, lse = _run_forward(AttentionInputs(q, k, v, attention_mask, cu_seqlens, plan.max_seqlen, plan.scale),
                                plan, return_lse)
    return (out, lse) if return_lse else out
