"""``torch`` backend of masked_lm_loss: only the counted rows, chunked, gradients in the forward.

Rows.  On the CPU the rows that count are compacted first (``nonzero``: the CPU has no
device to wait for), so the work follows the number of masked tokens, not T, with or
without ``positions``.  On other devices the row count must stay static (no host
synchronisation): the rows given are projected and the rows that do not count are zeroed
before the projection, so nothing they hold reaches the loss or the gradients.

Static bound without ``positions`` (here on non-CPU devices, and in the ``cuda`` backend,
which shares :func:`bound_rows`).  A matmul cannot skip rows on the device, as the Triton
kernel does, so the counted rows are first compacted into a static number of rows, from
shapes only, ``B = min(R, ceil(MAX_COUNTED_FRACTION · R) + SLACK_ROWS)``
(``torch.nonzero_static``, -1 padded: they become ``positions``, whose path does the rest),
and the results are put back at each row's slot.  A call with more than B counted rows is
never answered wrongly: a device-side assertion (``torch._assert_async``: on a GPU it stops
the program at the next synchronisation; on the CPU it raises at once) names the bound and
the two ways past it: pass ``positions`` (a static, -1 padded list of the masked tokens:
its length is then the bound) or raise ``MAX_COUNTED_FRACTION`` (1.0: B = R, always fits).

The default is 1.0, every row projected, because a fraction below 1 would stop valid calls
whose rows are already compact (fastmlm's model and ``fastmlm.hf.patch`` pass the gathered
masked rows, nearly all counted, without ``positions``).  Set it to the masking rate's upper
bound (say 0.25 for 15% masking) where the rows are whole batches: the projection then
costs ~B rows instead of R.

Chunks.  The rows are walked in chunks of about ``CHUNK_ELEMENTS`` fp32 logits, balanced
so that a small problem is one chunk (bigger chunks run faster on the CPU); one chunk of
logits is alive at a time. The math is fp32 (fp64 for fp64 inputs).

``forward_and_grads`` (reduction "mean"/"sum" with gradients) does, per chunk, three
matmuls and no second pass over the vocabulary: z = h·Wᵀ + b, then in place on the
same buffer p = softmax(z) and, with g the weight of each row's loss,

    dz = g · (p · (1 + 2·zl·lse) - (1 - eps) · onehot(t) - eps / V)

then d_rows = dz·W and d_weight += dzᵀ·h (into one fp32 accumulator, chunk after chunk:
a fixed order, so the result is deterministic), d_bias += Σ dz. ``backward`` (reduction
"none") runs the same routine with the incoming row gradients.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from torch import Tensor

from ..checks import accum_dtype, assert_async
from ..masked_ce import MaskedCEInputs, gather_rows, per_row_terms

CHUNK_ELEMENTS = 1 << 25  # fp32 logits per chunk: 128 MiB
COMPACT_DEVICES = ("cpu",)  # device types where the counted rows are compacted (no device to wait for)
MAX_COUNTED_FRACTION = 1.0  # without positions off COMPACT_DEVICES: at most this share of rows may count
SLACK_ROWS = 64  # rows added to the bound: room for the spread of small batches' masked counts


def why_not(inputs: MaskedCEInputs) -> Optional[str]:
    """Runs every input that passed validation, on any device."""
    return None


def counted_bound(rows: int) -> int:
    """B, the static number of rows projected for R = ``rows`` rows without positions (see the module docstring)."""
    if MAX_COUNTED_FRACTION >= 1.0:
        return rows
    return min(rows, math.ceil(MAX_COUNTED_FRACTION * rows) + SLACK_ROWS)


def bound_rows(inputs: MaskedCEInputs, *row_values: Tensor):
    """Compact the counted rows into B static rows when that saves work: (inputs, slots, *row_values).

    Without positions and with B < R: slots is the (B,) int64 token index of each counted row in
    order, padded with R (``nonzero_static``: no host synchronisation); inputs get them as
    positions (-1 padded), and each (R,) tensor of ``row_values`` (lse, row gradients) is read at
    those slots (0 at the padding).
    Otherwise everything is returned as given, with slots None. Asserts, on the device, that at
    most B rows count.
    """
    rows = inputs.num_rows
    bound = counted_bound(rows)
    if inputs.positions is not None or bound >= rows:
        return (inputs, None, *row_values)
    counted = inputs.row_index()[1]
    assert_async("masked_lm_loss", counted.sum() <= bound,
                 f"more rows count (labels != ignore_index) than the {bound} of {rows} rows projected without "
                 f"positions (MAX_COUNTED_FRACTION={MAX_COUNTED_FRACTION} in {__name__}); pass positions (a static "
                 "list of the masked tokens, -1 padded) or raise MAX_COUNTED_FRACTION (1.0 always fits)")
    # Padded with R (a spare slot that unbound_rows drops); as positions, the padding is -1.
    slots = torch.nonzero_static(counted, size=bound, fill_value=rows)[:, 0]
    valid = slots < rows
    picked = tuple(torch.where(valid, v[slots.clamp(max=rows - 1)], 0) for v in row_values)
    return (inputs._replace(positions=torch.where(valid, slots, -1)), slots, *picked)


def unbound_rows(values: Tensor, slots: Optional[Tensor], rows: int) -> Tensor:
    """(R,) with the (n,) ``values`` at their ``slots`` (of :func:`bound_rows` or ``_plan``), 0 elsewhere;
    ``values`` itself when slots is None. Slots equal to R (padding) write to a spare last element, dropped."""
    if slots is None:
        return values
    return values.new_zeros(rows + 1).index_copy_(0, slots, values)[:rows]


def _bounded(inputs: MaskedCEInputs, *row_values: Tensor):
    """:func:`bound_rows` where this backend does not compact on the host (off COMPACT_DEVICES)."""
    if inputs.hidden.device.type in COMPACT_DEVICES:
        return (inputs, None, *row_values)
    return bound_rows(inputs, *row_values)


def _chunks(rows: int, vocab: int):
    """(start, end) row ranges of about CHUNK_ELEMENTS logits each, of balanced sizes."""
    count = max(1, -(-rows * vocab // CHUNK_ELEMENTS))
    step = max(1, -(-rows // count))
    return ((start, min(start + step, rows)) for start in range(0, rows, step))


def _plan(inputs: MaskedCEInputs):
    """The rows to project: (slots, index, targets, counted).

    slots: (n,) int64, the op's row of each projected row, or None when every row is
    projected (n = R); index (n,) the token each reads; targets (n,) valid ids (0 where a
    row does not count); counted (n,) bool, or None when every projected row counts.
    """
    index, counted = inputs.row_index()
    targets = torch.where(counted, inputs.labels[index], 0)
    if inputs.hidden.device.type in COMPACT_DEVICES:  # nonzero: no device synchronisation there
        slots = counted.nonzero()[:, 0]
        return slots, index[slots], targets[slots], None
    return None, index, targets, counted


def _gather(hidden: Tensor, index: Tensor, counted: Optional[Tensor]) -> Tensor:
    return hidden[index] if counted is None else gather_rows(hidden, index, counted)


def _logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], out: Optional[Tensor] = None) -> Tensor:
    """(n, V) logits in the accumulation dtype, written to ``out`` (n, V) when given (a buffer reused
    from chunk to chunk: fresh pages cost as much as a pass over them on the CPU)."""
    acc = accum_dtype(h.dtype)
    if h.dtype == acc:
        if bias is None:
            return torch.mm(h, weight.t(), out=out)
        return torch.addmm(bias, h, weight.t(), out=out)
    logits = (h @ weight.t()).to(acc)  # 16-bit: the matmul rounds to the input dtype, as the reference
    logits = logits if out is None else out.copy_(logits)
    return logits if bias is None else logits.add_(bias.to(acc))


def forward(inputs: MaskedCEInputs) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: loss, lse (fp32; fp64 for fp64 inputs) and correct (bool), (R,) each; 0 where a row does not count."""
    rows = inputs.num_rows
    inputs, slots = _bounded(inputs)
    return tuple(unbound_rows(out, slots, rows) for out in _forward(inputs))


