"""``torch`` backend of masked_lm_loss: only the counted rows, chunked, gradients in the forward.

Rows.  On the CPU the rows that count are compacted first (``nonzero``: the CPU has no
device to wait for), so the work follows the number of masked tokens, not T, with or
without ``positions``.  On other devices the row count must stay static (no host
synchronisation): the rows given are projected and the rows that do not count are zeroed
before the projection, so nothing they hold reaches the loss or the gradients.

Static bound without ``positions`` (here on non-CPU devices, and in the ``cuda`` backend,
which shares :func:`bound_rows`).  A matmul cannot skip rows on the device, as the Triton
kernel does, so the counted rows are first compacted into a static number of rows, from
shapes and the call's ``max_masked_fraction`` f only, ``B = min(R, ceil(f · R) + SLACK_ROWS)``
(``torch.nonzero_static``, -1 padded: they become ``positions``, whose path does the rest),
and the results are put back at each row's slot.  A call with more than B counted rows is
never answered wrongly: a device-side assertion (``torch._assert_async``: on a GPU it stops
the program at the next synchronisation) names the bound and the two ways past it: pass
``positions`` (a static, -1 padded list of the masked tokens: its length is then the bound)
or a larger ``max_masked_fraction`` (1.0: B = R, always fits).  On the CPU the rows are
compacted on the host, and the op checks the same bound at its boundary, for free, so that a call that
would stop on a GPU stops on the CPU too.  Callers whose rows are already compact (fastmlm's
model, ``fastmlm.hf.patch``) pass 1.0; the op's default is 0.5 on CUDA (see
``fastmlm.ops.masked_ce.DEFAULT_MAX_MASKED_FRACTION``).

Chunks.  The rows are walked in chunks of about ``CHUNK_ELEMENTS`` fp32 logits, balanced
so that a small problem is one chunk (bigger chunks run faster on the CPU); one chunk of
logits is alive at a time. The math is fp32 (fp64 for fp64 inputs).

``forward_and_grads`` (reduction "mean"/"sum" with gradients) does, per chunk, three
matmuls and no second pass over the vocabulary: z = h·Wᵀ + b, then in place on the same
buffer p = softmax(z) and, with g the weight of each row's loss,

    dz = g · (p · (1 + 2·zl·lse) - (1 - eps) · onehot(t) - eps / V)

then d_rows = dz·W and d_weight += dzᵀ·h (into one fp32 accumulator, chunk after chunk:
a fixed order, so the result is deterministic), d_bias += Σ dz. ``backward`` (reduction
"none") runs the same routine with the incoming row gradients; ``reduced`` (what the op
calls for "mean"/"sum" on the CPU) with one Python number as every row's weight, and sums.

Small calls.  On the CPU, ``reduced`` without gradients is plain differentiable PyTorch; for
R·V up to ``NATIVE_LIMIT`` logits the op lets autograd record it (:func:`differentiable`),
which at such sizes costs less than computing the gradients in the forward and waiting on a
Python autograd node (issue 22).
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import accum_dtype, assert_async
from ..masked_ce import MaskedCEInputs, gather_rows, per_row_terms, reduce_rows
from ..row_bound import bound_message, counted_bound

CHUNK_ELEMENTS = 1 << 25  # fp32 logits per chunk: 128 MiB
COMPACT_DEVICES = ("cpu",)  # device types where the counted rows are compacted (no device to wait for)
# R·V logits up to which autograd may record a reduced loss (see differentiable). Measured, fp32,
# 15% masked, 1 and 2 threads, forward + backward, the recorded route against the fused one:
# 1.3-1.4x faster at 1,280 logits, 1.2x at 9,728, 1.1x at 19,456, even at 37,888, 0.88x at 75,776.
NATIVE_LIMIT = 1 << 15


def why_not(inputs: MaskedCEInputs) -> Optional[str]:
    """Runs every input that passed validation, on any device."""
    return None


def differentiable(inputs: MaskedCEInputs) -> bool:
    """Whether autograd may record :func:`reduced` with ``grads=False`` itself, its gradients then
    being the ones this backend computes: on COMPACT_DEVICES that route is differentiable PyTorch
    (the counted rows' ``index_select``, ``addmm``, ATen's cross-entropy), and on a small call
    autograd's own nodes cost less than the op's Python node waiting with gradients computed in
    the forward (issue 22). The recorded graph holds the (R, V) logits, which the fused route
    never does, hence the bound (R·V <= :data:`NATIVE_LIMIT`, 128 KiB of fp32, about where the
    fused route becomes the faster one)."""
    return inputs.hidden.device.type in COMPACT_DEVICES and inputs.num_rows * inputs.weight.shape[0] <= NATIVE_LIMIT


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
    bound = counted_bound(rows, inputs.max_masked_fraction)
    if inputs.positions is not None or bound >= rows:
        return (inputs, None, *row_values)
    counted = inputs.row_index()[1]
    assert_async("masked_lm_loss", counted.sum() <= bound, bound_message(bound, inputs.num_rows, inputs.max_masked_fraction))
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


def _chunks(rows: int, vocab: int, elements: Optional[int] = None) -> list[slice]:
    """Row ranges of about ``elements`` (default CHUNK_ELEMENTS) logits each, of balanced sizes (none
    for 0 rows; one chunk is ``slice(None)``, so that slicing it is no tensor op)."""
    count = max(1, -(-rows * vocab // max(1, elements or CHUNK_ELEMENTS)))
    if count == 1:
        return [slice(None)] if rows else []
    step = -(-rows // count)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _part(t, chunk: slice):
    """``t[chunk]``: ``t`` itself (no tensor op) for the whole range, or when it is not a tensor."""
    return t if chunk.stop is None or not isinstance(t, Tensor) else t[chunk]


def _plan(inputs: MaskedCEInputs):
    """The rows to project: (slots, index, targets, counted).

    slots: (n,) int64, the op's row of each projected row, or None when every row is
    projected (n = R); index (n,) the token each reads; targets (n,) int64 valid ids (0 where
    a row does not count: ATen's losses take int64 targets only); counted (n,) bool, or None
    when every projected row counts.
    """
    labels, positions = inputs.labels, inputs.positions
    if inputs.hidden.device.type in COMPACT_DEVICES:  # nonzero: no device synchronisation there
        # (Method calls rather than operators and indexing: fewer microseconds of Python on tiny inputs.)
        if positions is None:  # every token is a row: the rows that count are the labelled tokens
            slots = labels.ne(inputs.ignore_index).nonzero().squeeze(1)
            return slots, slots, _to(labels.index_select(0, slots), torch.int64), None
        index, counted = inputs.row_index()
        slots = counted.nonzero().squeeze(1)
        index = index.index_select(0, slots)
        return slots, index, _to(labels.index_select(0, index), torch.int64), None
    index, counted = inputs.row_index()
    return None, index, _to(torch.where(counted, labels[index], 0), torch.int64), counted


def _gather(hidden: Tensor, index: Tensor, counted: Optional[Tensor]) -> Tensor:
    return hidden.index_select(0, index) if counted is None else gather_rows(hidden, index, counted)


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call when it already has that dtype (a tiny call costs microseconds)."""
    return t if t.dtype == dtype else t.to(dtype)


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


def _mask_rows(loss: Tensor, lse: Tensor, correct: Tensor, counted: Optional[Tensor]):
    """Zero the rows that do not count (static plans only: a compacted plan holds none)."""
    if counted is None:
        return loss, lse, correct
    lse = None if lse is None else torch.where(counted, lse, 0.0)
    return torch.where(counted, loss, 0.0), lse, correct & counted


def _row_terms(logits: Tensor, targets: Tensor, label_smoothing: float, z_loss: float, summed: bool):
    """:func:`per_row_terms` (loss, lse, correct) per row, or with ``summed`` their sums over the
    rows, 0-d (loss, None, n_correct): without a z-loss from ATen's cross-entropy, several times
    cheaper than logsumexp on small inputs."""
    if not summed:
        return per_row_terms(logits, targets, label_smoothing, z_loss)
    if z_loss:  # needs lse
        loss, _, correct = per_row_terms(logits, targets, label_smoothing, z_loss)
        return loss.sum(), None, correct.sum()
    loss = F.cross_entropy(logits, targets, reduction="sum", label_smoothing=label_smoothing)
    return loss, None, logits.argmax(dim=1).eq(targets).sum()


def _project(inputs: MaskedCEInputs, index: Tensor, targets: Tensor, counted: Optional[Tensor],
             summed: bool = False):
    """Per projected row (n,): loss, lse (accumulation dtype) and correct (bool), chunk by chunk;
    with ``summed`` (compacted rows only: counted None) the 0-d sums (loss, None, n_correct)."""
    hidden, weight, bias = inputs[:3]
    label_smoothing, z_loss = inputs.label_smoothing, inputs.z_loss
    parts = []
    for chunk in _chunks(index.shape[0], weight.shape[0]):
        logits = _logits(_gather(hidden, _part(index, chunk), _part(counted, chunk)), weight, bias)
        parts.append(_row_terms(logits, _part(targets, chunk), label_smoothing, z_loss, summed))
    if not parts:  # no row
        return _no_rows(hidden, summed)
    return _mask_rows(*(_cat(column) for column in zip(*parts)), counted)


def _no_rows(hidden: Tensor, summed: bool):
    """(loss, lse, correct) of no row: empty (0,) tensors, or with ``summed`` zero sums."""
    empty = hidden.new_zeros(0, dtype=accum_dtype(hidden.dtype))
    if summed:
        return empty.sum(), None, empty.long().sum()
    return empty, empty, empty.bool()


def _cat(parts) -> Optional[Tensor]:
    """The chunks' pieces of one output in order (None where they are None); 0-d pieces (sums) are added."""
    if len(parts) == 1 or parts[0] is None:
        return parts[0]
    return torch.stack(parts).sum() if parts[0].dim() == 0 else torch.cat(parts)


def forward(inputs: MaskedCEInputs) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: loss, lse (fp32; fp64 for fp64 inputs) and correct (bool), (R,) each; 0 where a row does not count."""
    rows = inputs.num_rows
    inputs, bound_slots = _bounded(inputs)
    slots, index, targets, counted = _plan(inputs)
    outs = _project(inputs, index, targets, counted)
    return tuple(unbound_rows(unbound_rows(out, slots, inputs.num_rows), bound_slots, rows) for out in outs)


def _softmax_grad(logits: Tensor, targets: Tensor, g, label_smoothing: float, z_loss: float, summed: bool = False):
    """Per-row (loss, lse, correct) of (n, V) logits, and dz for row weights g, written over
    ``logits`` (returned as the fourth value). g: a (n,) tensor, or one Python float for every row
    (the reduced losses' 1 or 1 / count: fewer tensor ops). With ``summed``: the 0-d sums over the
    rows (loss, None, n_correct).

    In place, no (n, V) temporary: max, exp, sum, scale and the label-smoothing shift are the
    passes over the buffer. (A log-softmax based version needs a second (n, V) buffer, so chunks
    of half the size, and measured ~7% slower at 4k-32k tokens on the CPU.)
    """
    vocab = logits.shape[1]
    per_row = isinstance(g, Tensor)
    target_col = targets.unsqueeze(1)
    target_logit = logits.gather(1, target_col).squeeze(1)
    logit_mean = logits.mean(dim=1) if label_smoothing else None
    top, argmax = logits.max(dim=1)  # the first index among ties, as argmax
    probs = logits.sub_(top.unsqueeze(1)).exp_()
    total = probs.sum(dim=1)
    lse = top.add_(total.log())
    loss = (lse - target_logit).mul_(1.0 - label_smoothing) if label_smoothing else lse - target_logit
    if label_smoothing:
        loss.add_(lse - logit_mean, alpha=label_smoothing)
    if z_loss:
        loss.add_(lse.square(), alpha=z_loss)
    scale = (lse * (2.0 * z_loss)).add_(1.0).div_(total) if z_loss else total.reciprocal_()
    if per_row or g != 1.0:
        scale.mul_(g)
    dz = probs.mul_(scale.unsqueeze(1))  # g * p (* (1 + 2 zl lse))
    if label_smoothing:
        dz.sub_((g * (label_smoothing / vocab)).unsqueeze(1) if per_row else g * (label_smoothing / vocab))
    if per_row:
        dz.scatter_add_(1, target_col, (g * (label_smoothing - 1.0)).unsqueeze(1).to(dz.dtype))
    else:  # the same value at every row's target
        dz.scatter_(1, target_col, g * (label_smoothing - 1.0), reduce="add")
    correct = argmax.eq(targets)
    if summed:
        return loss.sum(), None, correct.sum(), dz
    return loss, lse, correct, dz


def _project_grads(inputs: MaskedCEInputs, index: Tensor, targets: Tensor, counted: Optional[Tensor], g,
                   summed: bool = False):
    """Per projected row (n,) loss, lse, correct (with ``summed``: their 0-d sums, lse None; g a float
    and counted None), and the gradients of Σ g · loss: d_hidden (T, H),
    d_weight (V, H), d_bias (V,) in the input dtype. g: (n,) row weights (0 where a row does not
    count, so its dz is 0 exactly), or one Python float for every row. One (n, V) buffer per
    chunk: the logits, then dz in place."""
    hidden, weight, bias = inputs[:3]
    label_smoothing, z_loss = inputs.label_smoothing, inputs.z_loss
    acc, device = accum_dtype(hidden.dtype), hidden.device
    n, vocab = index.shape[0], weight.shape[0]
    chunks = _chunks(n, vocab)
    losses, lses, corrects, d_rows = [], [], [], []
    d_weight = d_bias = workspace = None
    for chunk in chunks:
        h = _gather(hidden, _part(index, chunk), _part(counted, chunk))
        if workspace is None and len(chunks) > 1:  # the largest chunk is the first
            workspace = torch.empty(chunk.stop - chunk.start, vocab, device=device, dtype=acc)
        logits = _logits(h, weight, bias, out=None if workspace is None else workspace[: h.shape[0]])
        *terms, dz = _softmax_grad(logits, _part(targets, chunk), _part(g, chunk), label_smoothing, z_loss, summed)
        for parts, part in zip((losses, lses, corrects), terms):
            parts.append(part)
        d_bias = dz.sum(0) if d_bias is None else d_bias.add_(dz.sum(0))
        dz = _to(dz, weight.dtype)
        d_rows.append(torch.mm(dz, weight))
        if d_weight is None:
            d_weight = _to(torch.mm(dz.t(), h), acc)
        elif dz.dtype == acc:
            d_weight.addmm_(dz.t(), h)  # in place: no (V, H) temporary per chunk
        else:
            d_weight += (dz.t() @ h).to(acc)
    if not chunks:  # no row to project
        loss, lse, correct = _no_rows(hidden, summed)
        losses, lses, corrects, d_rows = [loss], [lse], [correct], [hidden.new_zeros(0, hidden.shape[1])]
        d_weight, d_bias = torch.zeros(weight.shape, device=device, dtype=acc), torch.zeros(vocab, device=device,
                                                                                             dtype=acc)
    # Duplicated positions sum their gradients. (index_put_ rather than index_add_: many times
    # faster on the CPU here, and deterministic there.)
    d_hidden = torch.zeros(hidden.shape, device=device, dtype=acc).index_put_((index,), _to(_cat(d_rows), acc),
                                                                              accumulate=True)
    loss, lse, correct = _mask_rows(_cat(losses), _cat(lses), _cat(corrects), counted)
    return loss, lse, correct, _to(d_hidden, hidden.dtype), _to(d_weight, weight.dtype), _to(d_bias, weight.dtype)


def forward_and_grads(inputs: MaskedCEInputs, grad_rows: Tensor):
    """Forward outputs and the gradients of Σ grad_rows · loss, in one pass over the logits.

    grad_rows: (R,) the weight of each row's loss (known in the forward: 1 or 1 / count).
    Returns loss, lse (R,) fp32 (fp64 for fp64), correct (R,) bool, d_hidden (T, H),
    d_weight (V, H), d_bias (V,) in the input dtype, all contiguous.
    """
    rows = inputs.num_rows
    inputs, bound_slots, grad_rows = _bounded(inputs, grad_rows)
    slots, index, targets, counted = _plan(inputs)
    g = grad_rows.to(accum_dtype(inputs.hidden.dtype))
    if slots is not None:
        g = g[slots]
    elif counted is not None:  # rows that do not count get dz = 0 exactly, whatever their logits
        g = torch.where(counted, g, 0.0)
    *outs, d_hidden, d_weight, d_bias = _project_grads(inputs, index, targets, counted, g)
    outs = (unbound_rows(unbound_rows(out, slots, inputs.num_rows), bound_slots, rows) for out in outs)
    return (*outs, d_hidden, d_weight, d_bias)


def reduced(inputs: MaskedCEInputs, mean: bool, grads: bool):
    """The mean (or sum) of the row losses, in one pass: (loss 0-d, n_correct 0-d int64, d_hidden,
    d_weight, d_bias), the gradients None unless ``grads``; see :func:`fastmlm.ops.masked_ce.reduce_rows`.

    On COMPACT_DEVICES the count of rows is known on the host once they are compacted, so each
    row's weight is one Python number and no (R,) row tensor is built or scattered back.
    """
    if inputs.hidden.device.type not in COMPACT_DEVICES:
        return reduce_rows(sys.modules[__name__], inputs, mean, grads)
    _, index, targets, _ = _plan(inputs)
    g = 1.0 / max(index.shape[0], 1) if mean else 1.0
    if grads:
        loss, _, correct, *grad_tensors = _project_grads(inputs, index, targets, None, g, summed=True)
    elif index.shape[0] == 0:  # no row counts: 0, on every input's graph (see differentiable)
        acc = accum_dtype(inputs.hidden.dtype)
        loss, correct = sum(t[:0].sum(dtype=acc) for t in inputs[:3] if t is not None), index.new_zeros(())
        grad_tensors = (None, None, None)
    else:
        (loss, _, correct), grad_tensors = _project(inputs, index, targets, None, summed=True), (None, None, None)
    return (loss * g if mean else loss), correct, *grad_tensors


def backward(inputs: MaskedCEInputs, lse: Tensor, grad_rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum(grad_rows * loss): d_hidden (T, H), d_weight (V, H), d_bias (V,) in the input dtype.

    Recomputes each chunk's logits once (the saved lse is not needed: the same pass finds it).
    """
    return forward_and_grads(inputs, grad_rows)[3:]
