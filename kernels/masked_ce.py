"""``triton`` backend of masked_lm_loss: gather masked rows, project, cross-entropy, fused.

    hidden (T, H) ─ rows j < n of the compact list ─► (BLOCK_M, H) ─ · Wᵀ tile by tile ─► online lse
                                                                         never (n, V) in memory

Row list.  Every row of the op (R = len(positions), or R = T without positions)
either counts or not.  The launcher sorts the R rows so that the n counting ones
come first (a stable device-side sort: no host synchronisation, R stays the
static length) and passes n as a one-element device tensor.  Programs whose
row block starts at or after n return at once, so the work follows the number
of masked tokens, not T.  Results are written back at each row's own slot;
rows that do not count keep the zeros they were allocated with.

Forward (``_forward_kernel``, grid = row blocks x vocabulary splits).  A program
owns BLOCK_M rows and one contiguous split of the vocabulary.  For each BLOCK_V
tile of its split it computes z = h · Wᵀ + b as a (BLOCK_M x H)·(H x BLOCK_V)
``tl.dot`` in fp32 (looping over H in BLOCK_K steps) and folds the tile into
running statistics:

    m   running max        s = s·exp(m_old - m) + Σ exp(z - m)   (online log-sum-exp)
    zt  target logit       zs = Σ z (for label smoothing)
    best, arg              running max / argmax, first index among ties

Splitting the vocabulary gives enough programs to fill the GPU when few rows
are masked; the per-split statistics (S, R) are merged in a few torch ops:

    lse  = M + log Σ_s s_s·exp(m_s - M),   M = max_s m_s
    loss = (1 - eps)(lse - zt) + eps(lse - zs / V) + zl·lse²

Backward.  With p = softmax(z) = exp(z - lse) and g the incoming row gradient,

    dz = g · (p·(1 + 2·zl·lse) - (1 - eps)·onehot(t) - eps / V)
    d_hidden[token] = dz · W        d_weight = dzᵀ · h        d_bias = Σ_rows dz

Keeping a (BLOCK_M x H) accumulator for d_hidden in registers is impossible at
H = 768, and recomputing z once per H block would multiply the work.  So the
backward walks the vocabulary in chunks of columns (as many as keep the dz
workspace, R x chunk in the input dtype, near 32M elements) and, per chunk,

  1. ``_dlogits_kernel``  recomputes z for the chunk, writes dz (rows x chunk) to a
                          workspace in the input dtype;
  2. ``_dhidden_kernel``  d_rows[j, :] += dz[j, :] · W[chunk, :]   (fp32, one owner per tile);
  3. ``_dweight_kernel``  d_weight[chunk, :] = dzᵀ · h, d_bias[chunk] = Σ_j dz[j, :]
                          (loops over the n counted rows, a bound read on the device).

Every output tile has exactly one writer: the result is deterministic, with no
atomics.  d_rows (R x H, fp32) is finally added into (T, H) at the row tokens
(``index_add_``, so duplicated positions sum their gradients).  Cost: z is
computed twice (forward, backward) plus two more matmuls, 4 x 2·n·H·V flops;
memory beyond the outputs is the workspace plus R x H fp32.

Gradients in the forward (``forward_and_grads``: reduced losses, where the weight g of
each row is known in the forward).  The compact rows are walked in chunks of rows whose
fp32 logits (rows x V) stay near WORKSPACE_ELEMENTS; per chunk, the forward kernel also
stores the logits it computes (STORE_LOGITS), the splits merge into lse, ``_dlogits_kernel``
reads the stored logits instead of recomputing them (LOAD_LOGITS; for fp32 inputs dz
overwrites them in place), and ``_dhidden_kernel`` / ``_dweight_kernel`` run over the whole
vocabulary, the latter adding to d_weight and d_bias chunk after chunk (ACCUMULATE, a fixed
order; fp32 accumulators when there are several chunks).  Cost: 3 x 2·n·H·V flops.

Limits: fp16 / bf16 / fp32 inputs (fp32 uses IEEE ``tl.dot``, not TF32, so it
matches an fp32 reference); CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
(where bf16 is refused: the interpreter's ``tl.dot`` is wrong for bf16).  Tile
sizes are first guesses, compiled for sm_90 (``_masked_ce_compile.py``) but not
yet tuned on a GPU.  The ``cuda`` backend (csrc/) is written separately.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastmlm.ops.kernels_path import triton_interpret

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


# --------------------------------------------------------------------------- shared tile code
@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, bias_ptr,
    tokens, row_ok, cols, col_ok,
    H,
    stride_h_tok, stride_h_hid, stride_w_vocab, stride_w_hid,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """z[i, c] = h[tokens[i]] · W[cols[c]] (+ b[cols[c]]) as a (BLOCK_M, BLOCK_V) fp32 tile."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    h_rows = hidden_ptr + tokens.to(tl.int64)[:, None] * stride_h_tok
    w_cols = weight_ptr + cols.to(tl.int64)[None, :] * stride_w_vocab
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < H
        h = tl.load(h_rows + k[None, :] * stride_h_hid, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + k[:, None] * stride_w_hid, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


# --------------------------------------------------------------------------- forward
@triton.jit
def _forward_kernel(
    # pointers: inputs
    hidden_ptr, weight_ptr, bias_ptr, tokens_ptr, targets_ptr, n_rows_ptr,
    # pointers: per-split statistics, each (SPLITS, R); the (R, V) fp32 logits (STORE_LOGITS only)
    max_ptr, sumexp_ptr, target_logit_ptr, logit_sum_ptr, best_ptr, argbest_ptr, logits_ptr,
    # sizes
    R, H, V, vocab_per_split,
    # strides
    stride_h_tok, stride_h_hid, stride_w_vocab, stride_w_hid, stride_logits_row,
    # meta-parameters
    HAS_BIAS: tl.constexpr, STORE_LOGITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    n_rows = tl.load(n_rows_ptr)
    if pid_m * BLOCK_M >= n_rows:  # only rows j < n count; the rest of the grid is idle
        return

    # ---- this program's rows (compact order) and their targets
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    tokens = tl.load(tokens_ptr + rows, mask=row_ok, other=0)
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=0)

    # ---- running statistics over this split's vocabulary tiles
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sumexp = tl.zeros((BLOCK_M,), tl.float32)
    target_logit = tl.zeros((BLOCK_M,), tl.float32)
    logit_sum = tl.zeros((BLOCK_M,), tl.float32)
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    argbest = tl.zeros((BLOCK_M,), tl.int32)

    v_begin = split * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, tokens, row_ok, cols, col_ok, H,
                         stride_h_tok, stride_h_hid, stride_w_vocab, stride_w_hid,
                         HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
        if STORE_LOGITS:  # kept for forward_and_grads: the logits are computed once
            tl.store(logits_ptr + rows.to(tl.int64)[:, None] * stride_logits_row + cols[None, :], z,
                     mask=row_ok[:, None] & col_ok[None, :])
        z = tl.where(col_ok[None, :], z, float("-inf"))  # padding columns: exp() = 0, never the max

        # online log-sum-exp: rescale the old sum to the new max, then add the tile
        tile_max = tl.max(z, axis=1)
        new_max = tl.maximum(run_max, tile_max)
        run_sumexp = run_sumexp * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max

        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
        logit_sum += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)

        # argmax, first index among ties: the smallest column holding the tile max; across tiles
        # a later tile must be strictly greater
        tile_arg = tl.min(tl.where(z == tile_max[:, None], cols[None, :], V), axis=1)
        better = tile_max > best
        best = tl.where(better, tile_max, best)
        argbest = tl.where(better, tile_arg, argbest)

    # ---- store this split's statistics
    out = split.to(tl.int64) * R + rows
    tl.store(max_ptr + out, run_max, mask=row_ok)
    tl.store(sumexp_ptr + out, run_sumexp, mask=row_ok)
    tl.store(target_logit_ptr + out, target_logit, mask=row_ok)
    tl.store(logit_sum_ptr + out, logit_sum, mask=row_ok)
    tl.store(best_ptr + out, best, mask=row_ok)
    tl.store(argbest_ptr + out, argbest, mask=row_ok)


