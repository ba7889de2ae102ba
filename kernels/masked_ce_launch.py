"""``triton`` backend of masked_lm_loss: the launchers of the kernels in kernels/masked_ce.py.

What runs where: this file checks the inputs a kernel can take (``why_not``), holds each
kernel's meta-parameters (``_configs``), builds the compact row list, plans the grids and the
chunks (vocabulary chunks of the backward, row chunks of ``forward_and_grads``), allocates
and launches; the algorithm and its formulas are documented with the kernels.

Row list.  Every row of the op (R = len(positions), or R = T without positions)
either counts or not.  The launcher sorts the R rows so that the n counting ones
come first (a stable device-side sort: no host synchronisation, R stays the
static length) and passes n as a one-element device tensor.  Programs whose
row block starts at or after n return at once, so the work follows the number
of masked tokens, not T.  Results are written back at each row's own slot;
rows that do not count keep the zeros they were allocated with.

Gradients in the forward (``forward_and_grads``: reduced losses, where the weight g of
each row is known in the forward).  The compact rows are walked in chunks of rows whose
fp32 logits (rows x V) stay near WORKSPACE_ELEMENTS; per chunk, the forward kernel also
stores the logits it computes (STORE_LOGITS), the splits merge into lse, ``_dlogits_kernel``
reads the stored logits instead of recomputing them (LOAD_LOGITS; for fp32 inputs dz
overwrites them in place), and ``_dhidden_kernel`` / ``_dweight_kernel`` run over the whole
vocabulary, the latter adding to d_weight and d_bias chunk after chunk (ACCUMULATE, a fixed
order; fp32 accumulators when there are several chunks).  Cost: 3 x 2·n·H·V flops.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from fastmlm.ops.checks import assert_async
from fastmlm.ops.kernels_path import triton_interpret
from fastmlm.ops.row_bound import bound_message, counted_bound

from .masked_ce import _dhidden_kernel, _dlogits_kernel, _dweight_kernel, _forward_kernel

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# dz workspace of the backward: about this many elements (64 MiB in bf16).
WORKSPACE_ELEMENTS = 1 << 25
# Vocabulary columns per forward split: enough tiles per program to amortise the merge.
VOCAB_PER_SPLIT = 2048


def why_not(inputs) -> Optional[str]:
    """None when the kernels can run ``inputs`` (a MaskedCEInputs), else a short reason."""
    hidden = inputs.hidden
    if hidden.dtype not in SUPPORTED_DTYPES:
        return f"takes fp16/bf16/fp32 inputs, got {hidden.dtype}"
    if hidden.device.type == "cuda":
        return None
    if hidden.device.type != "cpu" or not triton_interpret():
        return f"needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {hidden.device.type}"
    if hidden.dtype == torch.bfloat16:
        return "the Triton interpreter's tl.dot is wrong for bf16 (bf16 runs on the GPU)"
    return None


# --------------------------------------------------------------------------- configuration
def _configs(dtype: torch.dtype) -> dict:
    """Meta-parameters per kernel: tile sizes, warps, pipeline stages, dot precision.

    First guesses, not tuned on a GPU yet; checked only to compile for sm_90 without
    register spills. 16-bit inputs take tensor-core tiles; fp32 (IEEE dot, as exact as the
    reference) smaller ones; the interpreter large ones (numpy per program: few programs).
    """
    precision = dict(DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")  # tf32: ignored by 16-bit dots
    if triton_interpret():
        tile = dict(BLOCK_M=32, BLOCK_V=128, BLOCK_K=64, num_warps=4, num_stages=1)
        return dict(forward=tile, dlogits=tile,
                    dhidden=dict(BLOCK_M=32, BLOCK_H=64, BLOCK_K=64, num_warps=4, num_stages=1),
                    dweight=dict(BLOCK_V=64, BLOCK_H=64, BLOCK_M=32, num_warps=4, num_stages=1), **precision)
    if dtype == torch.float32:
        tile = dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=2)
        return dict(forward=tile, dlogits=tile,
                    dhidden=dict(BLOCK_M=64, BLOCK_H=64, BLOCK_K=32, num_warps=4, num_stages=2),
                    dweight=dict(BLOCK_V=64, BLOCK_H=64, BLOCK_M=32, num_warps=4, num_stages=2), **precision)
    # The forward keeps six running statistics besides its tile: a narrower tile avoids spills.
    # d_weight tiles are small so that a narrow vocabulary chunk still gives enough programs.
    return dict(forward=dict(BLOCK_M=128, BLOCK_V=64, BLOCK_K=64, num_warps=8, num_stages=3),
                dlogits=dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3),
                dhidden=dict(BLOCK_M=128, BLOCK_H=128, BLOCK_K=64, num_warps=8, num_stages=3),
                dweight=dict(BLOCK_V=64, BLOCK_H=128, BLOCK_M=64, num_warps=8, num_stages=3), **precision)


# --------------------------------------------------------------------------- launchers
def _compact_rows(inputs):
    """Put the rows that count first, without reading anything back to the host.

    Returns order (R,) int64, the slot of each compact row (a permutation of
    range(R)); tokens and targets (R,) of each compact row; and n_rows (1,)
    int32, how many rows count (the compact rows j < n_rows).
    """
    index, counted = inputs.row_index()
    order = torch.argsort((~counted).to(torch.uint8), stable=True)
    targets = torch.where(counted, inputs.labels[index], 0)
    n_rows = counted.sum(dtype=torch.int32).reshape(1)
    bound = counted_bound(inputs.num_rows, inputs.max_masked_fraction)
    if inputs.positions is None and bound < inputs.num_rows:
        # The kernels need no bound (programs past n_rows exit), but the call's max_masked_fraction
        # means the same on every backend: a call the cuda backend stops is stopped here too.
        assert_async("masked_lm_loss", n_rows[0] <= bound, bound_message(bound, inputs.num_rows, inputs.max_masked_fraction))
    return order, index[order], targets[order], n_rows


def _strides(hidden, weight):
    return (*hidden.stride(), *weight.stride())


def _bias_arg(bias, hidden):
    """The bias pointer argument: the kernels read bias with unit stride (a strided view is
    copied); without a bias, any tensor stands in (HAS_BIAS=False never reads it)."""
    return hidden if bias is None else bias.contiguous()


def _row_statistics(inputs, tokens, targets, n_rows, rows, logits=None):
    """Loss, lse and correct of compact rows [0, rows) (those j < n_rows count), in compact order.

    With ``logits`` ((rows, V) fp32) the forward kernel also stores each row's logits there.
    """
    hidden, weight, bias = inputs[:3]
    label_smoothing, z_loss = inputs.label_smoothing, inputs.z_loss
    vocab, device = weight.shape[0], hidden.device
    configs = _configs(hidden.dtype)
    cfg = configs["forward"]
    per_split = triton.cdiv(VOCAB_PER_SPLIT, cfg["BLOCK_V"]) * cfg["BLOCK_V"]
    splits = triton.cdiv(vocab, per_split)

    # ---- per-split statistics of each compact row (rows j >= n stay unwritten)
    stats = torch.empty(5, splits, rows, device=device, dtype=torch.float32)
    argbest = torch.empty(splits, rows, device=device, dtype=torch.int32)
    _forward_kernel[(triton.cdiv(rows, cfg["BLOCK_M"]), splits)](
        hidden, weight, _bias_arg(bias, hidden), tokens, targets, n_rows,
        *stats, argbest, stats if logits is None else logits,
        rows, hidden.shape[1], vocab, per_split,
        *_strides(hidden, weight), 0 if logits is None else logits.stride(0),
        HAS_BIAS=bias is not None, STORE_LOGITS=logits is not None, DOT_PRECISION=configs["DOT_PRECISION"], **cfg,
    )

    # ---- merge the splits (see kernels/masked_ce.py)
    split_max, split_sumexp, target_logit, logit_sum, best = stats
    top = split_max.max(dim=0).values
    row_lse = top + torch.log((split_sumexp * torch.exp(split_max - top)).sum(dim=0))
    target_logit, logit_sum = target_logit.sum(dim=0), logit_sum.sum(dim=0)
    row_loss = (1.0 - label_smoothing) * (row_lse - target_logit)
    if label_smoothing:
        row_loss = row_loss + label_smoothing * (row_lse - logit_sum / vocab)
    if z_loss:
        row_loss = row_loss + z_loss * row_lse.square()
    winner = best.argmax(dim=0, keepdim=True)  # first split among ties = lowest vocabulary index
    live = torch.arange(rows, device=device) < n_rows
    row_correct = live & (argbest.gather(0, winner)[0] == targets[:rows])
    return torch.where(live, row_loss, 0.0), torch.where(live, row_lse, 0.0), row_correct


def forward(inputs):
    """(T, H) hidden -> per-row (loss fp32 (R,), lse fp32 (R,), correct bool (R,)); zeros where a row does not count."""
    hidden = inputs.hidden
    rows_total = inputs.num_rows
    device = hidden.device
    loss = torch.zeros(rows_total, device=device, dtype=torch.float32)
    lse = torch.zeros(rows_total, device=device, dtype=torch.float32)
    correct = torch.zeros(rows_total, device=device, dtype=torch.bool)
    if rows_total == 0 or hidden.shape[0] == 0:
        return loss, lse, correct
    order, tokens, targets, n_rows = _compact_rows(inputs)
    # put each row back at its slot
    loss[order], lse[order], correct[order] = _row_statistics(inputs, tokens, targets, n_rows, rows_total)
    return loss, lse, correct


def _vocab_chunk(rows_total: int, vocab: int) -> int:
    """Vocabulary columns per backward chunk (a multiple of 128): the dz workspace stays near WORKSPACE_ELEMENTS."""
    chunk = max(128, (WORKSPACE_ELEMENTS // max(rows_total, 1)) // 128 * 128)
    return min(chunk, triton.cdiv(vocab, 128) * 128)


def _gradient_chunk(inputs, tokens, targets, n_rows, lse, grad, rows, v_begin, chunk, dz, d_rows, d_weight, d_bias,
                    logits=None, accumulate=False):
    """For compact rows [0, rows) and vocabulary columns [v_begin, v_begin + chunk): dz into the
    workspace, then d_rows += dz·W, d_weight (+)= dzᵀ·h and d_bias (+)= Σ dz for those columns.

    ``logits``: the stored (rows, V) fp32 logits to read instead of recomputing them.
    """
    hidden, weight, bias = inputs[:3]
    label_smoothing, z_loss = inputs.label_smoothing, inputs.z_loss
    width, vocab = hidden.shape[1], weight.shape[0]
    configs = _configs(hidden.dtype)
    precision = configs["DOT_PRECISION"]
    dlogits, dhidden, dweight = configs["dlogits"], configs["dhidden"], configs["dweight"]
    _dlogits_kernel[(triton.cdiv(rows, dlogits["BLOCK_M"]), triton.cdiv(chunk, dlogits["BLOCK_V"]))](
        hidden, weight, _bias_arg(bias, hidden), tokens, targets, n_rows, lse, grad, dz if logits is None else logits,
        dz, width, vocab, v_begin, v_begin + chunk,
        *_strides(hidden, weight), dz.stride(0) if logits is None else logits.stride(0), dz.stride(0),
        float(label_smoothing), float(z_loss),
        HAS_BIAS=bias is not None, LOAD_LOGITS=logits is not None, DOT_PRECISION=precision, **dlogits,
    )
    _dhidden_kernel[(triton.cdiv(rows, dhidden["BLOCK_M"]), triton.cdiv(width, dhidden["BLOCK_H"]))](
        dz, weight, n_rows, d_rows,
        width, v_begin, chunk,
        dz.stride(0), *weight.stride(), d_rows.stride(0),
        DOT_PRECISION=precision, **dhidden,
    )
    _dweight_kernel[(triton.cdiv(chunk, dweight["BLOCK_V"]), triton.cdiv(width, dweight["BLOCK_H"]))](
        dz, hidden, tokens, n_rows, d_weight, d_bias,
        width, v_begin, chunk,
        dz.stride(0), *hidden.stride(), *d_weight.stride(),
        ACCUMULATE=accumulate, DOT_PRECISION=precision, **dweight,
    )


def _scatter_rows(hidden, tokens, d_rows):
    """(T, H) d_hidden from the compact rows' gradients. Compact rows j >= n hold zeros, so adding
    all rows is exact; duplicated positions sum (in the input dtype: exact for distinct tokens,
    and it keeps no (T, H) fp32 copy)."""
    d_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=hidden.dtype)
    return d_hidden.index_add_(0, tokens, d_rows.to(hidden.dtype))


def backward(inputs, lse, grad_rows):
    """Gradients of Σ grad_rows · loss_rows: d_hidden (T, H), d_weight (V, H), d_bias (V,) in the input dtype."""
    hidden, weight = inputs.hidden, inputs.weight
    rows_total, (vocab, width) = grad_rows.shape[0], weight.shape
    device = hidden.device
    d_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    d_bias = torch.empty(vocab, device=device, dtype=weight.dtype)
    if rows_total == 0 or hidden.shape[0] == 0:
        return torch.zeros_like(hidden), d_weight.zero_(), d_bias.zero_()
    order, tokens, targets, n_rows = _compact_rows(inputs)
    live = torch.arange(rows_total, device=device) < n_rows
    row_lse = lse[order].contiguous()
    row_grad = torch.where(live, grad_rows[order].float(), 0.0)
    chunk_cols = _vocab_chunk(rows_total, vocab)
    dz = torch.empty(rows_total, chunk_cols, device=device, dtype=hidden.dtype)
    d_rows = torch.zeros(rows_total, width, device=device, dtype=torch.float32)
    for v_begin in range(0, vocab, chunk_cols):  # a static loop: vocab is a shape
        _gradient_chunk(inputs, tokens, targets, n_rows, row_lse, row_grad, rows_total, v_begin,
                        min(chunk_cols, vocab - v_begin), dz, d_rows, d_weight, d_bias)
    return _scatter_rows(hidden, tokens, d_rows), d_weight, d_bias


def _row_chunk(rows_total: int, vocab: int, block: int) -> int:
    """Rows per forward_and_grads chunk, a multiple of the row tile ``block``: the stored logits
    stay near WORKSPACE_ELEMENTS; a small problem is one chunk."""
    chunk = max(block, (WORKSPACE_ELEMENTS // max(vocab, 1)) // block * block)
    return min(chunk, triton.cdiv(rows_total, block) * block)


def forward_and_grads(inputs, grad_rows):
    """Forward outputs and the gradients of Σ grad_rows · loss, computing each logit once.

    Per chunk of compact rows (a static loop; chunks past the counted rows exit on the device):
    the forward kernel stores the chunk's fp32 logits while it folds them into the statistics,
    the splits merge into lse, then dz is made from the stored logits (no recomputation) and
    multiplied into d_rows and d_weight: three matmuls in all. d_weight and d_bias add up
    chunk after chunk in a fixed order (fp32 when there is more than one chunk).
    Returns loss, lse (R,) fp32, correct (R,) bool, d_hidden (T, H), d_weight (V, H), d_bias (V,).
    """
    hidden, weight = inputs.hidden, inputs.weight
    rows_total, (vocab, width) = inputs.num_rows, weight.shape
    device = hidden.device
    if rows_total == 0 or hidden.shape[0] == 0:
        loss, lse, correct = forward(inputs)
        return (loss, lse, correct, *backward(inputs, lse, grad_rows))
    order, tokens, targets, n_rows = _compact_rows(inputs)
    live = torch.arange(rows_total, device=device) < n_rows
    row_grad = torch.where(live, grad_rows[order].float(), 0.0)
    step = _row_chunk(rows_total, vocab, _configs(hidden.dtype)["forward"]["BLOCK_M"])
    several = step < rows_total
    out_dtype = torch.float32 if several else weight.dtype  # several chunks accumulate in fp32
    d_weight = torch.empty(weight.shape, device=device, dtype=out_dtype)
    d_bias = torch.empty(vocab, device=device, dtype=out_dtype)
    d_rows = torch.zeros(rows_total, width, device=device, dtype=torch.float32)
    logits = torch.empty(step, vocab, device=device, dtype=torch.float32)
    dz = logits if hidden.dtype == torch.float32 else torch.empty(step, vocab, device=device, dtype=hidden.dtype)
    loss, lse, correct = (torch.empty(rows_total, device=device, dtype=dt)
                          for dt in (torch.float32, torch.float32, torch.bool))
    for r0 in range(0, rows_total, step):  # a static loop: R is a shape
        r1 = min(r0 + step, rows_total)
        chunk_rows = (n_rows - r0).clamp(0, r1 - r0).to(torch.int32)  # counted rows of this chunk, on the device
        tokens_c, targets_c = tokens[r0:r1], targets[r0:r1]
        loss[r0:r1], lse[r0:r1], correct[r0:r1] = _row_statistics(inputs, tokens_c, targets_c, chunk_rows, r1 - r0,
                                                                  logits)
        _gradient_chunk(inputs, tokens_c, targets_c, chunk_rows, lse[r0:r1], row_grad[r0:r1], r1 - r0, 0, vocab,
                        dz, d_rows[r0:r1], d_weight, d_bias, logits=logits, accumulate=r0 > 0)
    # back at each row's slot
    out = [torch.empty_like(t) for t in (loss, lse, correct)]
    for slot, compact in zip(out, (loss, lse, correct)):
        slot[order] = compact
    return (*out, _scatter_rows(hidden, tokens, d_rows), d_weight.to(weight.dtype), d_bias.to(weight.dtype))
