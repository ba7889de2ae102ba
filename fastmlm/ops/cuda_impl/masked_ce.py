"""``cuda`` backend of masked_lm_loss: chunked projection + fused loss kernels (csrc/masked_ce.cuh).

The rows are gathered on the device (``gather_rows``; rows that do not count, -1 positions
or ignored labels, are zeros, so nothing stored there reaches the loss or a gradient), then
the vocabulary is walked in chunks: cuBLAS (``rows @ W_chunkᵀ``) makes one (R, C) chunk
of logits at a time, and a kernel folds it into a running online-logsumexp state per row
(max, sum of exp, sum of logits, target logit, first argmax). A last kernel turns the
state into loss, lse and "correct". The backward recomputes each chunk's logits, turns
them into dz with one kernel,

    dz = g · (softmax(z) (1 + 2·zl·lse) - eps / V - (1 - eps) · onehot(t)),

and multiplies dz into d_rows and d_weight with cuBLAS. Never more than one chunk of
logits in memory.

``forward_and_grads`` (reduced losses with gradients) walks the rows instead, in chunks
whose logits cover the whole vocabulary: one cuBLAS matmul makes a chunk's logits, the
same kernels give its statistics, lse and dz (the row weights are known in the forward),
and two more matmuls add dz into d_rows and d_weight: three matmuls, no recomputation,
d_weight accumulated chunk after chunk in a fixed order (deterministic). fp32/fp16/bf16. The logits chunk is rounded to the input dtype by the
matmul (as in the torch backend); statistics, loss and the bias add are fp32.

Without ``positions`` the counted rows are first compacted into a static bound B of rows
(``bound_rows`` of the torch backend, shared: ``nonzero_static``, no host synchronisation, a
device-side assertion when more than B rows count; B = ceil(f·R) + SLACK_ROWS for the call's
``max_masked_fraction`` f, R at f = 1.0, see that module), so cuBLAS, which cannot skip rows on
the device, multiplies ~B rows rather than R.
"""
from __future__ import annotations

from typing import Optional

import torch

from torch import Tensor

from ..masked_ce import MaskedCEInputs
from ..torch_impl.masked_ce import bound_rows, unbound_rows
from . import contiguous_aligned16, kernel_ops, why_not_device

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CHUNK_ELEMENTS = 1 << 24  # logits per chunk (R x C): 32 MiB in 16-bit
CHUNK_ALIGN = 128


def why_not(inputs: MaskedCEInputs) -> Optional[str]:
    """Why these inputs cannot run here (None: they can)."""
    where = why_not_device(inputs.hidden)
    if where:
        return where
    if inputs.hidden.dtype not in DTYPES:
        return f"takes float32/float16/bfloat16, not {inputs.hidden.dtype}"
    if inputs.num_rows >= 2**31:
        return f"at most 2^31 - 1 rows, got {inputs.num_rows}"
    return None


def _chunks(rows: int, vocab: int):
    step = max(CHUNK_ALIGN, CHUNK_ELEMENTS // max(rows, 1) // CHUNK_ALIGN * CHUNK_ALIGN)
    return ((v0, min(v0 + step, vocab)) for v0 in range(0, vocab, step))


def _rows_and_targets(inputs: MaskedCEInputs):
    """(R, H) gathered rows, zero where a row does not count, and (R,) int64 targets, -1 there.

    Rows that do not count must be zeros, not merely get dz = 0: d_weight = dzᵀ · rows and
    0 · NaN is NaN, so a NaN or inf in a hidden row that does not count would reach d_weight.
    """
    hidden = inputs.hidden
    index, counted = inputs.row_index()
    targets = torch.where(counted, inputs.labels[index], -1).long().contiguous()
    rows = hidden.new_empty((index.shape[0], hidden.shape[1]))
    kernel_ops().gather_rows(contiguous_aligned16(hidden), torch.where(counted, index, -1).contiguous(), rows)
    return rows, targets, index


def forward(inputs: MaskedCEInputs) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: (loss fp32, lse fp32, correct bool), (R,) each; 0 where a row does not count."""
    rows = inputs.num_rows
    inputs, slots = bound_rows(inputs)
    return tuple(unbound_rows(out, slots, rows) for out in _forward(inputs))


def _forward(inputs: MaskedCEInputs) -> tuple[Tensor, Tensor, Tensor]:
    hidden, weight, bias = inputs[:3]
    label_smoothing, z_loss = inputs.label_smoothing, inputs.z_loss
    ops = kernel_ops()
    rows, targets, _ = _rows_and_targets(inputs)
    num_rows, vocab = rows.shape[0], weight.shape[0]
    device, f32 = hidden.device, torch.float32
    stats = torch.zeros(num_rows, 4, device=device, dtype=f32)
    stats[:, 0] = float("-inf")  # running max; sum of exp, sum of logits, target logit start at 0
    best = torch.zeros(num_rows, device=device, dtype=torch.int64)
    best_logit = torch.full((num_rows,), float("-inf"), device=device, dtype=f32)
    weight = weight.contiguous()
    for v0, v1 in _chunks(num_rows, vocab):
        logits = (rows @ weight[v0:v1].t()).contiguous()
        ops.masked_ce_chunk_stats(logits, None if bias is None else bias[v0:v1].contiguous(), targets, v0,
                                  stats, best, best_logit)
    loss = torch.empty(num_rows, device=device, dtype=f32)
    lse = torch.empty_like(loss)
    correct = torch.empty(num_rows, device=device, dtype=torch.bool)
    ops.masked_ce_finish(stats, best, targets, vocab, label_smoothing, z_loss, loss, lse, correct)
    return loss, lse, correct


def backward(inputs: MaskedCEInputs, lse: Tensor, grad_rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum(grad_rows * loss): d_hidden (T, H), d_weight (V, H), d_bias (V,) in the input dtype."""
    inputs, _, lse, grad_rows = bound_rows(inputs, lse, grad_rows)
    hidden, weight, bias, _, positions = inputs[:5]
    label_smoothing, z_loss = inputs.label_smoothing, inputs.z_loss
    ops = kernel_ops()
    rows, targets, index = _rows_and_targets(inputs)
    num_rows, vocab = rows.shape[0], weight.shape[0]
    grad = grad_rows.float().contiguous()
    lse = lse.float().contiguous()
    weight = weight.contiguous()
    d_rows = torch.zeros(rows.shape, device=rows.device, dtype=torch.float32)
    d_weight = torch.empty_like(weight)
    d_bias = torch.empty(vocab, device=weight.device, dtype=torch.float32)
    for v0, v1 in _chunks(num_rows, vocab):
        w = weight[v0:v1]
        logits = (rows @ w.t()).contiguous()
        dlogits = torch.empty_like(logits)
        ops.masked_ce_chunk_grad(logits, None if bias is None else bias[v0:v1].contiguous(), targets, lse, grad,
                                 v0, vocab, label_smoothing, z_loss, dlogits)
        d_rows += (dlogits @ w).float()
        d_weight[v0:v1] = dlogits.t() @ rows
        d_bias[v0:v1] = dlogits.float().sum(0)
    if positions is None:
        d_hidden = d_rows.to(hidden.dtype)
    else:  # rows of -1 positions have dz = 0, so adding them at the clamped index 0 is harmless
        d_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32)
        d_hidden = d_hidden.index_add_(0, index, d_rows).to(hidden.dtype)
    return d_hidden, d_weight, d_bias.to(weight.dtype)


