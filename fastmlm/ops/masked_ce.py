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

Backends: ``reference`` (below), ``torch`` (row chunks), ``triton`` (kernels/masked_ce.py),
``cuda`` (csrc/); the non-reference ones run as custom ops, and below those every backend
receives one :class:`MaskedCEInputs`:

- ``fastmlm::masked_lm_loss_reduced`` when the loss is reduced ("mean", "sum") and an input
  needs gradients: the backend's ``forward_and_grads`` computes d_hidden, d_weight and
  d_bias during the forward (the weight of each row, 1 or 1 / count, is known there), and
  the backward only multiplies them by grad_output: one pass over the vocabulary;
- ``fastmlm::masked_lm_loss_fwd`` / ``_bwd`` otherwise (reduction "none", or no gradients
  wanted: then no gradient is computed or kept).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import checks, dispatch
from .dispatch import AUTO_PREFIX, Registry

REGISTRY = Registry(
    "masked_lm_loss",
    {
        "torch": "fastmlm.ops.torch_impl.masked_ce",
        "triton": "fastmlm_kernels.masked_ce",
        "cuda": "fastmlm.ops.cuda_impl.masked_ce",
    },
    work=lambda inputs: inputs.num_rows * inputs.weight.shape[0],  # the reference holds all (R, V) logits
    oracle="fastmlm.ops.torch_impl.oracle:masked_lm_loss",
)
REDUCTIONS = ("mean", "sum", "none")


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
    """

    hidden: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    labels: Tensor
    positions: Optional[Tensor]
    ignore_index: int
    label_smoothing: float
    z_loss: float

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
    target_logit = logits.gather(1, targets[:, None])[:, 0]
    loss = (1.0 - label_smoothing) * (lse - target_logit)
    if label_smoothing:
        loss = loss + label_smoothing * (lse - logits.mean(dim=-1))
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


# --------------------------------------------------------------------------- custom ops
# Flat schemas, as torch.library needs; the bundle is built here, below them.
@torch.library.custom_op("fastmlm::masked_lm_loss_fwd", mutates_args=())
def _masked_lm_loss_fwd(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, positions: Optional[Tensor],
    ignore_index: int, label_smoothing: float, z_loss: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    inputs = MaskedCEInputs(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss)
    return REGISTRY.module(backend).forward(inputs)


@_masked_lm_loss_fwd.register_fake
def _(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss, backend):
    num_rows = labels.shape[0] if positions is None else positions.shape[0]
    loss = hidden.new_empty(num_rows, dtype=checks.accum_dtype(hidden.dtype))
    return loss, torch.empty_like(loss), hidden.new_empty(num_rows, dtype=torch.bool)


@torch.library.custom_op("fastmlm::masked_lm_loss_bwd", mutates_args=())
def _masked_lm_loss_bwd(
    grad_rows: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
    positions: Optional[Tensor], lse: Tensor, ignore_index: int, label_smoothing: float, z_loss: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    inputs = MaskedCEInputs(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss)
    return REGISTRY.module(backend).backward(inputs, lse, grad_rows)


@_masked_lm_loss_bwd.register_fake
def _(grad_rows, hidden, weight, bias, labels, positions, lse, ignore_index, label_smoothing, z_loss, backend):
    # Every backend returns contiguous gradients, whatever the strides of its inputs.
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss, backend = inputs
    _, lse, correct = output
    ctx.mark_non_differentiable(lse, correct)
    ctx.save_for_backward(hidden, weight, bias, labels, positions, lse)
    ctx.options = (ignore_index, label_smoothing, z_loss, backend)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_rows, _dlse, _dcorrect):
    hidden, weight, bias, labels, positions, lse = ctx.saved_tensors
    d_hidden, d_weight, d_bias = _masked_lm_loss_bwd(grad_rows.contiguous(), hidden, weight, bias, labels,
                                                     positions, lse, *ctx.options)
    return d_hidden, d_weight, d_bias if ctx.has_bias else None, None, None, None, None, None, None


_masked_lm_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerLoss(torch.autograd.Function):
    """``fastmlm::masked_lm_loss_fwd`` with its autograd rule, without the custom op's dispatcher
    round trips (the plain eager path; see :func:`fastmlm.ops.dispatch.plain_eager`)."""

    @staticmethod
    def forward(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss, backend):
        inputs = MaskedCEInputs(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss)
        return REGISTRY.module(backend).forward(inputs)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


# Reduced losses ("mean", "sum") with gradients: the backend computes the gradients during the
# forward, where every chunk of logits is at hand, so the backward only scales them.
def forward_and_grads(backend: str, inputs: MaskedCEInputs, grad_rows: Tensor):
    """Run ``backend``'s ``forward_and_grads(inputs, grad_rows)``, or its forward then its backward
    where it has none; under ``"auto:<name>"`` through the dispatcher's fallback chain."""
    def call(module):
        fused = getattr(module, "forward_and_grads", None)
        if fused is not None:
            return fused(inputs, grad_rows)
        loss, lse, correct = module.forward(inputs)
        return (loss, lse, correct, *module.backward(inputs, lse, grad_rows))

    if backend.startswith(AUTO_PREFIX):
        return REGISTRY.run(backend[len(AUTO_PREFIX):], inputs, call)
    return call(REGISTRY.module(backend))


