"""Masked-LM loss: gather masked rows, project to the vocabulary, cross-entropy.

    hidden (T, H) --gather rows--> (R, H) --(· Wᵀ + b)--> logits (R, V) --> CE vs labels
                      ^ only the masked positions; fast backends never hold (R, V)

Inputs
  hidden    (..., H) fp16/bf16/fp32/fp64, flattened to (T, H)
  weight    (V, H) same dtype (the tied word-embedding matrix)
  bias      (V,) or None
  labels    (...) int64, same leading shape as hidden: the target token id of
            each masked position, ``ignore_index`` elsewhere
  positions optional (R,) int index into the T tokens, padded with -1: a
            static-length list of the masked positions (R does not change from
            step to step); without it every token is a row (R = T)

A row counts when its position is >= 0 and its label is not ``ignore_index``.
Per counted row, with z the logits, lse = logsumexp(z), t the target, eps the
label smoothing and zl the z-loss weight:

    loss = (1 - eps) * (lse - z[t]) + eps * (lse - mean(z)) + zl * lse²

A row that does not count never reaches the loss or the gradients, whatever its
hidden state holds (NaN included); a NaN in a counted row makes the loss NaN.
A hidden size of 0 is allowed: the logits are then the bias (or zeros).

``reduction``: "mean" (over counted rows; 0 when none count), "sum", or "none"
(per row, shaped like ``positions`` or ``labels``, 0 at rows that do not count).
The loss is fp32, or fp64 for fp64 inputs (computed in fp64 throughout, so
``torch.autograd.gradcheck`` applies). ``return_accuracy`` also returns the
number of counted rows whose argmax (first index among ties) is the target, an
int64 0-d tensor.

Backends: ``reference`` (below), ``torch`` (row chunks), ``triton`` (kernels/masked_ce.py,
launched by kernels/masked_ce_launch.py), ``cuda`` (csrc/); the non-reference ones run as
custom ops (:mod:`fastmlm.ops.masked_ce_ops`), and below those every backend receives one
:class:`MaskedCEInputs`:

- ``fastmlm::masked_lm_loss_reduced`` when the loss is reduced ("mean", "sum") and an input
  needs gradients: the backend computes d_hidden, d_weight and d_bias during the forward
  (the weight of each row, 1 or 1 / count, is known there), and the backward only
  multiplies them by grad_output: one pass over the vocabulary. A backend may have its own
  ``reduced(inputs, mean, grads)`` (the torch backend on the CPU: the count is known on the
  host, so no (R,) row tensors); else :func:`reduce_rows` drives its ``forward_and_grads``;
- ``fastmlm::masked_lm_loss_fwd`` / ``_bwd`` otherwise (reduction "none", or no gradients
  wanted: then no gradient is computed or kept). In plain eager mode a reduced loss without
  gradients calls the backend's ``reduced(..., grads=False)`` directly, one call; so does one
  with gradients where the backend says autograd may record that call itself (``differentiable``:
  the CPU torch backend on small calls, whose route is differentiable PyTorch).
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import checks, dispatch
from .dispatch import AUTO_PREFIX, Registry
from .row_bound import bound_message, counted_bound

REGISTRY = Registry(
    "masked_lm_loss",
    {
        "torch": "fastmlm.ops.torch_impl.masked_ce",
        "triton": "fastmlm_kernels.masked_ce_launch",  # the launchers of kernels/masked_ce.py
        "cuda": "fastmlm.ops.cuda_impl.masked_ce",
    },
    work=lambda inputs: inputs.num_rows * inputs.weight.shape[0],  # the reference holds all (R, V) logits
    oracle="fastmlm.ops.torch_impl.oracle:masked_lm_loss",
)
REDUCTIONS = ("mean", "sum", "none")
# max_masked_fraction=None means this, per device type: where the fast backends cannot compact
# the counted rows on the host (CUDA), they project ceil(f·R) + SLACK_ROWS rows, not R. An
# overflow is a device-side assert, which ends the CUDA context, so the default sits well above
# every masking rate in common use (BERT's 15%, 25-40% in later recipes), not at one of them:
# a run at 25% must not fail on a random fluctuation hours in. Pass a tighter fraction (or
# positions) to project fewer rows. Elsewhere no bound is needed. (Read once per call signature.)
DEFAULT_MAX_MASKED_FRACTION = {"cuda": 0.5}
def gather_rows(hidden: Tensor, index: Tensor, counted: Tensor) -> Tensor:
    """hidden[index] with the rows that do not count zeroed: their logits would be dropped
    anyway, but 0 * NaN is NaN, so a NaN there would still reach the weight gradient."""
    return torch.where(counted[:, None], hidden[index], 0)


def row_index(labels: Tensor, positions: Optional[Tensor], ignore_index: int) -> tuple[Tensor, Tensor]:
    """Which token each row reads, and whether the row counts.

    Arguments:
        labels: (T,) int labels of the tokens.
        positions: (R,) int token indices padded with -1, or None (R = T: every token is a row).
        ignore_index: the label of tokens that are not predicted.
    Returns:
        index: (R,) int64 token index of each row, clamped so it is safe to gather.
        counted: (R,) bool, True where the row counts (position >= 0, label != ignore_index).
    """
    if positions is None:
        index = torch.arange(labels.shape[0], device=labels.device)
        return index, labels != ignore_index
    index = positions.long().clamp(0, max(labels.shape[0] - 1, 0))
    if labels.numel() == 0:  # an empty batch: every position is -1
        return index, torch.zeros_like(positions, dtype=torch.bool)
    return index, (positions >= 0) & (labels[index] != ignore_index)


# --------------------------------------------------------------------------- the backends' bundle
class MaskedCEInputs(NamedTuple):
    """The inputs of one masked-LM loss call, as every backend's ``why_not`` / ``forward`` / ``backward`` receives them.

    Built inside the custom ops (whose schemas stay flat) after validation.

    Arguments:
        hidden: (T, H) fp16/bf16/fp32/fp64, any strides (H may be 0).
        weight: (V, H) same dtype.
        bias: (V,) same dtype, or None.
        labels: (T,) int32/int64: target ids, ``ignore_index`` at tokens not predicted.
        positions: (R,) int32/int64 token indices padded with -1, or None (R = T).
        ignore_index: a negative int.
        label_smoothing: eps in [0, 1).
        z_loss: the weight zl >= 0 of lse².
        max_masked_fraction: f in (0, 1]: without positions, at most ``ceil(f·R) + SLACK_ROWS``
            rows may count (fast backends project that static number of rows where they cannot
            compact on the host; more stops the call); 1.0: no bound. Ignored with positions.
    """

    hidden: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    labels: Tensor
    positions: Optional[Tensor]
    ignore_index: int
    label_smoothing: float
    z_loss: float
    max_masked_fraction: float = 1.0

    @property
    def num_rows(self) -> int:
        """R: len(positions), or T without positions."""
        return self.labels.shape[0] if self.positions is None else self.positions.shape[0]

    def row_index(self) -> tuple[Tensor, Tensor]:
        """(index (R,) int64, counted (R,) bool): see :func:`row_index`."""
        return row_index(self.labels, self.positions, self.ignore_index)


def per_row_terms(logits: Tensor, targets: Tensor, label_smoothing: float, z_loss: float):
    """Row losses, lse and argmax-correct flags of (R, V) logits; targets must be valid ids."""
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    loss = lse - target_logit
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - logits.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse.square()
    return loss, lse, logits.argmax(dim=-1) == targets


# --------------------------------------------------------------------------- reference
def masked_lm_loss_reference(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, positions: Optional[Tensor] = None,
    ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0, upcast: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Project every row at once; return per-row (loss, lse, correct), zero where a row does not count.

    hidden (T, H), labels (T,). Computes in fp32 (fp64 for fp64 inputs), or in
    the input dtype with ``upcast=False``. Differentiable by plain autograd.
    """
    acc = checks.accum_dtype(hidden.dtype)
    compute = acc if upcast else hidden.dtype
    index, counted = row_index(labels, positions, ignore_index)
    rows = gather_rows(hidden, index, counted).to(compute)
    logits = rows @ weight.to(compute).t()
    if bias is not None:
        logits = logits + bias.to(compute)
    targets = torch.where(counted, labels[index], 0)
    loss, lse, correct = per_row_terms(logits.to(acc), targets, label_smoothing, z_loss)
    return torch.where(counted, loss, 0.0), torch.where(counted, lse, 0.0), correct & counted


