"""FlashAttention-style kernels shared by dense and block-sparse attention (non-causal).

Algorithm (per query block of BLOCK_M rows, one program each):

    for each key block kb in the visit list of this query block:
        s    = q k_kb^T * scale * log2(e)          (BLOCK_M x BLOCK_N, fp32, on chip)
        m'   = max(m, rowmax(s))                    running max (log2 domain)
        p    = exp2(s - m'),  alpha = exp2(m - m')
        l    = l * alpha + rowsum(p)                running denominator
        acc  = acc * alpha + p v_kb                 running numerator
    out = acc / l,   lse = (m + log2 l) * ln(2)    (natural log, saved for the backward)

The S x S score matrix never leaves registers. The *visit list* is what makes
one body serve both ops: dense attention visits every key block up to the
sequence's last real key; block-sparse attention visits the key blocks a
layout keeps (``KvIndex``/``KvCount``), with a per-element rule only on
partially kept tiles.

Backward (recompute, no atomics, so gradients are bit-for-bit deterministic):

    delta_i = rowsum(dO_i * O_i)                                   (preprocess kernel)
    p_ij    = exp(s_ij - lse_i)                                    (recomputed from lse)
    dV_j    = sum_i p_ij dO_i
    dP_ij   = dO_i . v_j
    dS_ij   = p_ij (dP_ij - delta_i)
    dK_j    = scale * sum_i dS_ij q_i        one program per key block (dK, dV),
    dQ_i    = scale * sum_j dS_ij k_j        one program per query block (dQ).

The dK/dV programs walk the *transposed* visit list (per key block, the query
blocks that visit it).

Layouts. q, k, v are read as (tokens, H, D) with any token and head strides
(slices of a fused QKV projection need no copy; D must have unit stride);
outputs and output gradients are contiguous (tokens, H, D); lse and delta
are (tokens, H) fp32. A sequence is (start token, seq_len rows,
kv_len keys): padded batches have start = b * S, seq_len = S and kv_len = the
last real key + 1 (key tiles past it are skipped). A right-padded key mask needs
nothing more, so interior tiles run unmasked; a mask with holes before kv_len
is applied per element on every tile. Packed batches read start and seq_len
from cu_seqlens. Token offsets are int64.

Padding never contributes, even when it holds NaN or inf: a masked probability is
not enough (0 * NaN = NaN). Masked scores are selected to -inf and dS to 0, and the
operand that multiplies those zeros loads padding keys (past kv_len or marked
padding) as zeros: V in the forward's P V, K in dQ's dS K. dK/dV of padding keys
are zeroed at the store. NaN in a real row gives NaN in every row that sees it; in
dense attention a row whose every score is -inf (only an infinite input does that)
is NaN too, not the zeros of a row without keys.

Limits: head_dim a multiple of 8 up to 128 (padded to a power of two >= 16
with masked loads); fp16, bf16 and fp32 (fp32 uses IEEE dot products, not TF32).
Differences from the CUDA version (csrc/) will be listed there.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from fastmlm.ops.dispatch import triton_interpret

LOG2E = 1.4426950408889634
SKIP, FULL, PARTIAL = 0, 1, 2  # tile states, as in fastmlm/ops/block_layout.py


# --------------------------------------------------------------------------- small helpers
@triton.jit
def _sequence(batch, CuSeqlens, KeyBounds, padded_len, IS_PACKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr):
    """(first token as int64, rows of this sequence, keys worth visiting, whether the key mask
    has holes before kv_len) of one batch entry. Without holes (right padding, the usual
    case) interior key tiles need no mask at all."""
    if IS_PACKED:
        start = tl.load(CuSeqlens + batch).to(tl.int64)
        seq_len = (tl.load(CuSeqlens + batch + 1) - tl.load(CuSeqlens + batch)).to(tl.int32)
    else:
        start = batch.to(tl.int64) * padded_len
        seq_len = batch * 0 + padded_len  # an int32 tensor, whatever padded_len was specialised to
    kv_len = seq_len
    holes = seq_len < 0  # False
    if HAS_KEY_MASK:
        kv_len = tl.load(KeyBounds + 2 * batch).to(tl.int32)
        holes = tl.load(KeyBounds + 2 * batch + 1) != 0
    return start, seq_len, kv_len, holes


@triton.jit
def _load_rows(base, rows, row_ok, stride_tok, offs_d, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; with CHECK_ROWS, rows where row_ok is False read as 0, and
    columns >= HEAD_DIM always do."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride_tok + offs_d[None, :]
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return tile


@triton.jit
def _store_rows(base, tile, rows, limit, stride_tok, offs_d, HEAD_DIM: tl.constexpr):
    ptrs = base + rows.to(tl.int64)[:, None] * stride_tok + offs_d[None, :]
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(rows < limit)[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _real_keys(pos_n, kv_len, KeyMaskRow, HAS_KEY_MASK: tl.constexpr):
    """(BLOCK_N,) bool: which keys of a tile are real (inside kv_len and, with a key-padding
    mask, marked real). The K and V rows of the others are loaded as zeros, not merely given
    zero probability: a NaN or inf stored at a padding position (or in the next packed
    sequence) would otherwise reach real rows as 0 * NaN in P V, dO V^T and dS K."""
    real = pos_n < kv_len
    if HAS_KEY_MASK:
        real = real & (tl.load(KeyMaskRow + pos_n, mask=real, other=0) != 0)
    return real


@triton.jit
def _layout_keep(pos_q, pos_k, Blocks, blocks_row, TokenMask, tm_row, layout_len, window, num_global,
                 HAS_TOKEN_MASK: tl.constexpr, LAYOUT_BLOCK: tl.constexpr):
    """Which (query, key) pairs of a partially kept block-sparse tile the layout keeps.
    pos_q / pos_k are positions in the sequence, already broadcast to the tile's 2-D shape
    (either orientation): the fine layout block's state, FULL or PARTIAL with the token rule
    |i - j| <= window  or  i < num_global  or  j < num_global  or  token_mask[i, j]."""
    inside = (pos_q < layout_len) & (pos_k < layout_len)
    fine = tl.load(Blocks + (pos_q // LAYOUT_BLOCK) * blocks_row + pos_k // LAYOUT_BLOCK, mask=inside, other=0)
    distance = pos_q - pos_k
    rule = (tl.where(distance < 0, -distance, distance) <= window) | (pos_q < num_global) | (pos_k < num_global)
    if HAS_TOKEN_MASK:
        rule = rule | (tl.load(TokenMask + pos_q.to(tl.int64) * tm_row + pos_k, mask=inside, other=0) != 0)
    return (fine == 1) | ((fine == 2) & rule)


# --------------------------------------------------------------------------- forward
@triton.jit
def _fwd_visit(acc, m_i, l_i, q, Kh, Vh, kb, pos_m, kv_len, stride_kt, stride_vt, offs_d, qk_scale,
               KeyMaskRow, Blocks, blocks_row, TokenMask, tm_row, layout_len, window, num_global,
               MASKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr, APPLY_RULE: tl.constexpr,
               HAS_TOKEN_MASK: tl.constexpr, LAYOUT_BLOCK: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax. MASKED=False only for tiles wholly inside
    kv_len with no key mask and no layout rule: no per-element work at all."""
    pos_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    if MASKED:
        # The select on s below replaces a NaN score at a padding key, but p = 0 times a NaN
        # value is still NaN in P V: V loads padding keys as zeros. (K need not: on sm_90 the
        # key mask in both load masks, or a select after the load, cost registers and spills.)
        real = _real_keys(pos_n, kv_len, KeyMaskRow, HAS_KEY_MASK)
        v = _load_rows(Vh, pos_n, real, stride_vt, offs_d, True, HEAD_DIM, BLOCK_D)
    else:
        v = _load_rows(Vh, pos_n, None, stride_vt, offs_d, False, HEAD_DIM, BLOCK_D)
    k = _load_rows(Kh, pos_n, pos_n < kv_len, stride_kt, offs_d, MASKED, HEAD_DIM, BLOCK_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        keep = real[None, :]
        if APPLY_RULE:
            keep = keep & _layout_keep(pos_m[:, None], pos_n[None, :], Blocks, blocks_row, TokenMask, tm_row,
                                       layout_len, window, num_global, HAS_TOKEN_MASK, LAYOUT_BLOCK)
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(
    # pointers: tensors (tokens, H, D) / (tokens, H)
    Q, K, V, Out, Lse,
    # pointers: sequence bounds and key-padding mask (B, S) uint8
    CuSeqlens, KeyBounds, KeyMask,
    # pointers: block-sparse schedule over kernel tiles, and the layout's token rule
    TileState, KvIndex, KvCount, Blocks, TokenMask,
    # sizes
    padded_len, num_heads, layout_len, window, num_global, seqlen_key,
    # strides (elements); *_head is 0 when one layout serves every head
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,  # inputs: any token / head stride
    stride_tok, stride_head,  # outputs and output gradients: contiguous (tokens, H, D)
    state_head, state_row, index_head, index_row, count_head,
    blocks_head, blocks_row, tm_head, tm_row,
    # meta-parameters
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_PACKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    SPARSE: tl.constexpr, HAS_TOKEN_MASK: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    qb, head, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, seq_len, kv_len, holes = _sequence(batch, CuSeqlens, KeyBounds, padded_len, IS_PACKED, HAS_KEY_MASK)
    if qb * BLOCK_M >= seq_len:  # this query block lies past a shorter packed sequence
        return

    # ---- load the query block once; it stays in registers for the whole loop
    offs_d = tl.arange(0, BLOCK_D)
    pos_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    head_off = start * stride_tok + head * stride_head
    q = _load_rows(Q + start * stride_qt + head * stride_qh, pos_m, pos_m < seq_len, stride_qt, offs_d, True,
                   HEAD_DIM, BLOCK_D)
    Kh, Vh = K + start * stride_kt + head * stride_kh, V + start * stride_vt + head * stride_vh
    KeyMaskRow = KeyMask + batch.to(tl.int64) * padded_len
    Blocks_h = Blocks + head * blocks_head
    TokenMask_h = TokenMask + head.to(tl.int64) * tm_head

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # ---- visit the key blocks
    if SPARSE:
        count = tl.load(KvCount + head * count_head + qb)
        for j in range(0, count):
            kb = tl.load(KvIndex + head * index_head + qb * index_row + j)
            state = tl.load(TileState + head * state_head + qb * state_row + kb)
            needs_mask = (state != 1) | ((kb + 1) * BLOCK_N > kv_len) | holes
            if needs_mask:
                acc, m_i, l_i = _fwd_visit(acc, m_i, l_i, q, Kh, Vh, kb, pos_m, kv_len, stride_kt, stride_vt,
                                           offs_d, qk_scale, KeyMaskRow, Blocks_h, blocks_row,
                                           TokenMask_h, tm_row, layout_len, window, num_global, True,
                                           HAS_KEY_MASK, True, HAS_TOKEN_MASK, LAYOUT_BLOCK,
                                           HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
            else:  # fully kept tile: no per-element mask
                acc, m_i, l_i = _fwd_visit(acc, m_i, l_i, q, Kh, Vh, kb, pos_m, kv_len, stride_kt, stride_vt,
                                           offs_d, qk_scale, KeyMaskRow, Blocks_h, blocks_row,
                                           TokenMask_h, tm_row, layout_len, window, num_global, False,
                                           False, False, False, LAYOUT_BLOCK, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    else:
        # Dense: interior tiles unmasked, then the tail tile (masked). A key mask with holes masks every tile.
        num_unmasked = tl.where(holes, 0, kv_len // BLOCK_N)
        for kb in range(0, num_unmasked):
            acc, m_i, l_i = _fwd_visit(acc, m_i, l_i, q, Kh, Vh, kb, pos_m, kv_len, stride_kt, stride_vt,
                                       offs_d, qk_scale, KeyMaskRow, Blocks_h, blocks_row,
                                       TokenMask_h, tm_row, layout_len, window, num_global, False,
                                       False, False, False, LAYOUT_BLOCK, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
        for kb in range(num_unmasked, tl.cdiv(kv_len, BLOCK_N)):
            acc, m_i, l_i = _fwd_visit(acc, m_i, l_i, q, Kh, Vh, kb, pos_m, kv_len, stride_kt, stride_vt,
                                       offs_d, qk_scale, KeyMaskRow, Blocks_h, blocks_row,
                                       TokenMask_h, tm_row, layout_len, window, num_global, True,
                                       HAS_KEY_MASK, False, False, LAYOUT_BLOCK, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)

    # ---- normalise; a row with no key at all outputs 0 with lse = -inf
    empty = l_i == 0.0
    if not SPARSE:
        # Dense: every row of a sequence with a real key keeps it, so l = 0 there means every
        # score was -inf, which only an infinite input can cause: NaN out, not "no key".
        l_i = tl.where(empty & (kv_len > 0), float("nan"), l_i)
        empty = empty & (kv_len == 0)
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)
    _store_rows(Out + head_off, out, pos_m, seq_len, stride_tok, offs_d, HEAD_DIM)
    tl.store(Lse + (start + pos_m) * num_heads + head, lse, mask=pos_m < seq_len)


# --------------------------------------------------------------------------- backward
@triton.jit
def _delta_kernel(Out, DOut, Delta, num_tokens, num_heads, stride_tok, stride_head,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """delta[t, h] = sum_d dO[t, h, d] * O[t, h, d] in fp32 (the softmax-gradient row term)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(Out + head * stride_head, rows, rows < num_tokens, stride_tok, offs_d, True, HEAD_DIM, BLOCK_D)
    do = _load_rows(DOut + head * stride_head, rows, rows < num_tokens, stride_tok, offs_d, True, HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + rows.to(tl.int64) * num_heads + head, delta, mask=rows < num_tokens)


@triton.jit
def _dkdv_visit(dk, dv, k, v, Qh, DOh, Lse_h, Delta_h, qb, pos_n, seq_len, num_heads, stride_qt, stride_tok, offs_d,
                qk_scale,
                Blocks, blocks_row, TokenMask, tm_row, layout_len, window, num_global,
                MASKED: tl.constexpr, APPLY_RULE: tl.constexpr, HAS_TOKEN_MASK: tl.constexpr,
                LAYOUT_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                PRECISION: tl.constexpr):
    """Add one query block's contribution to a key block's dK, dV (tiles kept transposed:
    (BLOCK_N, BLOCK_M)). Keys need no mask here: invalid keys are zeroed at the store.
    MASKED: the query block may end past seq_len; APPLY_RULE: the layout rule of a partial tile."""
    pos_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_rows(Qh, pos_m, pos_m < seq_len, stride_qt, offs_d, MASKED, HEAD_DIM, BLOCK_D)
    do = _load_rows(DOh, pos_m, pos_m < seq_len, stride_tok, offs_d, MASKED, HEAD_DIM, BLOCK_D)
    if MASKED:
        lse = tl.load(Lse_h + pos_m.to(tl.int64) * num_heads, mask=pos_m < seq_len, other=float("inf"))
        delta = tl.load(Delta_h + pos_m.to(tl.int64) * num_heads, mask=pos_m < seq_len, other=0.0)
    else:
        lse = tl.load(Lse_h + pos_m.to(tl.int64) * num_heads)
        delta = tl.load(Delta_h + pos_m.to(tl.int64) * num_heads)
    # Rows without keys have lse = -inf; +inf makes their probabilities exactly 0.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
    p_t = tl.math.exp2(s_t - lse2[None, :])
    if APPLY_RULE:
        keep = _layout_keep(pos_m[None, :], pos_n[:, None], Blocks, blocks_row, TokenMask, tm_row, layout_len,
                            window, num_global, HAS_TOKEN_MASK, LAYOUT_BLOCK)
        p_t = tl.where(keep, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)          # dV = P^T dO
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)              # dP^T = V dO^T
    ds_t = p_t * (dp_t - delta[None, :])                                    # dS = P * (dP - delta)
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)           # dK = dS^T Q (scaled later)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    # pointers
    Q, K, V, DOut, Lse, Delta, DK, DV,
    CuSeqlens, KeyBounds, KeyMask,
    TileState, QIndex, QCount, Blocks, TokenMask,
    # sizes
    padded_len, num_heads, layout_len, window, num_global, seqlen_key,
    # strides
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,  # inputs: any token / head stride
    stride_tok, stride_head,  # outputs and output gradients: contiguous (tokens, H, D)
    state_head, state_row, index_head, index_row, count_head,
    blocks_head, blocks_row, tm_head, tm_row,
    # meta-parameters
    scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_PACKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    SPARSE: tl.constexpr, HAS_TOKEN_MASK: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    kb, head, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, seq_len, kv_len, holes = _sequence(batch, CuSeqlens, KeyBounds, padded_len, IS_PACKED, HAS_KEY_MASK)
    if kb * BLOCK_N >= seq_len:
        return

    # ---- this program's key block stays in registers; dK, dV accumulate in fp32
    offs_d = tl.arange(0, BLOCK_D)
    pos_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    head_off = start * stride_tok + head * stride_head
    k = _load_rows(K + start * stride_kt + head * stride_kh, pos_n, pos_n < seq_len, stride_kt, offs_d, True,
                   HEAD_DIM, BLOCK_D)
    v = _load_rows(V + start * stride_vt + head * stride_vh, pos_n, pos_n < seq_len, stride_vt, offs_d, True,
                   HEAD_DIM, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    Qh, DOh = Q + start * stride_qt + head * stride_qh, DOut + head_off
    Lse_h, Delta_h = Lse + start * num_heads + head, Delta + start * num_heads + head
    Blocks_h = Blocks + head * blocks_head
    TokenMask_h = TokenMask + head.to(tl.int64) * tm_head

    # ---- visit the query blocks that attend to this key block (none if all its keys are padding)
    if kb * BLOCK_N < kv_len:
        if SPARSE:
            count = tl.load(QCount + head * count_head + kb)
            for j in range(0, count):
                qb = tl.load(QIndex + head * index_head + kb * index_row + j)
                state = tl.load(TileState + head * state_head + qb * state_row + kb)
                if (state != 1) | ((qb + 1) * BLOCK_M > seq_len):
                    dk, dv = _dkdv_visit(dk, dv, k, v, Qh, DOh, Lse_h, Delta_h, qb, pos_n, seq_len, num_heads,
                                         stride_qt, stride_tok, offs_d, qk_scale, Blocks_h, blocks_row, TokenMask_h,
                                         tm_row,
                                         layout_len, window, num_global, True, True, HAS_TOKEN_MASK, LAYOUT_BLOCK,
                                         HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
                else:
                    dk, dv = _dkdv_visit(dk, dv, k, v, Qh, DOh, Lse_h, Delta_h, qb, pos_n, seq_len, num_heads,
                                         stride_qt, stride_tok, offs_d, qk_scale, Blocks_h, blocks_row, TokenMask_h,
                                         tm_row,
                                         layout_len, window, num_global, False, False, False, LAYOUT_BLOCK,
                                         HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
        else:
            num_unmasked = seq_len // BLOCK_M
            for qb in range(0, num_unmasked):
                dk, dv = _dkdv_visit(dk, dv, k, v, Qh, DOh, Lse_h, Delta_h, qb, pos_n, seq_len, num_heads,
                                     stride_qt, stride_tok, offs_d, qk_scale, Blocks_h, blocks_row, TokenMask_h,
                                     tm_row,
                                     layout_len, window, num_global, False, False, False, LAYOUT_BLOCK,
                                     HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
            for qb in range(num_unmasked, tl.cdiv(seq_len, BLOCK_M)):
                # Rows past seq_len read as zeros with lse = +inf: p = 0. No layout rule in dense mode.
                dk, dv = _dkdv_visit(dk, dv, k, v, Qh, DOh, Lse_h, Delta_h, qb, pos_n, seq_len, num_heads,
                                     stride_qt, stride_tok, offs_d, qk_scale, Blocks_h, blocks_row, TokenMask_h,
                                     tm_row,
                                     layout_len, window, num_global, True, False, False, LAYOUT_BLOCK,
                                     HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)

    # ---- padding keys never contributed: their gradients are exactly 0
    valid = pos_n < kv_len
    if HAS_KEY_MASK:
        valid = valid & (tl.load(KeyMask + batch.to(tl.int64) * padded_len + pos_n, mask=valid, other=0) != 0)
    dk = tl.where(valid[:, None], dk * scale, 0.0)
    dv = tl.where(valid[:, None], dv, 0.0)
    _store_rows(DK + head_off, dk, pos_n, seq_len, stride_tok, offs_d, HEAD_DIM)
    _store_rows(DV + head_off, dv, pos_n, seq_len, stride_tok, offs_d, HEAD_DIM)


@triton.jit
def _dq_visit(dq, q, do, lse2, delta, Kh, Vh, kb, pos_m, kv_len, stride_kt, stride_vt, offs_d, qk_scale,
              KeyMaskRow, Blocks, blocks_row, TokenMask, tm_row, layout_len, window, num_global,
              MASKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr, APPLY_RULE: tl.constexpr,
              HAS_TOKEN_MASK: tl.constexpr, LAYOUT_BLOCK: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Add one key block's contribution to a query block's dQ (masking as in the forward)."""
    pos_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    if MASKED:
        # dS is 0 at padding keys, but 0 times a NaN K row is NaN in dS K: K loads them as
        # zeros. V need not (dS is selected to 0 below); see _fwd_visit for why only one.
        real = _real_keys(pos_n, kv_len, KeyMaskRow, HAS_KEY_MASK)
        k = _load_rows(Kh, pos_n, real, stride_kt, offs_d, True, HEAD_DIM, BLOCK_D)
    else:
        k = _load_rows(Kh, pos_n, None, stride_kt, offs_d, False, HEAD_DIM, BLOCK_D)
    v = _load_rows(Vh, pos_n, pos_n < kv_len, stride_vt, offs_d, MASKED, HEAD_DIM, BLOCK_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        keep = real[None, :]
        if APPLY_RULE:
            keep = keep & _layout_keep(pos_m[:, None], pos_n[None, :], Blocks, blocks_row, TokenMask, tm_row,
                                       layout_len, window, num_global, HAS_TOKEN_MASK, LAYOUT_BLOCK)
        s = tl.where(keep, s, float("-inf"))
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)               # dP = dO V^T
    ds = p * (dp - delta[:, None])                                         # dS = P * (dP - delta)
    if MASKED:
        ds = tl.where(keep, ds, 0.0)  # a NaN V row at a padding key makes dP NaN there, and p = 0 keeps it
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)            # dQ = dS K (scaled later)
    return dq


@triton.jit
def _dq_kernel(
    # pointers
    Q, K, V, DOut, Lse, Delta, DQ,
    CuSeqlens, KeyBounds, KeyMask,
    TileState, KvIndex, KvCount, Blocks, TokenMask,
    # sizes
    padded_len, num_heads, layout_len, window, num_global, seqlen_key,
    # strides
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,  # inputs: any token / head stride
    stride_tok, stride_head,  # outputs and output gradients: contiguous (tokens, H, D)
    state_head, state_row, index_head, index_row, count_head,
    blocks_head, blocks_row, tm_head, tm_row,
    # meta-parameters
    scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_PACKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    SPARSE: tl.constexpr, HAS_TOKEN_MASK: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    qb, head, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, seq_len, kv_len, holes = _sequence(batch, CuSeqlens, KeyBounds, padded_len, IS_PACKED, HAS_KEY_MASK)
    if qb * BLOCK_M >= seq_len:
        return

    # ---- the query block, its output gradient and row statistics stay in registers
    offs_d = tl.arange(0, BLOCK_D)
    pos_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    head_off = start * stride_tok + head * stride_head
    q = _load_rows(Q + start * stride_qt + head * stride_qh, pos_m, pos_m < seq_len, stride_qt, offs_d, True,
                   HEAD_DIM, BLOCK_D)
    Kh, Vh = K + start * stride_kt + head * stride_kh, V + start * stride_vt + head * stride_vh
    do = _load_rows(DOut + head_off, pos_m, pos_m < seq_len, stride_tok, offs_d, True, HEAD_DIM, BLOCK_D)
    lse = tl.load(Lse + (start + pos_m) * num_heads + head, mask=pos_m < seq_len, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(Delta + (start + pos_m) * num_heads + head, mask=pos_m < seq_len, other=0.0)
    KeyMaskRow = KeyMask + batch.to(tl.int64) * padded_len
    Blocks_h = Blocks + head * blocks_head
    TokenMask_h = TokenMask + head.to(tl.int64) * tm_head
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # ---- visit the key blocks (same lists and masking as the forward)
    if SPARSE:
        count = tl.load(KvCount + head * count_head + qb)
        for j in range(0, count):
            kb = tl.load(KvIndex + head * index_head + qb * index_row + j)
            state = tl.load(TileState + head * state_head + qb * state_row + kb)
            needs_mask = (state != 1) | ((kb + 1) * BLOCK_N > kv_len) | holes
            if needs_mask:
                dq = _dq_visit(dq, q, do, lse2, delta, Kh, Vh, kb, pos_m, kv_len, stride_kt, stride_vt,
                               offs_d, qk_scale, KeyMaskRow, Blocks_h, blocks_row, TokenMask_h, tm_row, layout_len,
                               window, num_global, True, HAS_KEY_MASK, True, HAS_TOKEN_MASK, LAYOUT_BLOCK,
                               HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
            else:
                dq = _dq_visit(dq, q, do, lse2, delta, Kh, Vh, kb, pos_m, kv_len, stride_kt, stride_vt,
                               offs_d, qk_scale, KeyMaskRow, Blocks_h, blocks_row, TokenMask_h, tm_row, layout_len,
                               window, num_global, False, False, False, False, LAYOUT_BLOCK,
                               HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    else:
        num_unmasked = tl.where(holes, 0, kv_len // BLOCK_N)
        for kb in range(0, num_unmasked):
            dq = _dq_visit(dq, q, do, lse2, delta, Kh, Vh, kb, pos_m, kv_len, stride_kt, stride_vt,
                           offs_d, qk_scale, KeyMaskRow, Blocks_h, blocks_row, TokenMask_h, tm_row, layout_len,
                           window, num_global, False, False, False, False, LAYOUT_BLOCK,
                           HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
        for kb in range(num_unmasked, tl.cdiv(kv_len, BLOCK_N)):
            dq = _dq_visit(dq, q, do, lse2, delta, Kh, Vh, kb, pos_m, kv_len, stride_kt, stride_vt,
                           offs_d, qk_scale, KeyMaskRow, Blocks_h, blocks_row, TokenMask_h, tm_row, layout_len,
                           window, num_global, True, HAS_KEY_MASK, False, False, LAYOUT_BLOCK,
                           HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)

    _store_rows(DQ + head_off, dq * scale, pos_m, seq_len, stride_tok, offs_d, HEAD_DIM)


# --------------------------------------------------------------------------- autotuning
def _cfg(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Dense tiles (BLOCK_M, BLOCK_N, warps, stages) per kernel and head-dim class, best guess first.
# Chosen from sm_90 compiles (kernels/_flash_compile.py + cuobjdump --dump-resource-usage): at
# head dim <= 64 none of these spills registers; at 128 every candidate spilled a little, these
# the least. Not yet timed on a GPU: the autotuner picks among them per head dim and power-of-two
# sequence length. Under the interpreter one small fixed tile keeps tests quick.
_DENSE_TILES = {
    "fwd": {"small": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
            "large": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 64, 8, 3)]},
    "dkdv": {"small": [(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3)],
             "large": [(64, 64, 8, 3), (32, 128, 8, 3), (32, 64, 4, 3)]},
    "dq": {"small": [(128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)],
           "large": [(64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 3)]},
}
INTERPRETER_TILE = 32
_KEY = ["HEAD_DIM", "seqlen_key", "IS_PACKED", "HAS_KEY_MASK", "SPARSE"]


def dense_tiles(name: str, head_dim: int) -> list:
    return _DENSE_TILES[name]["small" if head_dim <= 64 else "large"]


def _as_tuple(config) -> tuple:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def _prune_for_head_dim(configs, named_args, *, name: str, first_only: bool, **kwargs):
    """Keep the tiles listed for this head dim (only the first when not tuning). Constexprs
    passed by keyword, like HEAD_DIM, reach the pruner in kwargs, not in named_args."""
    wanted = dense_tiles(name, kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 64)))
    wanted = wanted[:1] if first_only else wanted
    return [c for c in configs if _as_tuple(c) in wanted] or configs[:1]


def autotune_enabled() -> bool:
    """FASTMLM_TRITON_AUTOTUNE=0 runs the first config of each list instead of tuning: every
    new shape/dtype then costs one compile per kernel rather than one per config (test runs)."""
    return os.environ.get("FASTMLM_TRITON_AUTOTUNE", "1") != "0"


def kernel(name: str, sparse_tile: int = 0):
    """The launchable (autotuned) kernel ``name`` in {"fwd", "dkdv", "dq"}.

    Dense (sparse_tile=0): tiles from the lists above. Block-sparse: the tile is fixed
    by the layout (sparse_tile), only warps and stages are tuned. Built on first use,
    so importing this module never touches a GPU.
    """
    return _build_kernel(name, sparse_tile, triton_interpret(), autotune_enabled())


@functools.lru_cache(maxsize=None)
def _build_kernel(name: str, sparse_tile: int, interpret: bool, tune: bool):
    fn = {"fwd": _fwd_kernel, "dkdv": _dkdv_kernel, "dq": _dq_kernel}[name]
    prune = None
    if interpret:
        tile = sparse_tile or INTERPRETER_TILE
        configs = [_cfg(tile, tile, 4, 1)]
    elif sparse_tile:
        warps = (4, 8) if sparse_tile <= 32 else (8, 4)  # 64-wide tiles spilled with 4 warps on sm_90
        configs = [_cfg(sparse_tile, sparse_tile, w, s) for w in warps for s in (3, 2)][: 4 if tune else 1]
    else:
        tiles = dict.fromkeys(_DENSE_TILES[name]["small"] + _DENSE_TILES[name]["large"])  # ordered union
        configs = [_cfg(*t) for t in tiles]
        prune = {"early_config_prune": functools.partial(_prune_for_head_dim, name=name, first_only=not tune)}
    return triton.autotune(configs, key=_KEY, prune_configs_by=prune)(fn)


# --------------------------------------------------------------------------- launchers
class Schedule:
    """Which key blocks each query block visits. Dense: ``Schedule()`` (all of them).

    Block-sparse: tile (kernel tile edge), tile_state (Hl, nq, nk) int8, kv_index /
    kv_count (per query block, ascending), q_index / q_count (per key block, the
    transposed list), plus the layout's fine rule: blocks, layout_block, layout_len,
    window, num_global, token_mask. Leading dims of size 1 serve every head.
    """

    def __init__(self, tile=0, tile_state=None, kv_index=None, kv_count=None, q_index=None, q_count=None,
                 blocks=None, layout_block=1, layout_len=0, window=-1, num_global=0, token_mask=None):
        self.sparse = tile > 0
        self.tile, self.tile_state = tile, tile_state
        self.kv_index, self.kv_count, self.q_index, self.q_count = kv_index, kv_count, q_index, q_count
        self.blocks, self.layout_block, self.layout_len = blocks, layout_block, layout_len
        self.window, self.num_global, self.token_mask = window, num_global, token_mask

    def args(self, dummy: torch.Tensor, transpose: bool):
        """Pointer, size and stride arguments for a kernel, in kernel order."""
        if not self.sparse:
            return dict(pointers=(dummy,) * 5, sizes=(0, -1, 0), strides=(0,) * 9, token_mask=False)
        index, count = (self.q_index, self.q_count) if transpose else (self.kv_index, self.kv_count)
        tm = self.token_mask
        shared = lambda t: 0 if t.shape[0] == 1 else t.stride(0)  # one layout for every head
        return dict(
            pointers=(self.tile_state, index, count, self.blocks, dummy if tm is None else tm),
            sizes=(self.layout_len, self.window, self.num_global),
            strides=(shared(self.tile_state), self.tile_state.stride(1), shared(index), index.stride(1), shared(count),
                     shared(self.blocks), self.blocks.stride(1),
                     0 if tm is None else shared(tm), 0 if tm is None else tm.stride(1)),
            token_mask=tm is not None,
        )


def _common(q, attention_mask, cu_seqlens, max_seqlen):
    """Flattened views, sequence-bound tensors and the batch size of either layout."""
    packed = cu_seqlens is not None
    heads, head_dim = q.shape[-2], q.shape[-1]
    batch = cu_seqlens.numel() - 1 if packed else q.shape[0]
    padded_len = 0 if packed else q.shape[1]
    key_bounds = key_mask = None
    if attention_mask is not None and padded_len:
        mask = attention_mask.bool()
        # Keys past the last real one are never visited: kv_len = last True position + 1 (0 if none).
        # "holes": some key before kv_len is padding, so every tile needs the per-element mask.
        positions = torch.arange(1, padded_len + 1, device=q.device, dtype=torch.int32)
        kv_len = torch.where(mask, positions, 0).amax(dim=1)
        holes = mask.sum(dim=1, dtype=torch.int32) != kv_len
        key_bounds = torch.stack([kv_len, holes.to(torch.int32)], dim=1).to(torch.int32).contiguous()  # (B, 2)
        key_mask = mask.contiguous().view(torch.uint8)
    # The kernels read cu_seqlens with unit stride.
    cu_seqlens = None if cu_seqlens is None else cu_seqlens.contiguous()
    return dict(packed=packed, heads=heads, head_dim=head_dim, batch=batch, padded_len=padded_len,
                key_bounds=key_bounds, key_mask=key_mask, max_seqlen=max_seqlen, cu_seqlens=cu_seqlens)


def _bound_pointers(info, dummy):
    """CuSeqlens, KeyBounds, KeyMask kernel arguments; ``dummy`` stands in for the absent ones."""
    return tuple(dummy if info[name] is None else info[name] for name in ("cu_seqlens", "key_bounds", "key_mask"))


def _meta(info, schedule, dtype):
    head_dim = info["head_dim"]
    return dict(
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        IS_PACKED=info["packed"], HAS_KEY_MASK=info["key_mask"] is not None,
        SPARSE=schedule.sparse, LAYOUT_BLOCK=schedule.layout_block,
        PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )


def _tokens(t: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(tokens, H, D) view with unit stride along D. Inputs sliced from a fused QKV projection
    keep their token / head strides (no copy); only layouts that cannot be flattened are copied."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.reshape(-1, heads, head_dim)


def _input_strides(*tensors):
    return tuple(stride for t in tensors for stride in (t.stride(0), t.stride(1)))


def forward(q, k, v, attention_mask, cu_seqlens, max_seqlen, scale, schedule: Schedule):
    """Launch the forward; returns (out shaped like q, lse shaped q.shape[:-1] fp32)."""
    info = _common(q, attention_mask, cu_seqlens, max_seqlen)
    h, d = info["heads"], info["head_dim"]
    qf, kf, vf = (_tokens(t, h, d) for t in (q, k, v))
    out = torch.empty(qf.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty(qf.shape[:-1], device=q.device, dtype=torch.float32)
    if qf.shape[0] and info["max_seqlen"] and info["batch"]:
        sparse = schedule.args(lse, transpose=False)
        dummy = lse
        fn = kernel("fwd", schedule.tile)
        grid = lambda meta: (triton.cdiv(info["max_seqlen"], meta["BLOCK_M"]), h, info["batch"])
        fn[grid](
            qf, kf, vf, out, lse,
            *_bound_pointers(info, dummy),
            *sparse["pointers"],
            info["padded_len"], h, *sparse["sizes"], triton.next_power_of_2(info["max_seqlen"]),
            *_input_strides(qf, kf, vf), out.stride(0), out.stride(1), *sparse["strides"],
            scale * LOG2E,
            HAS_TOKEN_MASK=sparse["token_mask"], **_meta(info, schedule, q.dtype),
        )
    return out.view(q.shape), lse.view(q.shape[:-1])


def backward(dout, q, k, v, out, lse, attention_mask, cu_seqlens, max_seqlen, scale, schedule: Schedule):
    """Launch delta, dK/dV and dQ kernels; returns (dq, dk, dv) shaped like q."""
    info = _common(q, attention_mask, cu_seqlens, max_seqlen)
    h, d = info["heads"], info["head_dim"]
    qf, kf, vf = (_tokens(t, h, d) for t in (q, k, v))
    of, dof = (t.contiguous().view(-1, h, d) for t in (out, dout))  # one (H * D, D) stride pair for both
    lsef = lse.contiguous().view(-1, h)
    dq, dk, dv = (torch.empty(qf.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    tokens = qf.shape[0]
    if not (tokens and info["max_seqlen"] and info["batch"]):
        return dq.view(q.shape), dk.view(q.shape), dv.view(q.shape)
    meta = _meta(info, schedule, q.dtype)

    # ---- preprocess: delta = rowsum(dO * O)
    delta = torch.empty_like(lsef)
    block_t = 16 if triton_interpret() else 64
    _delta_kernel[(triton.cdiv(tokens, block_t), h)](of, dof, delta, tokens, h, of.stride(0), of.stride(1),
                                                      HEAD_DIM=d, BLOCK_D=meta["BLOCK_D"], BLOCK_T=block_t)

    bounds = _bound_pointers(info, lsef)
    seqlen_key = triton.next_power_of_2(info["max_seqlen"])

    # ---- dK, dV: one program per key block, walking the query blocks that see it
    sparse = schedule.args(lsef, transpose=True)
    kernel("dkdv", schedule.tile)[lambda m: (triton.cdiv(info["max_seqlen"], m["BLOCK_N"]), h, info["batch"])](
        qf, kf, vf, dof, lsef, delta, dk, dv, *bounds, *sparse["pointers"],
        info["padded_len"], h, *sparse["sizes"], seqlen_key,
        *_input_strides(qf, kf, vf), of.stride(0), of.stride(1), *sparse["strides"],
        scale, scale * LOG2E,
        HAS_TOKEN_MASK=sparse["token_mask"], **meta,
    )
    # ---- dQ: one program per query block, walking the same key blocks as the forward
    sparse = schedule.args(lsef, transpose=False)
    kernel("dq", schedule.tile)[lambda m: (triton.cdiv(info["max_seqlen"], m["BLOCK_M"]), h, info["batch"])](
        qf, kf, vf, dof, lsef, delta, dq, *bounds, *sparse["pointers"],
        info["padded_len"], h, *sparse["sizes"], seqlen_key,
        *_input_strides(qf, kf, vf), of.stride(0), of.stride(1), *sparse["strides"],
        scale, scale * LOG2E,
        HAS_TOKEN_MASK=sparse["token_mask"], **meta,
    )
    return dq.view(q.shape), dk.view(q.shape), dv.view(q.shape)
