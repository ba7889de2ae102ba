"""``torch`` backend of attention: ATen's CPU flash-attention kernels, and PyTorch's GPU kernels.

CUDA tensors go to attention_cuda.py (varlen_attn / memory-efficient SDPA); this file is the
CPU path, described below.


Uses ``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward,
which return and consume the log-sum-exp, so forward and backward are the
same fused kernels SDPA runs on the CPU. A padded batch first takes a short route
(:func:`_padded_forward`): views, one ATen call with a -inf key bias, views, and one
host read that finds anything non-finite; a sequence with no real key, a non-finite
value or a packed batch takes the exact route, where padding keys get a large negative
additive bias rather than -inf, so an all-padding row stays finite inside ATen;
we then zero its output and gradients as the contract says. Packed batches are
padded to (B, max_seqlen) and unpadded afterwards by one flat index (remembered per
``cu_seqlens`` value, as every layer of a step reuses it); the tensors that travel
together are stacked so each direction is one gather/scatter.

Three things ATen does not do for us: it needs the head dim at unit stride
(other views are copied), it lets 0 * NaN from padded keys and values into real
rows (they are zeroed first), and its short-sequence kernel hides a NaN query
(such rows are set to NaN).

The call is a few microseconds of kernel on tiny inputs, so every tensor operation around it
shows (issue 22): the fix-ups above run only where a cheap look on the host says they are
needed (CPU tensors: reading a value waits for nothing), and ATen's own layouts are kept
((B, H, S, D) views of (B, S, H, D) memory, the lse as a (B, S, H) array) so the way back is a view.
"""
from __future__ import annotations

import math
import threading
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import checks, padding
from ..attention import AttentionInputs
from . import attention_cuda

_ATEN_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_ATEN_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
# The same forward through torch's generated Python binding: it parses its arguments in C++, ~6 µs
# a call less than the OpOverload's boxed call on tiny inputs (issue 22); the OpOverload where absent.
_FLASH = getattr(torch, "_scaled_dot_product_flash_attention_for_cpu", _ATEN_FWD)
PACKINGS_KEPT = 16  # cu_seqlens values whose packing is remembered (a bound, not a tuning knob)
KEY_MASKS_KEPT = 16  # attention_mask values whose bias and keyless rows are remembered (likewise)
KEY_MASK_LIMIT = 1 << 14  # entries of a (B, S) mask up to which it is remembered by value
NATIVE_LIMIT = 1 << 16  # elements of one padded (B, S, H, D) tensor up to which masked or packed calls are recorded


def why_not(inputs: AttentionInputs) -> Optional[str]:
    """Why these inputs cannot run here (None: they can)."""
    device = attention_cuda.device_type(inputs.q)
    if device == "cuda":
        return attention_cuda.why_not(inputs)
    if device != "cpu":
        return f"runs on CPU and CUDA tensors, got {device}"
    return None


def differentiable(inputs: AttentionInputs) -> bool:
    """Whether autograd may record :func:`forward` itself (the dispatcher's eager path then needs
    no Python backward node, tens of µs a call): on the CPU it is ATen's flash attention, which has
    its own derivative (the kernel :func:`backward` calls), between differentiable layout ops.
    The gradients equal :func:`backward`'s: padded keys get none through ``where``, and a row
    with no key gets a zero upstream gradient through its ``masked_fill``, so ATen yields zeros.

    The recorded graph keeps what ATen read until the backward: for padded inputs on the short
    route views of q, k, v (what the op's own rule keeps), but for masked ones on the exact route
    the zeroed copies of k and v, and for packed ones the padded copies of q, k, v and out. So those take it only while small
    (:data:`NATIVE_LIMIT`), where the Python node's cost dominates; beyond, the op's rule saves
    the inputs themselves and :func:`backward` redoes the layout."""
    if attention_cuda.device_type(inputs.q) != "cpu":
        return False
    if inputs.attention_mask is None and inputs.cu_seqlens is None:
        return True
    heads, head_dim = inputs.q.shape[-2:]
    return inputs.batch * inputs.max_seqlen * heads * head_dim <= NATIVE_LIMIT