@torch.library.custom_op("fastmlm::masked_lm_loss_reduced", mutates_args=())
def _masked_lm_loss_reduced(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, positions: Optional[Tensor],
    ignore_index: int, label_smoothing: float, z_loss: float, mean: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _reduced(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss, mean, backend)


def _reduced(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss, mean, backend):
    """(loss 0-d, correct (R,) bool, d_hidden, d_weight, d_bias): the mean (or sum) of the row
    losses and its gradients, computed in the forward."""
    inputs = MaskedCEInputs(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss)
    counted = inputs.row_index()[1]
    acc = checks.accum_dtype(hidden.dtype)
    count = counted.sum().clamp(min=1).to(acc)  # stays on the device
    grad_rows = counted.to(acc) / count if mean else counted.to(acc)
    rows, _, correct, d_hidden, d_weight, d_bias = forward_and_grads(backend, inputs, grad_rows)
    loss = rows.to(acc).sum()
    return (loss / count if mean else loss), correct, d_hidden, d_weight, d_bias


@_masked_lm_loss_reduced.register_fake
def _(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss, mean, backend):
    num_rows = labels.shape[0] if positions is None else positions.shape[0]
    return (hidden.new_empty((), dtype=checks.accum_dtype(hidden.dtype)), hidden.new_empty(num_rows, dtype=torch.bool),
            hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0]))


def _setup_reduced(ctx, inputs, output):
    hidden, weight, bias, labels, positions, *options = inputs
    _, correct, d_hidden, d_weight, d_bias = output
    ctx.mark_non_differentiable(correct, d_hidden, d_weight, d_bias)
    ctx.set_materialize_grads(False)  # else autograd builds zero "gradients" of the gradients (V x H)
    # The gradients ride on ctx, not in save_for_backward, so that the first backward can scale
    # them in place and hand them over without a copy (a saved d_weight is V x H). The inputs are
    # saved (they are alive anyway) for a second backward through a retained graph.
    ctx.grads = [d_hidden, d_weight, d_bias if bias is not None else None]
    ctx.save_for_backward(hidden, weight, bias, labels, positions)
    ctx.options = options


def _backward_reduced(ctx, grad_loss, *_unused):
    if grad_loss is None:  # the loss was not used (grads are not materialised): no gradient
        return (None,) * 10
    grads, ctx.grads = ctx.grads, None
    if grads is None:  # a second backward (retain_graph=True): the first one used the gradients up
        hidden, weight, bias, labels, positions = ctx.saved_tensors
        grads = list(_masked_lm_loss_reduced(hidden, weight, bias, labels, positions, *ctx.options)[2:])
        if bias is None:
            grads[2] = None
    # Eager: scale in place, and the tensors become the .grad without a copy. Traced (torch.compile,
    # opcheck: functional or fake tensors), a backward may not mutate forward outputs: out of place.
    eager = type(grad_loss) is torch.Tensor
    # loss.backward() passes 1: on the CPU, reading it is no device sync, and it saves a pass over V x H.
    unit = eager and grad_loss.device.type == "cpu" and grad_loss.item() == 1.0
    grads = [None if g is None or not need else g if unit else g.mul_(grad_loss) if eager else g * grad_loss
             for g, need in zip(grads, ctx.needs_input_grad)]
    return (*grads, None, None, None, None, None, None, None)


