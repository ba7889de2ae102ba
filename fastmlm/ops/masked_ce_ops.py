"""The custom-op and autograd layer of masked_lm_loss (the contract, the reference and the public
function live in :mod:`fastmlm.ops.masked_ce`).

- ``fastmlm::masked_lm_loss_fwd`` / ``_bwd``: per-row losses (reduction "none", or no gradients
  wanted under tracing) and their backward;
- ``fastmlm::masked_lm_loss_reduced``: the reduced loss with its gradients computed in the
  forward (:func:`fastmlm.ops.masked_ce.reduced`); the backward only scales them;
- :class:`_EagerLoss` / :class:`_EagerReducedLoss`: the same autograd rules for plain eager calls,
  without the custom ops' dispatcher round trips (see :func:`fastmlm.ops.dispatch.plain_eager`).

The custom ops take flat schemas, as torch.library needs; the bundle is built below them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import checks
from .masked_ce import REGISTRY, MaskedCEInputs, reduced


@torch.library.custom_op("fastmlm::masked_lm_loss_fwd", mutates_args=())
def _masked_lm_loss_fwd(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, positions: Optional[Tensor],
    ignore_index: int, label_smoothing: float, z_loss: float, max_masked_fraction: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    inputs = MaskedCEInputs(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss,
                            max_masked_fraction)
    return REGISTRY.module(backend).forward(inputs)


@_masked_lm_loss_fwd.register_fake
def _(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss, max_masked_fraction, backend):
    num_rows = labels.shape[0] if positions is None else positions.shape[0]
    loss = hidden.new_empty(num_rows, dtype=checks.accum_dtype(hidden.dtype))
    return loss, torch.empty_like(loss), hidden.new_empty(num_rows, dtype=torch.bool)


@torch.library.custom_op("fastmlm::masked_lm_loss_bwd", mutates_args=())
def _masked_lm_loss_bwd(
    grad_rows: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
    positions: Optional[Tensor], lse: Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
    max_masked_fraction: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    inputs = MaskedCEInputs(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss,
                            max_masked_fraction)
    return REGISTRY.module(backend).backward(inputs, lse, grad_rows)


@_masked_lm_loss_bwd.register_fake
def _(grad_rows, hidden, weight, bias, labels, positions, lse, ignore_index, label_smoothing, z_loss,
      max_masked_fraction, backend):
    # Every backend returns contiguous gradients, whatever the strides of its inputs.
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output):
    _, lse, correct = output
    ctx.mark_non_differentiable(lse, correct)
    ctx.save_for_backward(*inputs[:5], lse)  # hidden, weight, bias, labels, positions
    ctx.options = inputs[5:]  # ignore_index, label_smoothing, z_loss, max_masked_fraction, backend
    ctx.has_bias = inputs[2] is not None


def _backward(ctx, grad_rows, _dlse, _dcorrect):
    hidden, weight, bias, labels, positions, lse = ctx.saved_tensors
    d_hidden, d_weight, d_bias = _masked_lm_loss_bwd(grad_rows.contiguous(), hidden, weight, bias, labels,
                                                     positions, lse, *ctx.options)
    return d_hidden, d_weight, d_bias if ctx.has_bias else None, None, None, *(None for _ in ctx.options)


_masked_lm_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerLoss(torch.autograd.Function):
    """``fastmlm::masked_lm_loss_fwd`` with its autograd rule, without the custom op's dispatcher
    round trips (the plain eager path; see :func:`fastmlm.ops.dispatch.plain_eager`)."""

    @staticmethod
    def forward(ctx, *inputs):  # with ctx, not a separate setup_context: see _EagerReducedLoss
        output = REGISTRY.module(inputs[-1]).forward(MaskedCEInputs(*inputs[:-1]))
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_backward)


@torch.library.custom_op("fastmlm::masked_lm_loss_reduced", mutates_args=())
def _masked_lm_loss_reduced(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, positions: Optional[Tensor],
    ignore_index: int, label_smoothing: float, z_loss: float, max_masked_fraction: float, mean: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss 0-d, n_correct 0-d int64, d_hidden, d_weight, d_bias): the mean (or sum) of the row
    losses and its gradients, computed in the forward."""
    inputs = MaskedCEInputs(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss,
                            max_masked_fraction)
    return reduced(backend, inputs, mean, grads=True)


@_masked_lm_loss_reduced.register_fake
def _(hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss, max_masked_fraction, mean,
      backend):
    return (hidden.new_empty((), dtype=checks.accum_dtype(hidden.dtype)), hidden.new_empty((), dtype=torch.int64),
            hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0]))


def _setup_reduced(ctx, inputs, output):
    _, correct, *grads = output
    ctx.mark_non_differentiable(correct, *grads)
    _keep_grads(ctx, grads, inputs[2] is not None)
    ctx.save_for_backward(*inputs[:5])  # a second backward through a retained graph recomputes from them
    ctx.options = inputs[5:]