# Reduced losses ("mean", "sum"): the backend computes the gradients during the forward, where
# every chunk of logits is at hand, so the backward only scales them.
def reduce_rows(module, inputs: MaskedCEInputs, mean: bool, grads: bool):
    """The reduced loss from ``module``'s per-row functions (the contract every backend has):
    its ``forward_and_grads(inputs, grad_rows)`` (or forward, then backward) with the weight of
    each row's loss (1, or 1 / count: counted on the device, no host sync), or its ``forward``
    without ``grads``. Returns what a backend's optional ``reduced(inputs, mean, grads)`` returns:
    (loss 0-d, n_correct 0-d int64, d_hidden, d_weight, d_bias), the gradients None without ``grads``."""
    counted = inputs.row_index()[1]
    acc = checks.accum_dtype(inputs.hidden.dtype)
    count = counted.sum().clamp(min=1).to(acc)
    if not grads:
        rows, _, correct = module.forward(inputs)
        grad_tensors = (None, None, None)
    else:
        grad_rows = counted.to(acc) / count if mean else counted.to(acc)
        fused = getattr(module, "forward_and_grads", None)
        if fused is not None:
            rows, _, correct, *grad_tensors = fused(inputs, grad_rows)
        else:
            rows, lse, correct = module.forward(inputs)
            grad_tensors = module.backward(inputs, lse, grad_rows)
    loss = rows.to(acc).sum()
    return (loss / count if mean else loss), correct.sum(), *grad_tensors