# --------------------------------------------------------------------------- layouts
def _unit_stride(t: Tensor) -> Tensor:
    """ATen's CPU flash kernels assume the head dim has stride 1 and silently read the wrong
    elements otherwise (x[..., ::2], a transposed (S, D) view): copy only those."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _zero_padding(tensors, attention_mask: Tensor, count: int) -> list[Tensor]:
    """(B, S, H, D) tensors with the first ``count`` (the keys and values) zeroed at padded
    positions: ATen masks their scores, but 0 * NaN is NaN, so whatever padding holds would
    otherwise reach the real rows."""
    real = _key_mask(attention_mask).real  # (B, S, 1, 1)
    return [torch.where(real, t, _values(t.dtype)[0]) if i < count else t for i, t in enumerate(tensors)]


def _to_padded(tensors, attention_mask, cu_seqlens, max_seqlen, zero_padding: int):
    """(T, H, D) packed or (B, S, H, D) padded tensors -> (B, H, S, D) views ATen can read, the
    (B, S) key mask, and the packed coordinates of :func:`padding.packed_coords` (None when padded).

    The first ``zero_padding`` tensors (the keys and values) are zero at padded positions
    (see :func:`_zero_padding`); packed batches are padded with zeros, which does that by itself.
    (The block-sparse CPU backend's layout; the dense path below uses :class:`_Packing`.)
    """
    if cu_seqlens is None:
        if attention_mask is not None:
            tensors = _zero_padding(tensors, attention_mask, zero_padding)
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


class _Packing(NamedTuple):
    """Where the packed tokens of one ``cu_seqlens`` sit in the padded (B, S) layout.

    flat: (T,) int64, b * S + position of each packed token (see :func:`padding.flat_index`).
    mask: (B, S) bool, True = real token.
    biases: dtype -> (B, 1, 1, S) additive key bias, filled as dtypes come.
    """

    flat: Tensor
    mask: Tensor
    biases: dict

    def pad(self, tensors) -> list[Tensor]:
        """(T, H, D) tensors -> zero-padded (B, H, S, D) views, stacked so it is one scatter.

        Stacked in front, (n, T, H, D): each tensor's part of the buffer, and of the gradient
        autograd sends back through it, is then contiguous (the contract of gradients)."""
        b, s = self.mask.shape
        stacked = padding.pad_flat(torch.stack(tensors), self.flat, b, s, dim=1)  # (n, B, S, H, D)
        return [t.transpose(1, 2) for t in stacked.unbind(0)]

    def unpad(self, t: Tensor) -> Tensor:
        """(B, H, S, ...) -> contiguous (T, H, ...)."""
        return padding.unpad_flat(t.transpose(1, 2), self.flat)


_PACKINGS: dict[tuple, _Packing] = {}
_LOCK = threading.Lock()


def _packing(cu_seqlens: Tensor, total: int, max_seqlen: int) -> _Packing:
    """The :class:`_Packing` of ``cu_seqlens``, remembered by value for short CPU ones (the
    public op has just read them; the layers of a step and their backwards share one)."""
    key = None
    if checks.host_readable(cu_seqlens) and cu_seqlens.numel() <= checks.SHORT_CHECK:
        key = (tuple(cu_seqlens.tolist()), total, max_seqlen)
        found = _PACKINGS.get(key)
        if found is not None:
            return found
    flat = padding.flat_index(cu_seqlens, total, max_seqlen)
    mask = torch.arange(max_seqlen, device=cu_seqlens.device)[None, :] < padding.seqlens(cu_seqlens)[:, None]
    return _keep(_PACKINGS, key, _Packing(flat, mask, {}), PACKINGS_KEPT)


def _keep(store: dict, key, value, limit: int):
    """``value``, remembered in ``store`` under ``key`` (None: not remembered); a store that
    reaches ``limit`` entries starts over (the values are small, and rebuilt at the next call)."""
    if key is not None:
        with _LOCK:
            if len(store) >= limit:
                store.clear()
            store[key] = value
    return value


# --------------------------------------------------------------------------- masks
_VALUES: dict[torch.dtype, tuple[Tensor, Tensor, Tensor]] = {}


def _values(dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """0-d CPU tensors (0, the dtype's lowest finite value, -inf): ``torch.where`` with them is one
    op, where a Python scalar costs it a conversion and a second dispatch."""
    found = _VALUES.get(dtype)
    if found is None:
        made = tuple(torch.tensor(x, dtype=dtype) for x in (0.0, torch.finfo(dtype).min, float("-inf")))
        found = _VALUES.setdefault(dtype, made)
    return found


def _bias_of(keep: Tensor, dtype: torch.dtype, exact: bool = False) -> Tensor:
    """Additive float bias of a bool "may attend" mask in one op: 0 where kept, elsewhere the dtype's
    lowest finite value (a row with no key stays finite inside ATen) or, ``exact``, -inf (a dropped
    key then gets weight 0 whatever finite value it holds)."""
    zero, lowest, minus_inf = _values(dtype)
    return torch.where(keep, zero, minus_inf if exact else lowest)


def _keyless_sequences(mask: Tensor) -> Optional[Tensor]:
    """(B, 1, 1) bool, True for a sequence without a real key (its rows must output zeros);
    None when there is none, the usual case (read on the host: a CPU tensor waits for nothing)."""
    has_key = mask.any(dim=1)
    return None if bool(has_key.all()) else ~has_key.view(-1, 1, 1)


class _KeyMask(NamedTuple):
    """What the CPU path derives from one (B, S) bool key mask (True = real key).

    real: (B, S, 1, 1) bool, to zero the padded keys and values of (B, S, H, D) tensors.
    keyless: see :func:`_keyless_sequences`.
    biases: (dtype, exact) -> (B, 1, 1, S) additive key bias (:func:`_bias_of`), filled as asked.
    """

    real: Tensor
    keyless: Optional[Tensor]
    biases: dict

    def bias(self, dtype: torch.dtype, exact: bool = False) -> Tensor:
        found = self.biases.get((dtype, exact))
        if found is None:
            b, s = self.real.shape[:2]
            found = self.biases.setdefault((dtype, exact), _bias_of(self.real.view(b, 1, 1, s), dtype, exact))
        return found


_KEY_MASKS: dict[tuple, _KeyMask] = {}


def _key_mask(mask: Tensor) -> _KeyMask:
    """The :class:`_KeyMask` of ``mask``, remembered by value for small CPU masks: every layer of a
    step (and its backward) passes the same mask, and its bias, keyless test and host read would
    otherwise be three to four ops of a call whose kernel takes a few µs (issue 22). The value is
    the key (its bytes, read in place), so a mask changed in place is never mistaken for the old one;
    the entry is built from a copy."""
    key = None
    if checks.host_readable(mask) and mask.numel() <= KEY_MASK_LIMIT:
        key = (tuple(mask.shape), mask.numpy().tobytes())
        found = _KEY_MASKS.get(key)
        if found is not None:
            return found
        mask = mask.clone()
    b, s = mask.shape
    return _keep(_KEY_MASKS, key, _KeyMask(mask.view(b, s, 1, 1), _keyless_sequences(mask), {}), KEY_MASKS_KEPT)


class _Padded(NamedTuple):
    """One call's tensors in ATen's layout and what is needed to go back.

    tensors: (B, H, S, D) views, in the order given.
    bias: (B, 1, 1, S) or (B, H or 1, S, S) additive mask, or None (every row sees every key).
    keyless: bool, broadcastable to (B, H, S): the rows that see no key; None when there is none.
    packing: the :class:`_Packing` of a packed batch, None when padded.
    """

    tensors: list
    bias: Optional[Tensor]
    keyless: Optional[Tensor]
    packing: Optional[_Packing]

    def back(self, t: Tensor) -> Tensor:
        """(B, H, S, ...) -> contiguous, in the caller's layout: (B, S, H, ...) or packed (T, H, ...)."""
        return t.transpose(1, 2).contiguous() if self.packing is None else self.packing.unpad(t)


def _padded(inputs: AttentionInputs, tensors, extra_mask: Optional[Tensor]) -> _Padded:
    """``tensors`` (k and v first, then any of q's shape) in ATen's layout, with the key bias.

    Packed batches need no keyless rows: a zero-length sequence has no row to output, and the
    padded rows of the others see their sequence's keys (and are dropped). An ``extra_mask``
    ((H or 1, S, S) bool, True = may attend) can empty any row, so its rows are always fixed up.
    """
    mask, packing = inputs.attention_mask, None
    if inputs.cu_seqlens is None:
        if mask is not None:
            tensors = _zero_padding(tensors, mask, 2)
        tensors = [_unit_stride(t).transpose(1, 2) for t in tensors]
    else:
        packing = _packing(inputs.cu_seqlens, inputs.q.shape[0], inputs.max_seqlen)
        tensors, mask = packing.pad(tensors), packing.mask
    b, h, s = tensors[0].shape[:3]
    dtype = inputs.q.dtype
    if extra_mask is not None:
        keep = extra_mask[None, :, :s, :s] if mask is None else mask[:, None, None, :] & extra_mask[None, :, :s, :s]
        return _Padded(tensors, _bias_of(keep, dtype), ~keep.any(dim=-1), packing)
    if mask is None:
        return _Padded(tensors, None, None, None)
    if packing is not None:
        bias = packing.biases.get(dtype)
        if bias is None:
            bias = packing.biases.setdefault(dtype, _bias_of(mask.view(b, 1, 1, s), dtype))
        return _Padded(tensors, bias, None, packing)
    keys = _key_mask(mask)
    return _Padded(tensors, keys.bias(dtype), keys.keyless, None)


def _all_finite(*tensors: Tensor) -> bool:
    """Whether every value of ``tensors`` (contiguous ones sum fastest) is finite, by a host read of
    each one's sum: NaN and inf survive a sum; finite values whose sum overflows say False, which only
    costs the exact path. ``.data``: no graph to record, and a cheaper alias than ``detach()``."""
    acc = checks.accum_dtype(tensors[0].dtype)
    if tensors[0].dtype == acc:  # (a dtype argument costs its parsing)
        return math.isfinite(sum(t.data.sum().item() for t in tensors))
    return math.isfinite(sum(t.data.sum(dtype=acc).item() for t in tensors))


def _nan_for_nonfinite_queries(q: Tensor, qp: Tensor, out: Tensor, lse: Optional[Tensor]):
    """ATen's kernel for short unmasked sequences turns a NaN query into a finite row; a
    non-finite query makes its row NaN in the exact math, so say so explicitly. One sum read on
    the host finds whether any query is non-finite (see :func:`_all_finite`). (lse None: none wanted.)"""
    if _all_finite(q):
        return out, lse
    finite = qp.isfinite().all(dim=-1)
    return (torch.where(finite[..., None], out, float("nan")),
            None if lse is None else torch.where(finite, lse, float("nan")))


def _lse_back(lse: Tensor, q: Tensor) -> Tensor:
    """ATen's (B, H, S) lse -> the (B, S, H) layout of q, in q's accumulation dtype: a view (ATen
    stores it that way) and no cast (ATen computes it in that dtype): no op when nothing is needed."""
    lse = lse.transpose(1, 2)
    acc = checks.accum_dtype(q.dtype)
    return (lse if lse.dtype == acc else lse.to(acc)).contiguous()


# --------------------------------------------------------------------------- forward / backward
def forward(inputs: AttentionInputs, need_lse: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """Returns (out shaped like q, lse shaped q.shape[:-1]), both contiguous; lse None when not ``need_lse``."""
    if attention_cuda.device_type(inputs.q) == "cuda":
        return attention_cuda.forward(inputs)
    if inputs.cu_seqlens is None:
        found = _padded_forward(inputs, need_lse)
        if found is not None:
            return found
    return masked_forward(inputs, None, need_lse)


def forward_out(inputs: AttentionInputs) -> Tensor:
    """:func:`forward`'s out alone, for a caller that drops the lse: on the CPU its layout ops
    (a transpose and copy; for packed batches an unpadding gather) are then skipped."""
    return forward(inputs, need_lse=False)[0]


def _padded_forward(inputs: AttentionInputs, need_lse: bool = True) -> Optional[tuple[Tensor, Optional[Tensor]]]:
    """The padded layout's short route: views, one ATen call, views, one host read; None when the
    inputs need :func:`masked_forward`'s exact route.

    Padded keys are dropped by a -inf bias instead of being zeroed first (two ops, and two more
    in the backward): ATen then gives them weight exactly 0, and their gradients exactly 0, for any
    finite value they hold, as the zeroed route does. A NaN or inf under padding (or one a row
    reads) makes ``out`` non-finite; that, a non-finite query, or a sequence without a real key
    (rows ATen would fill with NaN) sends the call down the exact route, which zeroes the padding.
    """
    q, mask = inputs.q, inputs.attention_mask
    bias = None
    if mask is not None:
        keys = _key_mask(mask)
        if keys.keyless is not None:
            return None
        bias = keys.bias(q.dtype, exact=True)
    qp, kp, vp = _unit_stride(q).transpose(1, 2), _unit_stride(inputs.k).transpose(1, 2), \
        _unit_stride(inputs.v).transpose(1, 2)
    out, lse = _FLASH(qp, kp, vp, attn_mask=bias, scale=inputs.scale)  # (B, H, S, D) and (B, H, S)
    lse = lse if need_lse else None
    if mask is None:
        out, lse = _nan_for_nonfinite_queries(q, qp, out, lse)
        return out.transpose(1, 2).contiguous(), None if lse is None else _lse_back(lse, q)
    out = out.transpose(1, 2).contiguous()  # a view: ATen stores (B, S, H, D)
    if not _all_finite(q, out):
        return None
    return out, None if lse is None else _lse_back(lse, q)


def backward(inputs: AttentionInputs, out: Tensor, lse: Tensor, dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv) shaped like q, contiguous."""
    if attention_cuda.device_type(inputs.q) == "cuda":
        return attention_cuda.backward(inputs, out, lse, dout)
    return masked_backward(inputs, out, lse, dout, None)


def masked_forward(inputs: AttentionInputs, extra_mask: Optional[Tensor],
                   need_lse: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """:func:`forward` with an extra (H or 1, S, S) bool mask, True = may attend (block-sparse attention)."""
    q, k, v = inputs.q, inputs.k, inputs.v
    call = _padded(inputs, [k, v, q], extra_mask)
    kp, vp, qp = call.tensors
    out, lse = _FLASH(qp, kp, vp, attn_mask=call.bias, scale=inputs.scale)  # lse (B, H, S)
    out, lse = _nan_for_nonfinite_queries(q, qp, out, lse if need_lse else None)
    if call.keyless is not None:
        out = out.masked_fill(call.keyless[..., None], 0.0)
        lse = None if lse is None else lse.masked_fill(call.keyless, float("-inf"))
    if lse is None:
        return call.back(out), None
    acc = checks.accum_dtype(q.dtype)
    return call.back(out), call.back(lse if lse.dtype == acc else lse.to(acc))


def masked_backward(inputs: AttentionInputs, out: Tensor, lse: Tensor, dout: Tensor,
                    extra_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`backward` under the extra mask of :func:`masked_forward`."""
    q = inputs.q
    call = _padded(inputs, [inputs.k, inputs.v, q, out, dout], extra_mask)
    kp, vp, qp, outp, doutp = call.tensors
    if call.packing is not None:
        b, s = call.packing.mask.shape
        lse = padding.pad_flat(lse, call.packing.flat, b, s)  # (T, H) -> (B, S, H)
    lse = lse.transpose(1, 2).to(checks.accum_dtype(q.dtype))  # (B, H, S): ATen's own layout of it
    if call.keyless is not None:  # zero upstream gradient and a finite lse: ATen then yields zeros
        doutp, lse = doutp.masked_fill(call.keyless[..., None], 0.0), lse.masked_fill(call.keyless, 0.0)
    grads = _ATEN_BWD(doutp, qp, kp, vp, outp, lse, 0.0, False, attn_mask=call.bias, scale=inputs.scale)
    return tuple(call.back(g) for g in grads)