def _keep_grads(ctx, grads, has_bias: bool):
    """Hold the gradients computed in the forward for :func:`_scaled_grads`.

    They ride on ctx, not in save_for_backward, so that the first backward can scale them in
    place and hand them over without a copy (a saved d_weight is V x H)."""
    ctx.set_materialize_grads(False)  # else autograd builds zero "gradients" of the gradients (V x H)
    d_hidden, d_weight, d_bias = grads
    ctx.grads = [d_hidden, d_weight, d_bias if has_bias else None]


def _scaled_grads(ctx, grad_loss: Tensor, recompute) -> list:
    """(d_hidden, d_weight, d_bias) times ``grad_loss``, None where not needed: the ones kept by
    :func:`_keep_grads`, or on a second backward (retain_graph=True: the first used them up)
    ``recompute()``'s."""
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        grads = recompute()
    # Eager: scale in place, and the tensors become the .grad without a copy. Traced (torch.compile,
    # opcheck: functional or fake tensors), a backward may not mutate forward outputs: out of place.
    eager = type(grad_loss) is torch.Tensor
    # loss.backward() passes 1: on the CPU, reading it is no device sync, and it saves a pass over V x H.
    if eager and grad_loss.is_cpu and grad_loss.item() == 1.0:
        return [g if need else None for g, need in zip(grads, ctx.needs_input_grad)]
    return [None if g is None or not need else g.mul_(grad_loss) if eager else g * grad_loss
            for g, need in zip(grads, ctx.needs_input_grad)]


def _backward_reduced(ctx, grad_loss, *_unused):
    if grad_loss is None:  # the loss was not used (grads are not materialised): no gradient
        return (None,) * (5 + len(ctx.options))

    def recompute():
        hidden, weight, bias, labels, positions = ctx.saved_tensors
        grads = list(_masked_lm_loss_reduced(hidden, weight, bias, labels, positions, *ctx.options)[2:])
        return grads if bias is not None else [*grads[:2], None]

    return (*_scaled_grads(ctx, grad_loss, recompute), None, None, *(None for _ in ctx.options))


_masked_lm_loss_reduced.register_autograd(_backward_reduced, setup_context=_setup_reduced)


class ReducedCall(NamedTuple):
    """What :class:`_EagerReducedLoss` needs besides the differentiable tensors: one argument, not
    nine (with the versions below instead of save_for_backward, measured ~4 µs less per forward and
    backward at tiny shapes on the CPU)."""

    inputs: MaskedCEInputs
    mean: bool
    backend: str


class _EagerReducedLoss(torch.autograd.Function):
    """``fastmlm::masked_lm_loss_reduced`` with its autograd rule, without the custom op's round trips.

    ``apply(hidden (T, H), weight (V, H), bias (V,) or None, call: ReducedCall)`` -> (loss 0-d,
    n_correct 0-d int64); the three tensors are ``call.inputs``'s own. A ``forward(ctx, ...)``
    rather than a separate ``setup_context``: in eager mode ``apply`` costs several times less that
    way (measured, torch 2.13 on the CPU), and this class is eager only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, call: ReducedCall):
        # Only (loss, n_correct) are outputs: the gradients never pass through autograd's output
        # bookkeeping (the custom op must return them, for functional tracing; eager need not).
        loss, correct, *grads = reduced(call.backend, call.inputs, call.mean, grads=True)
        ctx.mark_non_differentiable(correct)
        _keep_grads(ctx, grads, bias is not None)
        ctx.call = call
        # For a second backward: the bundle already holds the inputs (inputs, not outputs: no
        # reference cycle); their versions stand in for save_for_backward's in-place check.
        ctx.versions = _versions(call.inputs)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _dcorrect):
        if grad_loss is None:
            return None, None, None, None
        return (*_scaled_grads(ctx, grad_loss, lambda: _recompute(ctx)), None)


def _versions(inputs: MaskedCEInputs) -> list:
    """The version counters of the bundle's tensors (hidden, weight, bias, labels, positions; None where absent)."""
    return [None if t is None else t._version for t in inputs[:5]]


def _recompute(ctx) -> list:
    """:class:`_EagerReducedLoss`'s gradients for a second backward (retain_graph=True), from its bundle."""
    call = ctx.call
    if _versions(call.inputs) != ctx.versions:  # what save_for_backward would catch
        raise RuntimeError("fastmlm.ops.masked_lm_loss: an input of the loss was modified in place "
                           "between the forward and a second backward (retain_graph=True)")
    with torch.no_grad():
        grads = list(reduced(call.backend, call.inputs, call.mean, grads=True)[2:])
    return grads if call.inputs.bias is not None else [*grads[:2], None]
