"""Run the torch backend's CUDA paths on CPU tensors (tests only): :func:`emulation`.

Inside ``with emulation():`` CPU tensors look like CUDA ones to the torch backend
(attention_cuda.device_type), the GPU is an sm_90 and ``varlen_attn`` is available, and the
kernel calls are replaced by reference math with the same inputs and outputs:

  varlen_fwd / varlen_bwd        per-sequence softmax attention with FlashAttention's
                                 (left, right) window, lse (T, H); backward by autograd
  efficient_fwd / efficient_bwd  softmax(q·kᵀ·scale + bias)·v on (B, H, S, D), lse (B, H, S)
  flex_forward                   FlexAttention itself, eager (its CPU forward runs the BlockMask
                                 and mask_mod this backend built); flex_backward: reference math
                                 under the token mask the BlockMask and mask_mod give

So the CPU tier checks everything around the kernels (routes, the unpad plan, head-dim
padding, block masks, masks, NaN and empty-row handling) against the reference; what the real
kernels return is checked on the GPU tier.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from . import _autograd, attention_cuda, block_sparse_cuda


def varlen_fwd(q, k, v, cu, max_seqlen, scale, window):
    """Sequences cover [0, T) back to back (cu_seqlens' contract), so the pieces concatenate."""
    left, right = window
    outs, lses = [q.new_zeros((0,) + q.shape[1:], dtype=torch.float32)], [q.new_zeros((0, q.shape[1]))]
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        n = b - a
        scores = torch.einsum("qhd,khd->hqk", q[a:b].float(), k[a:b].float()) * scale
        offset = torch.arange(n)[:, None] - torch.arange(n)[None, :]  # query - key
        allowed = torch.ones(n, n, dtype=torch.bool)
        if left >= 0:
            allowed &= offset <= left
        if right >= 0:
            allowed &= -offset <= right
        scores = scores.masked_fill(~allowed, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # (H, n)
        outs.append(torch.einsum("hqk,khd->qhd", torch.exp(scores - row_lse[..., None]), v[a:b].float()))
        lses.append(row_lse.t())
    return torch.cat(outs).to(q.dtype), torch.cat(lses).detach()


def varlen_bwd(dout, q, k, v, out, lse, cu, max_seqlen, scale, window):
    return _autograd.vjp(lambda q, k, v: varlen_fwd(q, k, v, cu, max_seqlen, scale, window)[0], (q, k, v), dout)


def efficient_fwd(q, k, v, bias, scale):
    scores = q.float() @ k.float().transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ v.float()
    return out.to(q.dtype), lse


def efficient_bwd(dout, q, k, v, bias, out, lse, scale):
    return _autograd.vjp(lambda q, k, v: efficient_fwd(q, k, v, bias, scale)[0], (q, k, v), dout)


def flex_forward(q, k, v, mask, key_mask, scale):
    from torch.nn.attention.flex_attention import flex_attention

    call = block_sparse_cuda._flex_call
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile()": on purpose here
        return call(flex_attention, q.detach(), k.detach(), v.detach(), mask, key_mask, scale)


def _token_keep(mask, seqlen: int) -> torch.Tensor:
    """(Hl, S, S) bool: the BlockMask's visited tiles and its mask_mod, at token level."""
    qi, ki = torch.arange(seqlen)[:, None], torch.arange(seqlen)[None, :]
    tiles = mask.to_dense()[0].bool()  # (Hl, nq, nk), partial or full
    block = mask.BLOCK_SIZE[0]
    heads = tiles.shape[0]
    rule = torch.stack([torch.as_tensor(mask.mask_mod(0, h, qi, ki)).expand(seqlen, seqlen) for h in range(heads)])
    return rule & tiles[:, qi // block, ki // block]


def flex_backward(q, k, v, dout, mask, key_mask, scale):
    keep = _token_keep(mask, q.shape[2])[None]  # (1, Hl, S, S)
    if key_mask is not None:
        keep = keep & key_mask[:, None, None, :]

    def attend(q, k, v):
        scores = (q.float() @ k.float().transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
        probs = torch.where(keep.any(-1, keepdim=True), torch.softmax(scores, dim=-1), 0.0)
        return (probs @ v.float()).to(q.dtype)

    return _autograd.vjp(attend, (q, k, v), dout)


@contextlib.contextmanager
def emulation():
    """Within the block, the torch backend runs its CUDA paths on CPU tensors (see the module docstring)."""
    patches = [
        (attention_cuda, "device_type", lambda t: "cuda" if t.device.type == "cpu" else t.device.type),
        (attention_cuda, "capability", lambda device: (9, 0)),
        (attention_cuda, "varlen_api", lambda: None),
        (attention_cuda, "varlen_fwd", varlen_fwd),
        (attention_cuda, "varlen_bwd", varlen_bwd),
        (attention_cuda, "efficient_fwd", efficient_fwd),
        (attention_cuda, "efficient_bwd", efficient_bwd),
        (block_sparse_cuda, "flex_forward", flex_forward),
        (block_sparse_cuda, "flex_backward", flex_backward),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    for mod, name, value in patches:
        setattr(mod, name, value)
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
