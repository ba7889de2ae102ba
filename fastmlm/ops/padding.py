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


def cu_seqlens_from_lengths(lengths: torch.Tensor, check: bool = True) -> torch.Tensor:
    """(B,) integer lengths -> (B+1,) int32 cumulative offsets starting at 0, the inverse of :func:`seqlens`.

    Host lengths are checked (>= 0, an int32 total); device ones are not, to read nothing back.
    ``check=False`` skips the checks, for lengths counted from a mask every step.
    """
    if not check:
        return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.dtype == torch.bool \
            or lengths.dtype.is_floating_point or lengths.dtype.is_complex:
        got = f"{lengths.dtype} {tuple(lengths.shape)}" if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise ValueError(f"lengths must be a (B,) integer tensor, got {got}")
    if lengths.device.type == "cpu" and lengths.numel():  # a float would truncate, a negative length or
        # a total past int32 wrap the offsets: silently wrong cu_seqlens rather than an error
        low, total = int(lengths.min()), int(lengths.sum(dtype=torch.int64))
        if low < 0 or total > torch.iinfo(torch.int32).max:
            raise ValueError(f"lengths must be >= 0 with a total below 2**31, got min {low}, total {total}")
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def cu_seqlens_from_mask(attention_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Right-padded (B, S) mask -> ((B+1,) int32 cu_seqlens, max_seqlen).

    Nonzero = real token, as for the model's attention_mask; a float (additive) mask is refused.
    Reads the lengths back to the host once (call it where the data is made,
    not inside a training step).
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 \
            or attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        got = (f"{attention_mask.dtype} {tuple(attention_mask.shape)}" if isinstance(attention_mask, torch.Tensor)
               else type(attention_mask).__name__)
        raise ValueError(f"attention_mask must be a (B, S) bool or integer tensor (nonzero = real token), got {got}")
    mask = attention_mask.bool()  # an int mask of 2s counts each real token once, not twice
    lengths = mask.sum(dim=1, dtype=torch.int32)
    # The offsets only say how many tokens each row has: with left padding or holes, unpad would take
    # the first `length` positions of the row, padding included. Checked on the same host read.
    right = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    longest, holes = torch.stack([lengths.max() if lengths.numel() else lengths.new_zeros(()),
                                  (mask != right).any().to(torch.int32)]).tolist()  # HOST SYNC
    if holes:
        raise ValueError("attention_mask must be right-padded (each row's real tokens first, then padding); "
                         "pack a left-padded batch with fastmlm.ops.packing.PackedBatch.from_padded")
    return cu_seqlens_from_lengths(lengths, check=False), longest