# --------------------------------------------------------------------------- backward
@triton.jit
def _dlogits_kernel(
    # pointers
    hidden_ptr, weight_ptr, bias_ptr, tokens_ptr, targets_ptr, n_rows_ptr, lse_ptr, grad_ptr, logits_ptr, dz_ptr,
    # sizes: the chunk is vocabulary columns [v_begin, v_end)
    H, V, v_begin, v_end,
    # strides
    stride_h_tok, stride_h_hid, stride_w_vocab, stride_w_hid, stride_logits_row, stride_dz_row,
    # loss options
    label_smoothing, z_loss,
    # meta-parameters
    HAS_BIAS: tl.constexpr, LOAD_LOGITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dz[j, c - v_begin] = g·(p·(1 + 2·zl·lse) - (1 - eps)·[c == t] - eps/V) for the chunk's columns.

    The logits are recomputed, or with LOAD_LOGITS read from the (R, V) fp32 buffer the forward
    kernel stored (then dz may overwrite that buffer: each element is read, then written, by
    the same program)."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    n_rows = tl.load(n_rows_ptr)
    if pid_m * BLOCK_M >= n_rows:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    cols = v_begin + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < v_end
    tokens = tl.load(tokens_ptr + rows, mask=row_ok, other=0)
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    grad = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)

    # ---- the logits (stored, or recomputed), turned into the softmax gradient
    if LOAD_LOGITS:
        z = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_logits_row + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    else:
        z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, tokens, row_ok, cols, col_ok, H,
                         stride_h_tok, stride_h_hid, stride_w_vocab, stride_w_hid,
                         HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
    probs = tl.exp(z - lse[:, None])
    dz = probs * (1.0 + 2.0 * z_loss * lse)[:, None] - label_smoothing / V
    dz = tl.where(cols[None, :] == targets[:, None], dz - (1.0 - label_smoothing), dz)
    dz = dz * grad[:, None]

    ptrs = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz_row + (cols - v_begin)[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _dhidden_kernel(
    # pointers
    dz_ptr, weight_ptr, n_rows_ptr, drows_ptr,
    # sizes
    H, v_begin, chunk,
    # strides
    stride_dz_row, stride_w_vocab, stride_w_hid, stride_drows_row,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """d_rows[j, h] += Σ_c dz[j, c] · W[v_begin + c, h] over one vocabulary chunk (fp32)."""
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_rows = tl.load(n_rows_ptr)
    if pid_m * BLOCK_M >= n_rows:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hs < H

    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for c0 in range(0, chunk, BLOCK_K):
        c = c0 + tl.arange(0, BLOCK_K)
        c_ok = c < chunk
        dz = tl.load(dz_ptr + rows.to(tl.int64)[:, None] * stride_dz_row + c[None, :],
                     mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        w = tl.load(weight_ptr + (v_begin + c).to(tl.int64)[:, None] * stride_w_vocab + hs[None, :] * stride_w_hid,
                    mask=c_ok[:, None] & h_ok[None, :], other=0.0)
        acc = tl.dot(dz, w, acc, input_precision=DOT_PRECISION)

    # one program owns this tile across all chunks (launched one chunk after another): no race
    ptrs = drows_ptr + rows.to(tl.int64)[:, None] * stride_drows_row + hs[None, :]
    tile_ok = row_ok[:, None] & h_ok[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=tile_ok, other=0.0) + acc, mask=tile_ok)


@triton.jit
def _dweight_kernel(
    # pointers
    dz_ptr, hidden_ptr, tokens_ptr, n_rows_ptr, dweight_ptr, dbias_ptr,
    # sizes
    H, v_begin, chunk,
    # strides
    stride_dz_row, stride_h_tok, stride_h_hid, stride_dw_vocab, stride_dw_hid,
    # meta-parameters
    ACCUMULATE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """d_weight[v, h] = Σ_j dz[j, v] · h[tokens[j], h] and d_bias[v] = Σ_j dz[j, v] for one chunk
    (with ACCUMULATE: added to what d_weight and d_bias hold, launch after launch in a fixed order)."""
    pid_v = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_rows = tl.load(n_rows_ptr)
    if ACCUMULATE and n_rows == 0:  # a row chunk past the counted rows: nothing to add
        return
    c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    c_ok = c < chunk
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hs < H

    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for j0 in range(0, n_rows, BLOCK_M):  # the counted rows only: a bound read on the device
        rows = j0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        tokens = tl.load(tokens_ptr + rows, mask=row_ok, other=0)
        dz_t = tl.load(dz_ptr + rows.to(tl.int64)[None, :] * stride_dz_row + c[:, None],  # (BLOCK_V, BLOCK_M)
                       mask=c_ok[:, None] & row_ok[None, :], other=0.0)
        h = tl.load(hidden_ptr + tokens.to(tl.int64)[:, None] * stride_h_tok + hs[None, :] * stride_h_hid,
                    mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        acc = tl.dot(dz_t, h, acc, input_precision=DOT_PRECISION)
        bias_acc += tl.sum(dz_t.to(tl.float32), axis=1)

    v = (v_begin + c).to(tl.int64)
    dw_ptrs = dweight_ptr + v[:, None] * stride_dw_vocab + hs[None, :] * stride_dw_hid
    tile_ok = c_ok[:, None] & h_ok[None, :]
    if ACCUMULATE:  # one program owns this tile in every launch: no race
        acc += tl.load(dw_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    tl.store(dw_ptrs, acc.to(dweight_ptr.dtype.element_ty), mask=tile_ok)
    if pid_h == 0:
        if ACCUMULATE:
            bias_acc += tl.load(dbias_ptr + v, mask=c_ok, other=0.0).to(tl.float32)
        tl.store(dbias_ptr + v, bias_acc.to(dbias_ptr.dtype.element_ty), mask=c_ok)


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
    hidden, weight, bias, _, _, _, label_smoothing, z_loss = inputs
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

    # ---- merge the splits (see the module docstring)
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
    hidden, weight, bias, _, _, _, label_smoothing, z_loss = inputs
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