def _forward(inputs: MaskedCEInputs) -> tuple[Tensor, Tensor, Tensor]:
    hidden, weight, bias, _, _, _, label_smoothing, z_loss = inputs
    slots, index, targets, counted = _plan(inputs)
    acc = accum_dtype(hidden.dtype)
    n = index.shape[0]
    loss, lse, correct = (torch.zeros(n, device=hidden.device, dtype=dt) for dt in (acc, acc, torch.bool))
    for a, b in _chunks(n, weight.shape[0]):
        logits = _logits(_gather(hidden, index[a:b], None if counted is None else counted[a:b]), weight, bias)
        loss[a:b], lse[a:b], correct[a:b] = per_row_terms(logits, targets[a:b], label_smoothing, z_loss)
    if counted is not None:
        loss, lse, correct = torch.where(counted, loss, 0.0), torch.where(counted, lse, 0.0), correct & counted
    rows = inputs.num_rows
    return unbound_rows(loss, slots, rows), unbound_rows(lse, slots, rows), unbound_rows(correct, slots, rows)


def _softmax_grad_(logits: Tensor, targets: Tensor, g: Tensor, label_smoothing: float, z_loss: float):
    """Per-row (loss, lse, correct) of (n, V) logits; overwrites ``logits`` with dz for row weights g (n,).

    Five passes over the buffer (max, exp, sum, scale, and the label-smoothing shift),
    no (n, V) temporary.
    """
    vocab = logits.shape[1]
    target_logit = logits.gather(1, targets[:, None])[:, 0]
    logit_mean = logits.mean(dim=1) if label_smoothing else None
    top, argmax = logits.max(dim=1)  # the first index among ties, as argmax
    probs = logits.sub_(top[:, None]).exp_()
    total = probs.sum(dim=1)
    lse = top + total.log()
    loss = (1.0 - label_smoothing) * (lse - target_logit)
    if label_smoothing:
        loss = loss + label_smoothing * (lse - logit_mean)
    if z_loss:
        loss = loss + z_loss * lse.square()
    dz = probs.mul_((g * (1.0 + 2.0 * z_loss * lse) / total)[:, None])  # p = exp(z - top) / total
    if label_smoothing:
        dz.sub_((g * (label_smoothing / vocab))[:, None])
    dz.scatter_add_(1, targets[:, None], (g * (label_smoothing - 1.0))[:, None].to(dz.dtype))
    return loss, lse, argmax == targets


