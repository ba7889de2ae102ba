"""Run a patched transformers encoder on the real tokens only (the padding-free, packed form).

With lengths 32-128 in a batch padded to 128 about a third of the tokens are padding, and
an encoder's projections, feed-forward layers and LayerNorms run on them. The patched
forward (fastmlm/hf/patch.py) can skip them:

    embeddings (B, S, H), the model's own: its position ids, token types, dropout
        --gather the real tokens (a forward hook)--> (1, T, H)     T = real tokens
    every layer on (1, T, H); attention gets transformers' packed keyword arguments
        cu_seq_lens_q = cu_seq_lens_k = (B+1,) int32, max_length_q = max_length_k = S
        and runs fastmlm.ops.attention(..., cu_seqlens=...) (fastmlm/hf/attention.py)
    last hidden state (1, T, H) --scatter back--> (B, S, H), zeros at padding

The embeddings run padded, so every architecture keeps its own position rule (RoBERTa counts
positions past its padding id; BERT and ELECTRA use 0..S-1, left padding included), and only
the layers change layout. The result is the padded model's up to rounding: a real token sees
the real tokens of its own sequence either way. The layers' dropout draws differ (the same
distribution, drawn over T tokens instead of B*S), so a train step with dropout matches the
unpatched model in distribution only; with dropout off it matches up to rounding.

ModernBERT (transformers 5) does not unpad by itself: it runs padded with every attention
implementation. Here its rotary position ids are gathered with the tokens, and its sliding
windows count positions, so a batch with padding inside a sequence stays padded for it.

The padded path runs instead (see :func:`plan`) when there is nothing to gain or it would
not be exact: no padding, labels on padding tokens, a custom or 4-D mask, hidden states asked
for, while torch.compile traces (the real-token count is a data-dependent shape), and the
ModernBERT case above.

Host synchronisation: finding T reads one number back to the host. On the CPU that is free,
so ``unpad="auto"`` (the default) unpads CPU batches only; on CUDA ``unpad=True`` costs that
one sync per step, and the padded path (whose kernels skip padded key tiles) has none.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..data import IGNORE_INDEX
from ..ops.padding import cu_seqlens_from_lengths

MODES = ("auto", True, False)


def check_mode(unpad) -> None:
    """ValueError unless ``unpad`` is "auto", True or False."""
    if not any(unpad is m or (isinstance(m, str) and unpad == m) for m in MODES):
        raise ValueError(f"unpad must be 'auto', True or False, got {unpad!r}")


@dataclass(frozen=True)
class Unpadded:
    """Where a padded (B, S) batch's real tokens are.

    index: (T,) int64 flat indices of the real tokens into the B*S tokens, in order.
    cu_seqlens: (B+1,) int32 offsets of each sequence's real tokens in the packed order.
    batch, seqlen: B and S of the padded batch (S bounds every sequence: max_seqlen).
    """

    index: Tensor
    cu_seqlens: Tensor
    batch: int
    seqlen: int

    def attention_kwargs(self) -> dict:
        """transformers' packed-sequence keyword arguments (FlashAttentionKwargs), which the encoders
        pass through to the attention function."""
        return {"cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": self.seqlen, "max_length_k": self.seqlen}

    def gather(self, padded: Tensor) -> Tensor:
        """(B, S, ...) -> (1, T, ...), the real tokens in order."""
        return padded.reshape(self.batch * self.seqlen, *padded.shape[2:]).index_select(0, self.index)[None]

    def scatter(self, packed: Tensor) -> Tensor:
        """(1, T, ...) -> (B, S, ...), zeros at padding; the inverse of :meth:`gather` on real tokens."""
        flat = packed[0]
        out = flat.new_zeros((self.batch * self.seqlen,) + tuple(flat.shape[1:]))
        return out.index_copy(0, self.index, flat).reshape(self.batch, self.seqlen, *flat.shape[1:])

    @contextlib.contextmanager
    def after(self, module: torch.nn.Module):
        """While inside, ``module``'s (B, S, H) output is replaced by its (1, T, H) real tokens."""
        handle = module.register_forward_hook(lambda _module, _args, output: self.gather(output))
        try:
            yield
        finally:
            handle.remove()


def _holes(real: Tensor) -> Tensor:
    """(B,) bool: whether a row's real tokens are more than one contiguous run (padding inside a sequence)."""
    starts = real[:, :1].sum(1) + (real[:, 1:] & ~real[:, :-1]).sum(1)
    return starts > 1


def plan(unpad, attention_mask, labels: Tensor, *, contiguous_only: bool = False) -> Optional[Unpadded]:
    """An :class:`Unpadded` batch when the encoder should run on the real tokens, else None (padded).

    attention_mask: what the caller passed (a (B, S) 0/1 or bool tensor unpads; anything else
    stays padded and is checked by the attention function); labels: (B, S), -100 off the
    masked tokens. ``contiguous_only``: stay padded if a sequence has padding inside it.
    """
    if unpad is False or not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2 \
            or attention_mask.dtype.is_floating_point or torch.compiler.is_compiling():
        return None
    if unpad == "auto" and attention_mask.device.type != "cpu":
        return None
    if tuple(labels.shape) != tuple(attention_mask.shape):
        return None  # the loss reports the mismatch
    real = attention_mask.bool()
    labels_on_padding = ((labels.to(real.device) != IGNORE_INDEX) & ~real).any()
    holes = _holes(real).any() if contiguous_only else torch.zeros((), dtype=torch.bool, device=real.device)
    # One host read (a sync on CUDA): the real-token count, and whether to stay padded.
    tokens, stay = torch.stack([real.sum(), (labels_on_padding | holes).long()]).tolist()
    if tokens == real.numel() or stay:
        return None
    flat = real.reshape(-1)
    index = torch.sort((~flat).to(torch.int8), stable=True).indices[:tokens]  # real tokens first, in order
    batch, seqlen = real.shape
    return Unpadded(index, cu_seqlens_from_lengths(real.sum(1), check=False), batch, seqlen)  # counts: valid
