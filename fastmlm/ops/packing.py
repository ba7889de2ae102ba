"""The model's batch: check the caller's padded (B, S) or packed (T,) inputs, pack the real
tokens, and put results back in the caller's layout.

    padded (B=2, S=3) + attention_mask     packed (T=5)             caller position -> packed index
    [a b c]   [1 1 1]                      [a b c d e]              0 1 2 3 4 5
    [d e .]   [1 1 0]                      cu_seqlens = [0, 3, 5]   0 1 2 3 4 -1   (-1: padding)

A padded batch with an attention_mask is packed by a stable sort of the mask, which keeps
the real tokens in order; the number of real tokens and the longest length are shapes, so
they are read back to the host once (the one host synchronisation of a model step, see
:meth:`PackedBatch.from_padded`). A padded batch without a mask packs by a free reshape and
an already-packed batch (from the data collator) needs no read at all. The op-level layout
helpers these build on (pad / unpad by ``cu_seqlens``) are in :mod:`fastmlm.ops.padding`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks, padding


class InputLimits(NamedTuple):
    """What the caller's ids may hold, and whom error messages name (e.g. "FastMLMForMaskedLM")."""

    owner: str
    vocab_size: int  # input_ids lie in [0, vocab_size)
    type_vocab_size: int  # token_type_ids lie in [0, type_vocab_size)
    max_positions: int  # no sequence is longer (max_position_embeddings)


def _fail(owner: str, msg: str):
    raise ValueError(f"{owner}: {msg}")


@dataclass
class PackedBatch:
    """The real tokens of a batch, packed, plus what is needed to go back to the caller's layout.

    input_ids, token_type_ids, positions: (T,) int64 (positions = index inside the sequence).
    cu_seqlens: (B+1,) int32; max_seqlen: int.
    token_index: (T,) int64 flat index of each packed token in the caller's (B*S) layout,
        or None when the two coincide (packed input, or a padded batch without padding).
    padded_shape: (B, S) when the caller passed a padded batch, else None.
    """

    input_ids: Tensor
    token_type_ids: Tensor
    positions: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    token_index: Optional[Tensor]
    padded_shape: Optional[tuple[int, int]]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def shape_if_no_padding(self) -> Optional[tuple[int, int]]:
        """(B, S) for a padded batch that came without an attention_mask (every token real), so
        attention can run on the (B, S) layout with no mask and skip pad/unpad; else None."""
        return self.padded_shape if self.token_index is None else None

    def attention_layout(self, *packed: Tensor) -> tuple[tuple[Tensor, ...], dict]:
        """(T, heads, D) packed q, k, v -> (the tensors attention takes, its keyword arguments).

        Without padding anywhere the padded layout needs no mask: (B, S, heads, D) views and no
        keywords; otherwise the packed tensors themselves with ``cu_seqlens`` and ``max_seqlen``.
        """
        if self.shape_if_no_padding is None:
            return packed, dict(cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen)
        b, s = self.shape_if_no_padding
        return tuple(t.view(b, s, *t.shape[1:]) for t in packed), dict()

    @classmethod
    def from_packed(cls, input_ids: Tensor, token_type_ids: Tensor, cu_seqlens: Tensor,
                    max_seqlen: int) -> "PackedBatch":
        """Already-packed (T,) ids and (B+1,) int32 ``cu_seqlens``; positions come from cu_seqlens."""
        _, positions = padding.packed_coords(cu_seqlens, input_ids.shape[0])  # (T,) index in sequence
        return cls(input_ids.long(), token_type_ids.long(), positions, cu_seqlens, max_seqlen, None, None)

    @classmethod
    def from_padded(cls, input_ids: Tensor, token_type_ids: Tensor, attention_mask: Optional[Tensor],
                    count: Optional[Tensor] = None) -> tuple["PackedBatch", Optional[int]]:
        """(B, S) ids, token types and optional (B, S) mask (nonzero = real) -> (batch, host value of ``count``).

        ``count`` (an optional 0-d device tensor) is read back on the same host synchronisation.
        """
        b, s = input_ids.shape
        positions = torch.arange(s, device=input_ids.device)
        if attention_mask is None:  # every token is real: packing is a free reshape
            cu = torch.arange(b + 1, device=input_ids.device, dtype=torch.int32) * s  # (B+1,); s may be 0
            batch = cls(input_ids.reshape(-1).long(), token_type_ids.reshape(-1).long(),  # (B, S) -> (B*S,)
                        positions.repeat(b), cu, s, None, (b, s))
            return batch, None if count is None else int(count)  # HOST SYNC, only when count is given
        mask = attention_mask.bool().reshape(-1)  # (B, S) -> (B*S,)
        lengths = mask.view(b, s).sum(1, dtype=torch.int32)  # (B,)
        cu = padding.cu_seqlens_from_lengths(lengths, check=False)  # (B+1,); counts of a mask: valid
        wanted = [cu[-1], F.pad(lengths, (0, 1)).max()] + ([] if count is None else [count.reshape(())])
        total, longest, *host_count = torch.stack([w.long() for w in wanted]).tolist()  # HOST SYNC: the one of a step
        # The real tokens, in order: a stable sort puts mask == True first. Positions are the
        # column in the padded row, as in Hugging Face BERT (so left padding also works).
        token_index = torch.sort((~mask).to(torch.int8), stable=True).indices[:total]  # (T,)
        ids, types = (t.reshape(-1)[token_index].long() for t in (input_ids, token_type_ids))  # (B, S) -> (T,)
        batch = cls(ids, types, token_index % s, cu, longest, token_index, (b, s))
        return batch, host_count[0] if host_count else None

    def repad(self, hidden: Tensor) -> Tensor:
        """(T, H) -> the caller's layout: (B, S, H) with zero padding, or (T, H) unchanged."""
        if self.padded_shape is None:
            return hidden
        b, s = self.padded_shape
        if self.token_index is None:
            return hidden.view(b, s, hidden.shape[-1])  # (B*S, H) -> (B, S, H)
        out = hidden.new_zeros(b * s, hidden.shape[-1]).index_copy(0, self.token_index, hidden)  # (B*S, H)
        return out.view(b, s, hidden.shape[-1])  # (B*S, H) -> (B, S, H)

    def packed_index(self, positions: Tensor) -> Tensor:
        """Caller-layout flat positions (R,) -> index into the packed tokens (R,), -1 where padded or not real."""
        valid = positions >= 0
        if self.token_index is None:
            return torch.where(valid, positions, -1)
        b, s = self.padded_shape
        # (B*S + 1,): one extra -1 at the end, read by invalid positions (there is no other slot when B*S == 0)
        packed_of = torch.full((b * s + 1,), -1, dtype=torch.long, device=positions.device)
        packed_of[self.token_index] = torch.arange(self.num_tokens, device=positions.device)
        return packed_of[torch.where(valid, positions, b * s)]