_masked_lm_loss_reduced.register_autograd(_backward_reduced, setup_context=_setup_reduced)


class _EagerReducedLoss(torch.autograd.Function):
    """``fastmlm::masked_lm_loss_reduced`` with its autograd rule, without the custom op's round trips."""

    forward = staticmethod(_reduced)
    setup_context = staticmethod(_setup_reduced)
    backward = staticmethod(_backward_reduced)


# --------------------------------------------------------------------------- public op
def _validate(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss, reduction):
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
    if ignore_index >= 0:
        checks.fail(op, f"ignore_index must be negative so it cannot be a token id, got {ignore_index}")


def _bundle(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss) -> MaskedCEInputs:
    """The backends' bundle of validated inputs: hidden as (T, H), labels as (T,)."""
    labels1d = labels.reshape(-1)
    hidden2d = hidden.reshape(labels1d.shape[0], hidden.shape[-1])  # not -1: ambiguous when hidden_size is 0
    return MaskedCEInputs(hidden2d, weight, bias, labels1d, positions, ignore_index, float(label_smoothing),
                          float(z_loss))


def _needs_grad(*tensors) -> bool:
    """Whether autograd will want gradients of any of ``tensors`` (shapes and flags only, no sync)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
    Returns:
        loss: fp32 (fp64 for fp64 inputs): a 0-d tensor, or with reduction="none" one value per
            row, shaped like positions (or labels), 0 at rows that do not count.
        n_correct [with return_accuracy]: int64 0-d tensor, the counted rows whose argmax
            (first index among ties) is the target.
    """
    def plan():  # what the signature alone decides, memoised: the metadata checks and the backend
        _validate(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss, reduction)
        return REGISTRY.select(backend, hidden.device.type, _bundle(hidden, weight, bias, labels, positions,
                                                                    ignore_index, label_smoothing, z_loss))

    key = dispatch.call_key(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss,
                            reduction, backend)
    name = REGISTRY.memo(key, plan)
    inputs = _bundle(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss)
    hidden2d, _, _, labels1d = inputs[:4]
    out_shape = labels.shape if positions is None else positions.shape
    vocab, tokens = weight.shape[0], labels1d.shape[0]
    if positions is not None:  # value checks: every call
        checks.check_ids("masked_lm_loss", positions, -1, tokens, f"positions must lie in [-1, {tokens})")
    checks.check_ids("masked_lm_loss", labels1d, 0, vocab,
                     f"labels must be ignore_index={ignore_index} or lie in [0, {vocab})", allowed=ignore_index)
    index, counted = inputs.row_index()

    if tokens == 0 or index.numel() == 0:  # nothing to project: zero loss, still differentiable
        # Sums of empty slices: 0 whatever the inputs hold (0 * NaN would be NaN), and on
        # every input's graph, so each gets a zero gradient.
        zero = sum(t[:0].sum() for t in (hidden2d, weight, bias) if t is not None)
        rows = zero.expand(index.shape[0])
        correct = counted
    elif name == "reference" or hidden.shape[-1] == 0:  # hidden size 0: the logits are the bias, nothing to launch
        rows, _, correct = masked_lm_loss_reference(hidden2d, weight, bias, labels1d, positions,
                                                    ignore_index, label_smoothing, z_loss)
    elif reduction != "none" and _needs_grad(hidden, weight, bias):
        reduced = _EagerReducedLoss.apply if dispatch.plain_eager(*inputs[:5]) else _masked_lm_loss_reduced
        loss, correct, _, _, _ = reduced(*inputs, reduction == "mean", name)
        return (loss, correct.sum()) if return_accuracy else loss
    elif not dispatch.plain_eager(*inputs[:5]):
        rows, _, correct = _masked_lm_loss_fwd(*inputs, name)
    elif _needs_grad(hidden, weight, bias):
        rows, _, correct = _EagerLoss.apply(*inputs, name)
    else:
        rows, _, correct = REGISTRY.module(name).forward(inputs)
    rows = rows.to(checks.accum_dtype(hidden.dtype))
    if reduction == "none":
        loss = rows.reshape(out_shape)
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() / counted.sum().clamp(min=1)
    return (loss, correct.sum()) if return_accuracy else loss