def reduced(backend: str, inputs: MaskedCEInputs, mean: bool, grads: bool):
    """``backend``'s ``reduced(inputs, mean, grads)`` where it has one (a shortcut that skips the
    (R,) rows), else :func:`reduce_rows`; under ``"auto:<name>"`` through the dispatcher's fallback chain."""
    def call(module):
        own = getattr(module, "reduced", None)
        return own(inputs, mean, grads) if own is not None else reduce_rows(module, inputs, mean, grads)

    if backend.startswith(AUTO_PREFIX):
        return REGISTRY.run(backend[len(AUTO_PREFIX):], inputs, call)
    return call(REGISTRY.module(backend))



# --------------------------------------------------------------------------- public op
def _validate(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss, max_masked_fraction,
              reduction):
    op = "masked_lm_loss"
    checks.check_tensor(op, "hidden", hidden, dtypes=checks.FLOAT_DTYPES)
    if hidden.dim() < 2:
        checks.fail(op, f"hidden must be (..., hidden_size), got shape {tuple(hidden.shape)}")
    checks.check_tensor(op, "weight", weight, ndim=2, dtypes=(hidden.dtype,), device=hidden.device)
    if weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        checks.fail(op, f"weight must be (vocab_size > 0, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if bias is not None:
        checks.check_tensor(op, "bias", bias, ndim=1, dtypes=(hidden.dtype,), device=hidden.device)
        if bias.shape[0] != weight.shape[0]:
            checks.fail(op, f"bias has {bias.shape[0]} entries but the vocabulary has {weight.shape[0]}")
    checks.check_tensor(op, "labels", labels, dtypes=checks.INDEX_DTYPES, device=hidden.device)
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        checks.fail(op, f"labels shape {tuple(labels.shape)} must match hidden's leading shape {tuple(hidden.shape[:-1])}")
    if positions is not None:
        checks.check_tensor(op, "positions", positions, ndim=1, dtypes=checks.INDEX_DTYPES, device=hidden.device)
    checks.check_real(op, "label_smoothing", label_smoothing, 0.0, 1.0)
    checks.check_real(op, "z_loss", z_loss, 0.0)
    if reduction not in REDUCTIONS:
        checks.fail(op, f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral) or \
            not -2**63 <= ignore_index < 0:
        checks.fail(op, "ignore_index must be a negative int (an int64 label no token id can equal), "
                        f"got {ignore_index!r}")
    if max_masked_fraction is not None and (
            isinstance(max_masked_fraction, bool) or not isinstance(max_masked_fraction, numbers.Real)
            or not 0 < max_masked_fraction <= 1):  # NaN fails the comparison too
        checks.fail(op, "max_masked_fraction must be None or a number in (0, 1] (the share of the rows that may "
                        f"count without positions; 1.0: no bound), got {max_masked_fraction!r}")


def masked_lm_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    *,
    positions: Optional[Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    return_accuracy: bool = False,
    backend: str = "auto",
    max_masked_fraction: Optional[float] = None,
):
    """Masked-LM cross-entropy over the masked rows only (see the module docstring).

    Arguments:
        hidden: (..., hidden_size) fp16/bf16/fp32/fp64, any strides; flattened to (T, hidden_size).
        weight: (vocab_size, hidden_size), hidden's dtype (the tied word embeddings).
        bias: (vocab_size,) or None.
        labels: hidden.shape[:-1], int32/int64: the target id of each masked token,
            ``ignore_index`` elsewhere.
        positions: (R,) int32/int64 indices into the T flattened tokens, padded with -1 (a
            static-length list of the masked tokens), or None: every token is a row (R = T).
        ignore_index: a negative label marking tokens that are not predicted.
        label_smoothing: eps in [0, 1). z_loss: the weight of lse², >= 0.
        reduction: "mean" over counted rows (0 when none count), "sum", or "none".
        return_accuracy: also return how many counted rows predict their target.
        backend: "auto" | "reference" | "torch" | "triton" | "cuda".
        max_masked_fraction: without positions, the share f in (0, 1] of the R rows that may
            count (labels != ignore_index): at most ``ceil(f·R) + 64`` rows, so that a fast
            backend that cannot compact on the host (CUDA) projects that many rows, not R.
            More counted rows stop the call with an error naming the bound (on CUDA a
            device-side assertion, no host sync; the reference does not check). 1.0: no bound,
            for rows already compacted. None: 0.5 for CUDA inputs, 1.0 elsewhere
            (``DEFAULT_MAX_MASKED_FRACTION``). Ignored with positions (their length is the bound).
    Returns:
        loss: fp32 (fp64 for fp64 inputs): a 0-d tensor, or with reduction="none" one value per
            row, shaped like positions (or labels), 0 at rows that do not count.
        n_correct [with return_accuracy]: int64 0-d tensor, the counted rows whose argmax
            (first index among ties) is the target.
    """
    key = dispatch.call_key(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss,
                            max_masked_fraction, reduction, backend)
    plan = REGISTRY.memo(key, lambda: _plan(hidden, weight, bias, labels, positions, ignore_index, label_smoothing,
                                            z_loss, max_masked_fraction, reduction, backend))
    # Reshaped only when needed: even a no-op reshape is a dispatcher round trip per tensor.
    labels1d = labels if labels.dim() == 1 else labels.reshape(-1)
    hidden2d = hidden if hidden.dim() == 2 else hidden.reshape(labels1d.shape[0], hidden.shape[-1])  # not -1:
    # ambiguous when hidden_size is 0
    inputs = MaskedCEInputs(hidden2d, weight, bias, labels1d, positions, ignore_index, plan.label_smoothing,
                            plan.z_loss, plan.max_masked_fraction)
    _check_values(inputs, plan)
    name = plan.name
    if plan.one_call and dispatch.no_modes():  # dispatch.plain_eager, its signature part memoised
        # The common call, a mean (or sum) in plain eager mode: one backend call. Gradients, when
        # wanted, are computed in its forward and wait on the op's autograd node, or (plan.native)
        # autograd records the forward-only call itself.
        mean = reduction == "mean"
        if plan.wants_grad and not plan.native and torch.is_grad_enabled():
            loss, correct = _ops._EagerReducedLoss.apply(hidden2d, weight, bias, _ops.ReducedCall(inputs, mean, name))
        else:  # no gradient wanted, or a backend whose forward autograd records itself (plan.native)
            loss, correct = reduced(name, inputs, mean, grads=False)[:2]
        return (loss, correct) if return_accuracy else loss

    if not plan.launches:
        loss, correct = _small_cases(inputs, name, reduction)
    elif reduction == "none":
        loss, correct = _per_row(inputs, name)
    else:  # traced, or under a mode: through the custom ops
        mean = reduction == "mean"
        if _needs_grad(hidden, weight, bias):
            loss, correct = _ops._masked_lm_loss_reduced(*inputs, mean, name)[:2]
        else:  # no gradients: the forward-only op, reduced here
            rows, _, correct = _ops._masked_lm_loss_fwd(*inputs, name)
            loss, correct = _reduce(rows, correct, inputs.row_index()[1], mean)
    if reduction == "none":
        loss = loss.reshape(labels.shape if positions is None else positions.shape)
    return (loss, correct) if return_accuracy else loss


class _Plan(NamedTuple):
    """What :func:`masked_lm_loss` derives from a call's metadata alone, memoised per signature.

    name: the backend :meth:`Registry.select` returns ("reference", "torch", "auto:torch", ...).
    label_smoothing, z_loss, max_masked_fraction: the options as floats (the fraction resolved).
    row_bound: the counted rows the fast backends allow without positions, where the boundary
        checks it (a fraction below 1, not the reference); None otherwise.
    launches: a backend kernel runs (not the reference, and tokens, rows and hidden size > 0).
    one_call: ``launches``, a reduced loss, plain tensor types: the eager path of one ``reduced`` call.
    wants_grad: hidden, weight or bias requires grad (their flags are part of the signature).
    native: autograd may record the backend's ``reduced(..., grads=False)`` itself
        (:meth:`~dispatch.Registry.differentiable`): no Python autograd node, no gradients in the forward.
    native_ids: :func:`checks.native_reads` of (labels, positions): the C helper reads their values.
    """

    name: str
    label_smoothing: float
    z_loss: float
    max_masked_fraction: float
    row_bound: Optional[int]
    launches: bool
    one_call: bool
    wants_grad: bool
    native: bool
    native_ids: tuple


def _plan(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss, max_masked_fraction,
          reduction, backend) -> _Plan:
    """The :class:`_Plan` of a call (validating its metadata on the way)."""
    _validate(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss, max_masked_fraction,
              reduction)
    if max_masked_fraction is None:
        max_masked_fraction = DEFAULT_MAX_MASKED_FRACTION.get(hidden.device.type, 1.0)
    tokens = labels.numel()
    bundle = MaskedCEInputs(hidden.reshape(tokens, hidden.shape[-1]), weight, bias, labels.reshape(-1), positions,
                            ignore_index, float(label_smoothing), float(z_loss), float(max_masked_fraction))
    name = REGISTRY.select(backend, hidden.device.type, bundle)
    fast = name != "reference"
    bounded = positions is None and bundle.max_masked_fraction < 1.0 and fast
    launches = fast and tokens > 0 and bundle.num_rows > 0 and hidden.shape[-1] > 0
    return _Plan(name, bundle.label_smoothing, bundle.z_loss, bundle.max_masked_fraction,
                 counted_bound(tokens, bundle.max_masked_fraction) if bounded else None, launches,
                 launches and reduction != "none" and dispatch.plain_types(hidden, weight, bias, labels, positions),
                 any(t is not None and t.requires_grad for t in (hidden, weight, bias)),
                 launches and REGISTRY.differentiable(name, bundle),
                 (checks.native_reads(bundle.labels), positions is not None and checks.native_reads(positions)))


def _check_values(inputs: MaskedCEInputs, plan: _Plan) -> None:
    """The checks that read values, on every call: positions and labels in range, and (where the
    boundary checks it) the row bound. On a GPU device-side assertions, no host sync."""
    labels, positions, ignore_index = inputs.labels, inputs.positions, inputs.ignore_index
    tokens, vocab = labels.shape[0], inputs.weight.shape[0]
    native_labels, native_positions = plan.native_ids
    if positions is not None:
        checks.check_ids("masked_lm_loss", positions, -1, tokens, lambda: f"positions must lie in [-1, {tokens})",
                         native=native_positions)
    checks.check_ids("masked_lm_loss", labels, 0, vocab,
                     lambda: f"labels must be ignore_index={ignore_index} or lie in [0, {vocab})", allowed=ignore_index,
                     native=native_labels)
    if plan.row_bound is not None and checks.host_readable(labels):
        # The row bound the fast backends assert on a GPU, checked here where the count is free to
        # read: at the boundary, so that no backend's failure (and fallback) can hide it. (The
        # reference projects every row: it has no bound.)
        if int(labels.ne(ignore_index).sum()) > plan.row_bound:
            raise RuntimeError("fastmlm.ops.masked_lm_loss: "
                               + bound_message(plan.row_bound, tokens, inputs.max_masked_fraction))


def _needs_grad(*tensors) -> bool:
    """Whether autograd will want gradients of any of ``tensors`` (shapes and flags only, no sync)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _reduce(rows: Tensor, correct: Tensor, counted: Tensor, mean: bool) -> tuple[Tensor, Tensor]:
    """(loss 0-d, n_correct 0-d) from per-row losses (R,) and flags (R,): the sum, or the mean over counted rows."""
    loss = rows.sum()
    return (loss / counted.sum().clamp(min=1) if mean else loss), correct.sum()


def _per_row(inputs: MaskedCEInputs, name: str) -> tuple[Tensor, Tensor]:
    """(loss (R,), n_correct 0-d) of reduction "none" through the backend's forward (and its backward)."""
    if not dispatch.plain_eager(*inputs[:5]):
        rows, _, correct = _ops._masked_lm_loss_fwd(*inputs, name)
    elif _needs_grad(*inputs[:3]):
        rows, _, correct = _ops._EagerLoss.apply(*inputs, name)
    else:
        rows, _, correct = REGISTRY.module(name).forward(inputs)
    acc = checks.accum_dtype(inputs.hidden.dtype)
    return (rows if rows.dtype == acc else rows.to(acc)), correct.sum()


def _small_cases(inputs: MaskedCEInputs, name: str, reduction: str) -> tuple[Tensor, Tensor]:
    """(loss, n_correct) where no kernel is launched: no token or no row (a zero loss, still
    differentiable), the reference, or a hidden size of 0 (the logits are the bias)."""
    hidden2d, weight, bias = inputs[:3]
    counted = inputs.row_index()[1]
    if inputs.labels.shape[0] == 0 or inputs.num_rows == 0:
        # Sums of empty slices: 0 whatever the inputs hold (0 * NaN would be NaN), and on
        # every input's graph, so each gets a zero gradient.
        zero = sum(t[:0].sum() for t in (hidden2d, weight, bias) if t is not None)
        rows, correct = zero.expand(inputs.num_rows), counted
    else:
        rows, _, correct = masked_lm_loss_reference(*inputs[:8])  # the reference projects every row: no bound
    rows = rows.to(checks.accum_dtype(hidden2d.dtype))
    if reduction == "none":
        return rows, correct.sum()
    return _reduce(rows, correct, counted, reduction == "mean")


# The custom ops and autograd Functions (registered on import); last, as they import this module.
from . import masked_ce_ops as _ops  # noqa: E402