def gather_tokens(hidden: Tensor, packed_index: Tensor) -> Tensor:
    """(T, H), (R,) -> (R, H); an index of -1 reads token 0 (callers mask those out)."""
    if hidden.shape[0] == 0:  # nothing real to read: an empty or all-padding batch
        return hidden.new_zeros(packed_index.shape[0], hidden.shape[-1])
    return hidden[packed_index.clamp(min=0)]


# --------------------------------------------------------------------------- checks at the boundary
def check_ids(owner: str, name: str, t, shape, upper: Optional[int], device=None) -> None:
    """An int32/int64 tensor (of ``shape`` on ``device`` when given) with values in [0, upper) when given."""
    if not isinstance(t, Tensor) or t.dtype not in checks.INDEX_DTYPES:
        _fail(owner, f"{name} must be an int32/int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if device is not None and t.device != device:
        _fail(owner, f"{name} is on {t.device} but input_ids is on {device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        _fail(owner, f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} (the shape of input_ids)")
    if upper is not None and t.numel():
        torch._assert_async(((t >= 0) & (t < upper)).all(), f"{owner}: {name} must lie in [0, {upper})")


def check_positions(owner: str, name: str, positions, tokens: int, device) -> None:
    """(R,) int32/int64 flat indices into the caller's ``tokens`` ids, -1 = pad."""
    checks.check_tensor(owner, name, positions, ndim=1, dtypes=checks.INDEX_DTYPES, device=device)
    if positions.numel():
        torch._assert_async(((positions >= -1) & (positions < tokens)).all(),
                            f"{owner}: {name} must lie in [-1, {tokens}) (flat indices into input_ids, -1 = pad)")


def pack(limits: InputLimits, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
         token_type_ids: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
         max_seqlen: Optional[int] = None, count: Optional[Tensor] = None) -> tuple[PackedBatch, Optional[int]]:
    """Check a padded (B, S) or packed (T,) batch against ``limits`` and pack its real tokens.

    Arguments:
        input_ids: (B, S) padded, or (T,) packed, int32/int64 token ids.
        attention_mask: optional (B, S) bool/int, nonzero = real token (padded input only).
        token_type_ids: like input_ids (zeros when None).
        cu_seqlens, max_seqlen: (B+1,) int32 offsets and the longest length (packed input only).
        count: optional 0-d device tensor read back on the batch's one host synchronisation.
    Returns:
        (batch, host value of ``count`` or None).
    """
    owner = limits.owner
    check_ids(owner, "input_ids", input_ids, None, limits.vocab_size)
    device = input_ids.device
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    check_ids(owner, "token_type_ids", token_type_ids, input_ids.shape, limits.type_vocab_size, device)
    if input_ids.dim() == 1:  # already packed by the data collator
        if attention_mask is not None:
            _fail(owner, "attention_mask is for padded (B, S) input_ids; packed (T,) input_ids use cu_seqlens")
        if cu_seqlens is None or max_seqlen is None:
            _fail(owner, "packed (T,) input_ids need cu_seqlens ((B+1,) int32) and max_seqlen (int)")
        checks.check_tensor(owner, "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=device)
        if not isinstance(max_seqlen, int) or not 0 <= max_seqlen <= limits.max_positions:
            _fail(owner, f"max_seqlen must be an int in [0, max_position_embeddings={limits.max_positions}], "
                  f"got {max_seqlen!r}")
        batch = PackedBatch.from_packed(input_ids, token_type_ids, cu_seqlens, max_seqlen)
        if batch.positions.numel():  # checked here, before the position embedding would index out of range
            torch._assert_async(((batch.positions >= 0) & (batch.positions < max_seqlen)).all(),
                                f"{owner}: cu_seqlens must start at 0, and no packed sequence may be "
                                f"longer than max_seqlen={max_seqlen} (at most max_position_embeddings="
                                f"{limits.max_positions})")
        return batch, None if count is None else int(count)  # HOST SYNC, only when count is given
    if input_ids.dim() != 2:
        _fail(owner, f"input_ids must be (B, S) padded or (T,) packed, got shape {tuple(input_ids.shape)}")
    if cu_seqlens is not None or max_seqlen is not None:
        _fail(owner, "cu_seqlens/max_seqlen are for packed (T,) input_ids; padded (B, S) input_ids use attention_mask")
    b, s = input_ids.shape
    if s > limits.max_positions:
        _fail(owner, f"sequence length {s} exceeds max_position_embeddings={limits.max_positions}")
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or attention_mask.dtype.is_floating_point:
            _fail(owner, "attention_mask must be a bool or integer tensor (1 = real token), not a float additive bias")
        if tuple(attention_mask.shape) != (b, s) or attention_mask.device != device:
            _fail(owner, f"attention_mask is {tuple(attention_mask.shape)} on {attention_mask.device}, "
                  f"expected {(b, s)} on {device}")
    return PackedBatch.from_padded(input_ids, token_type_ids, attention_mask, count)


# --------------------------------------------------------------------------- masked-LM labels
def check_labels(limits: InputLimits, labels, input_ids, masked_positions, ignore_index: int
                 ) -> tuple[Tensor, Optional[Tensor]]:
    """Check MLM labels and the optional masked positions, before the batch is packed.

    Arguments:
        labels: like input_ids, the target id at masked tokens and ``ignore_index`` elsewhere.
        input_ids: the caller's ids (labels must have their shape and device).
        masked_positions: optional (R,) flat indices of the masked tokens into input_ids, -1 = pad.
    Returns:
        (labels flattened to (N,), N = B*S or T;
         when masked_positions is None, the 0-d device count of masked tokens, for :func:`pack`
         to read back on its host synchronisation; else None).
    """
    owner = limits.owner
    check_ids(owner, "labels", labels, getattr(input_ids, "shape", None), None, getattr(input_ids, "device", None))
    labels = labels.reshape(-1)  # (B, S) -> (B*S,), or (T,)
    torch._assert_async(((labels == ignore_index) | ((labels >= 0) & (labels < limits.vocab_size))).all(),
                        f"{owner}: labels must be {ignore_index} or a token id in [0, {limits.vocab_size})")
    if masked_positions is None:
        return labels, (labels != ignore_index).sum()
    check_positions(owner, "masked_positions", masked_positions, labels.shape[0], labels.device)
    return labels, None


def check_labels_at_padding(owner: str, labels: Tensor, attention_mask: Tensor, ignore_index: int) -> None:
    """(N,) flat labels are ``ignore_index`` wherever the (B, S) attention_mask is 0 (N = B*S)."""
    if labels.numel():
        torch._assert_async(((labels == ignore_index) | attention_mask.reshape(-1).bool()).all(),
                            f"{owner}: labels must be {ignore_index} at padding positions (attention_mask == 0)")


def masked_tokens(batch: PackedBatch, labels: Tensor, masked_positions: Optional[Tensor],
                  count_on_host: Optional[int], ignore_index: int) -> tuple[Tensor, Tensor]:
    """Where the masked tokens are among the packed tokens, and their labels.

    Arguments:
        batch: the packed batch of the caller's input.
        labels: (N,) flat labels in the caller's layout, as returned by :func:`check_labels`.
        masked_positions: (R,) flat indices into the caller's layout, -1 = pad; None to find
            the ``count_on_host`` masked tokens from labels (the count :func:`pack` read back).
    Returns:
        ((R,) int64 index into the packed tokens, -1 = none; (R,) labels there, ignore_index where none).
    """
    if masked_positions is None:  # the masked tokens, in order (their count came with pack's host sync)
        masked_positions = torch.sort((labels == ignore_index).to(torch.int8), stable=True).indices[:count_on_host]
    positions = masked_positions.long()  # (R,) into the caller's layout
    packed_index = batch.packed_index(positions)  # (R,) into the packed tokens
    masked_labels = torch.where(packed_index >= 0, labels[positions.clamp(min=0)] if labels.numel() else -1,
                                ignore_index)
    return packed_index, masked_labels