def _row_chunks(rows: int, vocab: int):
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return ((r0, min(r0 + step, rows)) for r0 in range(0, rows, step))


def forward_and_grads(inputs: MaskedCEInputs, grad_rows: Tensor):
    """Forward outputs and the gradients of Σ grad_rows · loss, each chunk's logits made once.

    Returns loss, lse (R,) fp32, correct (R,) bool, d_hidden (T, H), d_weight (V, H), d_bias (V,).
    """
    rows = inputs.num_rows
    inputs, slots, grad_rows = bound_rows(inputs, grad_rows)
    loss, lse, correct, *grads = _forward_and_grads(inputs, grad_rows)
    return (*(unbound_rows(out, slots, rows) for out in (loss, lse, correct)), *grads)


def _forward_and_grads(inputs: MaskedCEInputs, grad_rows: Tensor):
    hidden, weight, bias, _, positions = inputs[:5]
    label_smoothing, z_loss = inputs.label_smoothing, inputs.z_loss
    ops = kernel_ops()
    rows, targets, index = _rows_and_targets(inputs)
    num_rows, vocab = rows.shape[0], weight.shape[0]
    device, f32 = hidden.device, torch.float32
    grad = grad_rows.float().contiguous()
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    stats = torch.zeros(num_rows, 4, device=device, dtype=f32)
    stats[:, 0] = float("-inf")
    best = torch.zeros(num_rows, device=device, dtype=torch.int64)
    best_logit = torch.full((num_rows,), float("-inf"), device=device, dtype=f32)
    loss, lse = (torch.empty(num_rows, device=device, dtype=f32) for _ in range(2))
    correct = torch.empty(num_rows, device=device, dtype=torch.bool)
    d_rows = torch.empty(rows.shape, device=device, dtype=f32)
    d_weight = torch.zeros(weight.shape, device=device, dtype=f32)
    d_bias = torch.zeros(vocab, device=device, dtype=f32)
    for r0, r1 in _row_chunks(num_rows, vocab):
        h, t = rows[r0:r1], targets[r0:r1]
        logits = (h @ weight.t()).contiguous()  # (chunk, V): the only matmul over the vocabulary's logits
        ops.masked_ce_chunk_stats(logits, bias, t, 0, stats[r0:r1], best[r0:r1], best_logit[r0:r1])
        ops.masked_ce_finish(stats[r0:r1], best[r0:r1], t, vocab, label_smoothing, z_loss, loss[r0:r1], lse[r0:r1],
                             correct[r0:r1])
        dlogits = torch.empty_like(logits)
        ops.masked_ce_chunk_grad(logits, bias, t, lse[r0:r1], grad[r0:r1], 0, vocab, label_smoothing, z_loss,
                                 dlogits)
        d_rows[r0:r1] = (dlogits @ weight).float()
        d_weight += (dlogits.t() @ h).float()
        d_bias += dlogits.float().sum(0)
    if positions is None:
        d_hidden = d_rows.to(hidden.dtype)
    else:  # rows of -1 positions have dz = 0, so adding them at the clamped index 0 is harmless
        d_hidden = torch.zeros(hidden.shape, device=device, dtype=f32).index_add_(0, index, d_rows).to(hidden.dtype)
    return loss, lse, correct, d_hidden, d_weight.to(weight.dtype), d_bias.to(weight.dtype)
