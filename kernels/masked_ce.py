"""Triton kernels of masked_lm_loss: gather masked rows, project, cross-entropy, fused.

The ``triton`` backend is kernels/masked_ce_launch.py (the row list, grids, chunk plans and
the forward_and_grads driver); this file holds the ``@triton.jit`` kernels and their algorithm.

    hidden (T, H) ─ rows j < n of the compact list ─► (BLOCK_M, H) ─ · Wᵀ tile by tile ─► online lse
                                                                         never (n, V) in memory

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

The switches STORE_LOGITS, LOAD_LOGITS and ACCUMULATE serve the gradients computed in the
forward (``forward_and_grads``, described with the launchers): the forward kernel stores the
logits it computes, the dz kernel reads them back, the d_weight kernel adds to its output.

Limits: fp16 / bf16 / fp32 inputs (fp32 uses IEEE ``tl.dot``, not TF32, so it
matches an fp32 reference); CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
(where bf16 is refused: the interpreter's ``tl.dot`` is wrong for bf16).  Tile
sizes (``_configs`` of the launchers) are first guesses, compiled for sm_90
(``_masked_ce_compile.py``) but not yet tuned on a GPU.  The ``cuda`` backend (csrc/) is written separately.
"""
from __future__ import annotations

import triton
import triton.language as tl


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
