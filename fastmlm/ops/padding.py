"""Move tokens between the padded (B, S, ...) and packed (T, ...) layouts.

Everything here stays on the device: the packed -> padded direction needs only
``cu_seqlens`` and a static ``max_seqlen``, so no value is read back to the host.

    cu_seqlens = [0, 3, 5]          padded (B=2, S=3)      packed (T=5)
                                    [a b c]                 [a b c d e]
                                    [d e .]

The model's batch (checking and packing the caller's inputs, going back to its layout) is
built on these in :mod:`fastmlm.ops.packing`.
"""
from __future__ import annotations

import torch


def seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(B+1,) cumulative offsets -> (B,) lengths."""
    return cu_seqlens[1:] - cu_seqlens[:-1]


def packed_coords(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch index and position of each packed token: two (T,) int64 tensors."""
    tokens = torch.arange(total, device=cu_seqlens.device)
    batch = torch.searchsorted(cu_seqlens[1:].long(), tokens, right=True)
    return batch, tokens - cu_seqlens.long()[batch]


def pad(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, coords=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, ...) packed -> ((B, max_seqlen, ...) zero-padded, (B, max_seqlen) bool mask of real tokens).

    ``coords`` (from :func:`packed_coords`) saves recomputing them when padding several tensors.
    """
    batch, pos = packed_coords(cu_seqlens, x.shape[0]) if coords is None else coords
    out = x.new_zeros((cu_seqlens.numel() - 1, max_seqlen) + tuple(x.shape[1:]))
    out[batch, pos] = x
    mask = torch.arange(max_seqlen, device=x.device)[None, :] < seqlens(cu_seqlens)[:, None]
    return out, mask


def unpad(padded: torch.Tensor, cu_seqlens: torch.Tensor, total: int, coords=None) -> torch.Tensor:
    """(B, S, ...) padded -> (T, ...) packed, the inverse of :func:`pad`."""
    batch, pos = packed_coords(cu_seqlens, total) if coords is None else coords
    return padded[batch, pos]


def flat_index(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> torch.Tensor:
    """(T,) int64: the row of each packed token in the flattened (B * max_seqlen) padded layout,
    ``b * max_seqlen + position``; one index moves every token either way (:func:`pad_flat`,
    :func:`unpad_flat`), a cheaper call than indexing by (batch, position) pairs."""
    batch, pos = packed_coords(cu_seqlens, total)
    return batch * max_seqlen + pos


def pad_flat(x: torch.Tensor, flat: torch.Tensor, batch: int, max_seqlen: int, dim: int = 0) -> torch.Tensor:
    """(..., T, ...) packed along ``dim`` -> (..., B, max_seqlen, ...) zero-padded, by a :func:`flat_index`."""
    shape = tuple(x.shape)
    out = x.new_zeros(shape[:dim] + (batch * max_seqlen,) + shape[dim + 1:])
    return out.index_copy_(dim, flat, x).view(shape[:dim] + (batch, max_seqlen) + shape[dim + 1:])


def unpad_flat(padded: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """(B, S, ...) padded -> contiguous (T, ...) packed, the inverse of :func:`pad_flat`
    (a view to flatten when (B, S) are outermost in memory, else one copy first)."""
    return padded.reshape((-1,) + tuple(padded.shape[2:])).index_select(0, flat)


def cu_seqlens_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """(B,) lengths -> (B+1,) int32 cumulative offsets starting at 0, the inverse of :func:`seqlens`."""
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def cu_seqlens_from_mask(attention_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Right-padded (B, S) mask -> ((B+1,) int32 cu_seqlens, max_seqlen).

    Reads the lengths back to the host once (call it where the data is made,
    not inside a training step).
    """
    lengths = attention_mask.sum(dim=1, dtype=torch.int32)
    return cu_seqlens_from_lengths(lengths), int(lengths.max()) if lengths.numel() else 0
