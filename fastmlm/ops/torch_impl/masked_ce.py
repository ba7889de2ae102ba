"""``torch`` backend of masked_lm_loss: chunked over rows, never the whole (R, V) logits.

Forward and backward walk the rows in chunks sized so one chunk's fp32 logits
stay near 32 MiB; the backward recomputes each chunk's logits from the saved
log-sum-exp instead of keeping them. The math is fp32 (fp64 for fp64 inputs).
Rows that do not count are zeroed before the projection, so nothing they hold
reaches the loss or the gradients. Runs on any device; the chunk loop has a
static trip count (R is a shape), so there is no host synchronisation.

Gradient of one row's loss with respect to its logits z (p = softmax(z)):

    dz = g * (p * (1 + 2·zl·lse) - (1 - eps) * onehot(t) - eps / V)
"""
from __future__ import annotations

from typing import Optional

import torch

from torch import Tensor

from ..checks import accum_dtype
from ..masked_ce import MaskedCEInputs, gather_rows, per_row_terms

CHUNK_ELEMENTS = 1 << 23


def why_not(inputs: MaskedCEInputs) -> Optional[str]:
    """Runs every input that passed validation, on any device."""
    return None


def _chunks(rows: int, vocab: int):
    step = max(1, CHUNK_ELEMENTS // vocab)
    return ((start, min(start + step, rows)) for start in range(0, rows, step))


def _logits(h, weight, bias):
    acc = accum_dtype(h.dtype)
    logits = (h @ weight.t()).to(acc)
    return logits if bias is None else logits + bias.to(acc)


def forward(inputs: MaskedCEInputs) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: loss, lse (fp32; fp64 for fp64 inputs) and correct (bool), (R,) each; 0 where a row does not count."""
    hidden, weight, bias, labels, _, _, label_smoothing, z_loss = inputs
    index, counted = inputs.row_index()
    targets = torch.where(counted, labels[index], 0)
    acc = accum_dtype(hidden.dtype)
    loss, lse, correct = (torch.empty(index.shape[0], device=hidden.device, dtype=dt)
                          for dt in (acc, acc, torch.bool))
    for a, b in _chunks(index.shape[0], weight.shape[0]):
        logits = _logits(gather_rows(hidden, index[a:b], counted[a:b]), weight, bias)
        loss[a:b], lse[a:b], correct[a:b] = per_row_terms(logits, targets[a:b], label_smoothing, z_loss)
    return torch.where(counted, loss, 0.0), torch.where(counted, lse, 0.0), correct & counted


def backward(inputs: MaskedCEInputs, lse: Tensor, grad_rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum(grad_rows * loss): d_hidden (T, H), d_weight (V, H), d_bias (V,) in the input dtype."""
    hidden, weight, bias, labels, _, _, label_smoothing, z_loss = inputs
    index, counted = inputs.row_index()
    targets = torch.where(counted, labels[index], 0)
    acc = accum_dtype(hidden.dtype)
    g = grad_rows.to(acc)
    vocab = weight.shape[0]
    d_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=acc)
    d_weight = torch.zeros(weight.shape, device=weight.device, dtype=acc)
    d_bias = torch.zeros(vocab, device=weight.device, dtype=acc)
    for a, b in _chunks(index.shape[0], vocab):
        h = gather_rows(hidden, index[a:b], counted[a:b])
        probs = torch.exp(_logits(h, weight, bias) - lse[a:b, None])
        dz = probs * (1.0 + 2.0 * z_loss * lse[a:b, None]) - label_smoothing / vocab
        dz.scatter_add_(1, targets[a:b, None], torch.full_like(dz[:, :1], label_smoothing - 1.0))
        # where, not a product: rows that do not count must give exactly 0, even if their
        # recomputed probabilities (lse was saved as 0 for them) overflow.
        dz = torch.where(counted[a:b, None], dz * g[a:b, None], 0.0).to(weight.dtype)
        d_hidden.index_add_(0, index[a:b], (dz @ weight).to(acc))
        if dz.dtype == acc:
            d_weight.addmm_(dz.t(), h)  # in place: no (V, H) temporary per chunk
        else:
            d_weight += (dz.t() @ h).to(acc)
        d_bias += dz.to(acc).sum(0)
    return d_hidden.to(hidden.dtype), d_weight.to(weight.dtype), d_bias.to(weight.dtype)