def forward_and_grads(inputs: MaskedCEInputs, grad_rows: Tensor):
    """Forward outputs and the gradients of Σ grad_rows · loss, in one pass over the logits.

    grad_rows: (R,) the weight of each row's loss (known in the forward: 1 or 1 / count).
    Returns loss, lse (R,) fp32 (fp64 for fp64), correct (R,) bool, d_hidden (T, H),
    d_weight (V, H), d_bias (V,) in the input dtype, all contiguous.
    """
    rows = inputs.num_rows
    inputs, slots, grad_rows = _bounded(inputs, grad_rows)
    loss, lse, correct, *grads = _forward_and_grads(inputs, grad_rows)
    return (*(unbound_rows(out, slots, rows) for out in (loss, lse, correct)), *grads)


def _forward_and_grads(inputs: MaskedCEInputs, grad_rows: Tensor):
    hidden, weight, bias, _, _, _, label_smoothing, z_loss = inputs
    slots, index, targets, counted = _plan(inputs)
    acc = accum_dtype(hidden.dtype)
    g = grad_rows.to(acc)
    if slots is not None:
        g = g[slots]
    elif counted is not None:  # rows that do not count get dz = 0 exactly, whatever their logits
        g = torch.where(counted, g, 0.0)
    n, (vocab, width) = index.shape[0], weight.shape
    device = hidden.device
    loss, lse, correct = (torch.zeros(n, device=device, dtype=dt) for dt in (acc, acc, torch.bool))
    d_rows = torch.empty(n, width, device=device, dtype=acc)
    # The first chunk writes d_weight (beta=0 ignores its contents): no pass to zero V x H first.
    d_weight = torch.empty(weight.shape, device=device, dtype=acc)
    d_bias = torch.zeros(vocab, device=device, dtype=acc)
    workspace = None
    for a, b in _chunks(n, vocab):
        h = _gather(hidden, index[a:b], None if counted is None else counted[a:b])
        if workspace is None:
            workspace = torch.empty(b - a, vocab, device=device, dtype=acc)  # the largest chunk is the first
        dz = _logits(h, weight, bias, out=workspace[: b - a])
        loss[a:b], lse[a:b], correct[a:b] = _softmax_grad_(dz, targets[a:b], g[a:b], label_smoothing, z_loss)
        d_bias += dz.sum(0)
        dz = dz.to(weight.dtype)
        d_rows[a:b] = dz @ weight
        if dz.dtype == acc:
            d_weight.addmm_(dz.t(), h, beta=0.0 if a == 0 else 1.0)  # in place: no (V, H) temporary per chunk
        elif a == 0:
            d_weight.copy_(dz.t() @ h)
        else:
            d_weight += (dz.t() @ h).to(acc)
    if n == 0:
        d_weight.zero_()
    if counted is not None:
        loss, lse, correct = torch.where(counted, loss, 0.0), torch.where(counted, lse, 0.0), correct & counted
    # Duplicated positions sum their gradients. (index_put_ rather than index_add_: many times
    # faster on the CPU here, and deterministic there.)
    d_hidden = torch.zeros(hidden.shape, device=device, dtype=acc).index_put_((index,), d_rows, accumulate=True)
    rows = inputs.num_rows
    return (unbound_rows(loss, slots, rows), unbound_rows(lse, slots, rows), unbound_rows(correct, slots, rows),
            d_hidden.to(hidden.dtype), d_weight.to(weight.dtype), d_bias.to(weight.dtype))


def backward(inputs: MaskedCEInputs, lse: Tensor, grad_rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum(grad_rows * loss): d_hidden (T, H), d_weight (V, H), d_bias (V,) in the input dtype.

    Recomputes each chunk's logits once (the saved lse is not needed: the same pass finds it).
    """
    return forward_and_grads(inputs, grad_rows)[3:]
