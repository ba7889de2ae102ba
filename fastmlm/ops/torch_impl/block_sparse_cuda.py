"""``torch`` backend of block-sparse attention on CUDA tensors: varlen windows and FlexAttention.

Two routes (:func:`route`):

  window  a layout that is exactly a sliding window (``|i - j| <= w`` on the batch's tokens,
          nothing else: :func:`pure_window`) on a packed or unmasked padded batch in
          fp16/bf16: ``varlen_attn`` with ``window_size=(w, w)`` (attention_cuda.py's varlen
          route), which visits only the band's tiles.
  flex    everything else, fp16/bf16/fp32: ``torch.compile``d FlexAttention with a BlockMask
          built once per layout and sequence length from the layout's own tile states
          (coarsened to FlexAttention's FLEX_BLOCK-token tiles: a coarse tile is full when every
          fine tile under it is, skipped when every one is) and cached on the layout's tile
          tensor. Partial tiles run the exact token rule as the mask_mod; key padding is a
          score_mod (so it also applies inside full tiles). Packed batches are padded to
          (B, max_seqlen) first. The backward recomputes the forward under autograd (one
          extra forward pass) and differentiates through FlexAttention's own backward kernel.

As for dense attention: K/V at padded positions are zeroed first, a row that keeps no key gives
zeros with lse = -inf, padded keys get zero gradients. The layout's structure is read on the
host once per layout (block_layout.host_blocks: no device read for layouts built on the CPU).
The two FlexAttention calls go through :func:`flex_forward` / :func:`flex_backward`, which the
CPU tier replaces (emulate.py: FlexAttention's eager forward, reference math backward).
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .. import checks, padding
from ..block_layout import FULL, PARTIAL, SKIP, host_blocks, visit_list
from ..block_sparse import BlockSparseInputs
from . import _autograd
from . import attention_cuda as dense

FLEX_BLOCK = 128  # FlexAttention's default sparse block: its kernels tile by it
FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CACHE = WeakIdKeyDictionary()  # a layout's tile tensor -> {key: value} (pure-window verdicts, BlockMasks)


# --------------------------------------------------------------------------- layout facts, cached per layout
def _cached(inputs: BlockSparseInputs, key: tuple, build):
    """``build()`` once per layout tile tensor and key; the token mask must be the same object too."""
    per_layout = _CACHE.setdefault(inputs.blocks, {})
    key = (inputs.block_size, inputs.window, inputs.num_global, id(inputs.token_mask)) + key
    hit = per_layout.get(key)
    if hit is None or hit[0] is not inputs.token_mask:
        hit = per_layout[key] = (inputs.token_mask, build())
    return hit[1]


def _tile_bounds(count: int, size: int, seqlen: int) -> tuple[Tensor, Tensor]:
    first = torch.arange(count) * size
    return first, torch.clamp(first + size - 1, max=seqlen - 1)


def pure_window(inputs: BlockSparseInputs) -> Optional[int]:
    """w when the layout keeps exactly the pairs with |i - j| <= w among the first max_seqlen tokens
    (every head), else None. Judged from the tile states on the host, once per layout and length."""
    if inputs.window < 0 or inputs.num_global or inputs.token_mask is not None:
        return None
    seqlen, size, window = inputs.dense.max_seqlen, inputs.block_size, inputs.window
    if seqlen == 0:
        return None

    def judge():
        count = -(-seqlen // size)
        tiles = host_blocks(inputs.blocks)[:, :count, :count]
        first, last = _tile_bounds(count, size, seqlen)
        q0, q1, k0, k1 = first[:, None], last[:, None], first[None, :], last[None, :]
        nearest = torch.clamp(torch.maximum(k0 - q1, q0 - k1), min=0)
        farthest = torch.maximum((k1 - q0).abs(), (q1 - k0).abs())
        ok = torch.where(tiles == SKIP, nearest > window, torch.where(tiles == FULL, farthest <= window, True))
        return bool(ok.all())

    return window if _cached(inputs, ("pure", seqlen), judge) else None


def _mask_mod(inputs: BlockSparseInputs, seqlen: int):
    """The layout's exact token rule as a FlexAttention mask_mod (indices clamped into the layout)."""
    blocks, size, window, num_global, token_mask = (inputs.blocks, inputs.block_size, inputs.window,
                                                    inputs.num_global, inputs.token_mask)
    per_head = blocks.shape[0] > 1
    last = seqlen - 1

    def mask_mod(b, h, q_idx, kv_idx):
        qi, ki = torch.clamp(q_idx, max=last), torch.clamp(kv_idx, max=last)
        head = h if per_head else 0
        tile = blocks[head, qi // size, ki // size]
        keep = tile == FULL
        rule = None
        if window >= 0:
            rule = (qi - ki).abs() <= window
        if num_global > 0:
            near = (qi < num_global) | (ki < num_global)
            rule = near if rule is None else rule | near
        if token_mask is not None:
            extra = token_mask[head if token_mask.shape[0] > 1 else 0, qi, ki]
            rule = extra if rule is None else rule | extra
        return keep | ((tile == PARTIAL) & rule) if rule is not None else keep

    return mask_mod


def coarse_tiles(blocks: Tensor, size: int, seqlen: int, flex_block: int = FLEX_BLOCK) -> tuple[Tensor, Tensor]:
    """(partial, full) bool (H, n, n) tiles of flex_block tokens, n = ceil(seqlen / flex_block), from the
    layout's (H, nb, nb) tile states of ``size`` tokens: full where every fine tile it overlaps is FULL,
    partial where some is visited but not all are full."""
    fine, coarse = -(-seqlen // size), -(-seqlen // flex_block)
    f0, f1 = _tile_bounds(fine, size, seqlen)
    c0, c1 = _tile_bounds(coarse, flex_block, seqlen)
    overlap = ((f0[None, :] <= c1[:, None]) & (f1[None, :] >= c0[:, None])).to(blocks.device, torch.float32)
    tiles = blocks[:, :fine, :fine]
    visited = overlap @ (tiles != SKIP).float() @ overlap.t() > 0
    not_full = overlap @ (tiles != FULL).float() @ overlap.t() > 0
    return visited & not_full, visited & ~not_full


def block_mask(inputs: BlockSparseInputs, seqlen: int):
    """The FlexAttention BlockMask of the layout for sequences of ``seqlen`` tokens (cached per layout)."""
    def build():
        from torch.nn.attention.flex_attention import BlockMask

        partial, full = coarse_tiles(inputs.blocks, inputs.block_size, seqlen)
        kv_index, kv_count = visit_list(partial)
        full_index, full_count = visit_list(full)
        return BlockMask.from_kv_blocks(kv_count[None], kv_index[None], full_count[None], full_index[None],
                                        BLOCK_SIZE=FLEX_BLOCK, mask_mod=_mask_mod(inputs, seqlen),
                                        seq_lengths=(seqlen, seqlen))

    return _cached(inputs, ("flex", seqlen, str(inputs.blocks.device)), build)


# --------------------------------------------------------------------------- FlexAttention calls
def why_not_flex(q: Tensor) -> Optional[str]:
    if q.dtype not in FLEX_DTYPES:
        return f"FlexAttention takes float16/bfloat16/float32, not {q.dtype}"
    if importlib.util.find_spec("triton") is None:
        return "FlexAttention compiles through Triton, which is not installed"
    try:
        from torch.nn.attention.flex_attention import AuxRequest, BlockMask  # noqa: F401
    except ImportError as exc:
        return f"this torch's FlexAttention lacks BlockMask / AuxRequest ({exc})"
    return None


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # One graph per dtype / head dim / mask kind: allow more than dynamo's default of 8, or a
    # recompile past the limit would quietly run the unfused (O(S²) memory) eager version.
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    return torch.compile(flex_attention, fullgraph=True)


def _key_padding(key_mask: Optional[Tensor]):
    """A score_mod sending padded keys to -inf (one code object for every call: no recompiles)."""
    if key_mask is None:
        return None
    last = key_mask.shape[1] - 1

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(key_mask[b, torch.clamp(kv_idx, max=last)], score, float("-inf"))

    return score_mod


def _flex_call(fn, q, k, v, mask, key_mask, scale):
    from torch.nn.attention.flex_attention import AuxRequest

    out, aux = fn(q, k, v, score_mod=_key_padding(key_mask), block_mask=mask, scale=scale,
                  return_aux=AuxRequest(lse=True))
    return out, aux.lse


def flex_forward(q, k, v, mask, key_mask: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    """Compiled FlexAttention on (B, H, S, D): (out (B, H, S, D), lse (B, H, S) fp32, natural log)."""
    return _flex_call(_compiled_flex(), q, k, v, mask, key_mask, scale)


def flex_backward(q, k, v, dout, mask, key_mask: Optional[Tensor], scale: float) -> list[Tensor]:
    """(dq, dk, dv) of :func:`flex_forward`'s output for ``dout``: recomputed under autograd."""
    return _autograd.vjp(lambda q, k, v: _flex_call(_compiled_flex(), q, k, v, mask, key_mask, scale)[0],
                         (q, k, v), dout)


# --------------------------------------------------------------------------- routes
def route(inputs: BlockSparseInputs) -> tuple[Optional[str], Optional[str]]:
    """("window" | "flex", None), or (None, why neither can run these inputs)."""
    q, mask, cu_seqlens = inputs.dense.q, inputs.dense.attention_mask, inputs.dense.cu_seqlens
    no_flex = why_not_flex(q)
    if (cu_seqlens is not None or mask is None) and dense.why_not_varlen(q) is None \
            and pure_window(inputs) is not None:
        return "window", None
    if no_flex is None:
        return "flex", None
    return None, no_flex


def why_not(inputs: BlockSparseInputs) -> Optional[str]:
    return route(inputs)[1]


def _flex_layout(tensors, inputs: BlockSparseInputs):
    """Tensors as (B, H, S, Dp) (padded, head dim padded to a power of two >= 16), key mask, packed coords."""
    q, _, _, mask, cu_seqlens, max_seqlen, _ = inputs.dense
    coords = None
    if cu_seqlens is not None:
        coords = padding.packed_coords(cu_seqlens, q.shape[0])
        stacked, mask = padding.pad(torch.stack(tensors, dim=1), cu_seqlens, max_seqlen, coords)
        tensors = list(stacked.unbind(2))
    elif mask is not None:
        tensors = [torch.where(mask[:, :, None, None], t, 0) if i in (1, 2) else t for i, t in enumerate(tensors)]
    head_dim = q.shape[-1]
    width = max(16, 1 << (head_dim - 1).bit_length())
    tensors = [F.pad(t, (0, width - head_dim)).transpose(1, 2).contiguous() for t in tensors]
    return tensors, mask, coords


def _back(t: Tensor, inputs: BlockSparseInputs, coords, head_dim: Optional[int]) -> Tensor:
    """(B, H, S, ...) -> the caller's layout, head dim cut back."""
    t = t.transpose(1, 2)
    if head_dim is not None:
        t = t[..., :head_dim]
    if coords is not None:
        t = padding.unpad(t, inputs.dense.cu_seqlens, coords[0].shape[0], coords)
    return t.contiguous()


def forward(inputs: BlockSparseInputs) -> tuple[Tensor, Tensor]:
    """Returns (out shaped like q, lse shaped q.shape[:-1] fp32), contiguous."""
    name, why = route(inputs)
    if name is None:
        raise RuntimeError(why)
    q = inputs.dense.q
    if name == "window":
        w = pure_window(inputs)
        out, lse = dense.varlen_forward(inputs.dense, window=(w, w))
    else:
        (qf, kf, vf), key_mask, coords = _flex_layout([q, inputs.dense.k, inputs.dense.v], inputs)
        out, lse = flex_forward(qf, kf, vf, block_mask(inputs, qf.shape[2]), key_mask, inputs.dense.scale)
        lse = lse.float()
        out = torch.where(torch.isneginf(lse)[..., None], 0.0, out)  # rows that keep no key
        out, lse = _back(out, inputs, coords, q.shape[-1]), _back(lse, inputs, coords, None)
    return out.to(q.dtype).contiguous(), lse.to(checks.accum_dtype(q.dtype)).contiguous()


def backward(inputs: BlockSparseInputs, out: Tensor, lse: Tensor, dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv) shaped like q, contiguous."""
    name, why = route(inputs)
    if name is None:
        raise RuntimeError(why)
    q = inputs.dense.q
    if name == "window":
        w = pure_window(inputs)
        return dense.varlen_backward(inputs.dense, out, lse, dout, window=(w, w))
    dout = torch.where(torch.isneginf(lse)[..., None], 0.0, dout)  # rows that keep no key get no gradient
    (qf, kf, vf, df), key_mask, coords = _flex_layout([q, inputs.dense.k, inputs.dense.v, dout], inputs)
    dq, dk, dv = flex_backward(qf, kf, vf, df, block_mask(inputs, qf.shape[2]), key_mask, inputs.dense.scale)
    if key_mask is not None:  # padded keys get exactly zero
        dk, dv = (torch.where(key_mask[:, None, :, None], g, 0.0) for g in (dk, dv))
    return tuple(_back(g, inputs, coords, q.shape[-1]).to(q.dtype) for g in (dq, dk, dv))
