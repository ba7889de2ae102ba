"""FlashAttention-style kernels shared by dense and block-sparse attention (non-causal): the JIT code alone.

The launchers, the dense schedule and the autotune lists are in ``attention.py``; the
block-sparse schedules (visit lists over kernel tiles) in ``block_sparse.py``.

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
partially kept tiles (tile states SKIP / FULL / PARTIAL of fastmlm/ops/block_layout.py).

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

Kernel arguments come in groups: pointers (tensors capitalised), sizes, strides
(``stride_<tensor>_<dim>``, in elements: ``q``/``k``/``v`` the inputs, ``o`` the
contiguous outputs and output gradients, which share one pair; ``state``/``index``/
``count`` the schedule; ``blocks``/``tm`` the layout's fine states and token mask;
a ``_head`` stride is 0 when one layout serves every head), then meta-parameters.

Limits: head_dim a multiple of 8 up to 128 (padded to a power of two >= 16
with masked loads); fp16, bf16 and fp32 (fp32 uses IEEE dot products, not TF32).

How these kernels differ from the CUDA ones (csrc/attention.cuh):

  * dtypes: fp16, bf16 and fp32 here; CUDA takes fp16/bf16 only (mma.sync, sm_80+).
  * block-sparse attention: both walk the same visit lists; CUDA needs layout blocks that
    are multiples of 64 (its query tile), with no pooling of smaller blocks.
  * tiles: autotuned BLOCK_M x BLOCK_N from per-head-dim lists (attention.py); CUDA has
    fixed tiles, 64 query rows per block (4 warps x 16) and 64 keys (32 at head dim 128).
  * head dims: any multiple of 8 up to 128, padded to a power of two with masked loads;
    CUDA instantiates 32, 64 and 128 and zero-pads smaller head dims to the next one.
  * strides: any token and head stride is read in place; CUDA needs contiguous,
    16-byte aligned tensors (its Python driver copies).
  * key mask: (kv_len, holes) per sequence, so a right-padded batch runs its interior
    tiles unmasked; CUDA applies the mask per element on every tile before key_len.
  * pipelining: left to the Triton compiler (num_stages); CUDA double-buffers its tiles
    with cp.async by hand.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastmlm.ops import block_layout

# The tile states of block_layout.py, as constexprs: Triton's JIT code reads no plain globals.
FULL = tl.constexpr(block_layout.FULL)
PARTIAL = tl.constexpr(block_layout.PARTIAL)


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
def _layout_keep(pos_q, pos_k, Blocks, stride_blocks_row, TokenMask, stride_tm_row, layout_len, window, num_global,
                 HAS_TOKEN_MASK: tl.constexpr, LAYOUT_BLOCK: tl.constexpr):
    """Which (query, key) pairs of a partially kept block-sparse tile the layout keeps.
    pos_q / pos_k are positions in the sequence, already broadcast to the tile's 2-D shape
    (either orientation): the fine layout block's state, FULL or PARTIAL with the token rule
    |i - j| <= window  or  i < num_global  or  j < num_global  or  token_mask[i, j]."""
    inside = (pos_q < layout_len) & (pos_k < layout_len)
    fine = tl.load(Blocks + (pos_q // LAYOUT_BLOCK) * stride_blocks_row + pos_k // LAYOUT_BLOCK, mask=inside, other=0)
    distance = pos_q - pos_k
    rule = (tl.where(distance < 0, -distance, distance) <= window) | (pos_q < num_global) | (pos_k < num_global)
    if HAS_TOKEN_MASK:
        rule = rule | (tl.load(TokenMask + pos_q.to(tl.int64) * stride_tm_row + pos_k, mask=inside, other=0) != 0)
    return (fine == FULL) | ((fine == PARTIAL) & rule)


# --------------------------------------------------------------------------- forward
@triton.jit
def _fwd_visit(acc, m_i, l_i, q, Kh, Vh, kb, pos_m, kv_len, stride_k_tok, stride_v_tok, offs_d, qk_scale,
               KeyMaskRow, Blocks, stride_blocks_row, TokenMask, stride_tm_row, layout_len, window, num_global,
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
        real = _real_keys(pos_n, kv_len, KeyMaskRow, HAS_KEY_MASK=HAS_KEY_MASK)
        v = _load_rows(Vh, pos_n, real, stride_v_tok, offs_d, CHECK_ROWS=True, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    else:
        v = _load_rows(Vh, pos_n, None, stride_v_tok, offs_d, CHECK_ROWS=False, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    k = _load_rows(Kh, pos_n, pos_n < kv_len, stride_k_tok, offs_d, CHECK_ROWS=MASKED, HEAD_DIM=HEAD_DIM,
                   BLOCK_D=BLOCK_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        keep = real[None, :]
        if APPLY_RULE:
            keep = keep & _layout_keep(pos_m[:, None], pos_n[None, :], Blocks, stride_blocks_row, TokenMask,
                                       stride_tm_row, layout_len, window, num_global,
                                       HAS_TOKEN_MASK=HAS_TOKEN_MASK, LAYOUT_BLOCK=LAYOUT_BLOCK)
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
    # pointers: sequence bounds (B + 1,) / (B, 2) int32 and key-padding mask (B, S) uint8
    CuSeqlens, KeyBounds, KeyMask,
    # pointers: block-sparse schedule over kernel tiles, and the layout's token rule
    TileState, KvIndex, KvCount, Blocks, TokenMask,
    # sizes
    padded_len, num_heads, layout_len, window, num_global, seqlen_key,
    # strides (elements)
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,  # inputs: any strides
    stride_o_tok, stride_o_head,  # outputs: contiguous (tokens, H, D)
    stride_state_head, stride_state_row, stride_index_head, stride_index_row, stride_count_head,
    stride_blocks_head, stride_blocks_row, stride_tm_head, stride_tm_row,
    # meta-parameters
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_PACKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    SPARSE: tl.constexpr, HAS_TOKEN_MASK: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    qb, head, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, seq_len, kv_len, holes = _sequence(batch, CuSeqlens, KeyBounds, padded_len, IS_PACKED=IS_PACKED,
                                              HAS_KEY_MASK=HAS_KEY_MASK)
    if qb * BLOCK_M >= seq_len:  # this query block lies past a shorter packed sequence
        return

    # ---- load the query block once; it stays in registers for the whole loop
    offs_d = tl.arange(0, BLOCK_D)
    pos_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + start * stride_q_tok + head * stride_q_head, pos_m, pos_m < seq_len, stride_q_tok, offs_d,
                   CHECK_ROWS=True, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    Kh, Vh = K + start * stride_k_tok + head * stride_k_head, V + start * stride_v_tok + head * stride_v_head
    KeyMaskRow = KeyMask + batch.to(tl.int64) * padded_len
    Blocks_h = Blocks + head * stride_blocks_head
    TokenMask_h = TokenMask + head.to(tl.int64) * stride_tm_head

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # ---- visit the key blocks
    if SPARSE:
        count = tl.load(KvCount + head * stride_count_head + qb)
        for j in range(0, count):
            kb = tl.load(KvIndex + head * stride_index_head + qb * stride_index_row + j)
            state = tl.load(TileState + head * stride_state_head + qb * stride_state_row + kb)
            needs_mask = (state != FULL) | ((kb + 1) * BLOCK_N > kv_len) | holes
            if needs_mask:
                acc, m_i, l_i = _fwd_visit(
                    acc, m_i, l_i, q, Kh, Vh, kb, pos_m, kv_len, stride_k_tok, stride_v_tok, offs_d, qk_scale,
                    KeyMaskRow, Blocks_h, stride_blocks_row, TokenMask_h, stride_tm_row, layout_len, window,
                    num_global, MASKED=True, HAS_KEY_MASK=HAS_KEY_MASK, APPLY_RULE=True,
                    HAS_TOKEN_MASK=HAS_TOKEN_MASK, LAYOUT_BLOCK=LAYOUT_BLOCK,
                    HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, PRECISION=PRECISION)
            else:  # fully kept tile: no per-element mask
                acc, m_i, l_i = _fwd_visit(
                    acc, m_i, l_i, q, Kh, Vh, kb, pos_m, kv_len, stride_k_tok, stride_v_tok, offs_d, qk_scale,
                    KeyMaskRow, Blocks_h, stride_blocks_row, TokenMask_h, stride_tm_row, layout_len, window,
                    num_global, MASKED=False, HAS_KEY_MASK=False, APPLY_RULE=False,
                    HAS_TOKEN_MASK=False, LAYOUT_BLOCK=LAYOUT_BLOCK,
                    HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, PRECISION=PRECISION)
    else:
        # Dense: interior tiles unmasked, then the tail tile (masked). A key mask with holes masks every tile.
        num_unmasked = tl.where(holes, 0, kv_len // BLOCK_N)
        for kb in range(0, num_unmasked):
            acc, m_i, l_i = _fwd_visit(
                acc, m_i, l_i, q, Kh, Vh, kb, pos_m, kv_len, stride_k_tok, stride_v_tok, offs_d, qk_scale,
                KeyMaskRow, Blocks_h, stride_blocks_row, TokenMask_h, stride_tm_row, layout_len, window,
                num_global, MASKED=False, HAS_KEY_MASK=False, APPLY_RULE=False,
                HAS_TOKEN_MASK=False, LAYOUT_BLOCK=LAYOUT_BLOCK,
                HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, PRECISION=PRECISION)
        for kb in range(num_unmasked, tl.cdiv(kv_len, BLOCK_N)):
            acc, m_i, l_i = _fwd_visit(
                acc, m_i, l_i, q, Kh, Vh, kb, pos_m, kv_len, stride_k_tok, stride_v_tok, offs_d, qk_scale,
                KeyMaskRow, Blocks_h, stride_blocks_row, TokenMask_h, stride_tm_row, layout_len, window,
                num_global, MASKED=True, HAS_KEY_MASK=HAS_KEY_MASK, APPLY_RULE=False,
                HAS_TOKEN_MASK=False, LAYOUT_BLOCK=LAYOUT_BLOCK,
                HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, PRECISION=PRECISION)

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
    _store_rows(Out + start * stride_o_tok + head * stride_o_head, out, pos_m, seq_len, stride_o_tok, offs_d,
                HEAD_DIM=HEAD_DIM)
    tl.store(Lse + (start + pos_m) * num_heads + head, lse, mask=pos_m < seq_len)


# --------------------------------------------------------------------------- backward
@triton.jit
def _delta_kernel(Out, DOut, Delta, num_tokens, num_heads, stride_o_tok, stride_o_head,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """delta[t, h] = sum_d dO[t, h, d] * O[t, h, d] in fp32 (the softmax-gradient row term)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(Out + head * stride_o_head, rows, rows < num_tokens, stride_o_tok, offs_d, CHECK_ROWS=True,
                   HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    do = _load_rows(DOut + head * stride_o_head, rows, rows < num_tokens, stride_o_tok, offs_d, CHECK_ROWS=True,
                    HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + rows.to(tl.int64) * num_heads + head, delta, mask=rows < num_tokens)


@triton.jit
def _dkdv_visit(dk, dv, k, v, Qh, DOh, Lse_h, Delta_h, qb, pos_n, seq_len, num_heads, stride_q_tok, stride_o_tok,
                offs_d, qk_scale, Blocks, stride_blocks_row, TokenMask, stride_tm_row, layout_len, window, num_global,
                MASKED: tl.constexpr, APPLY_RULE: tl.constexpr, HAS_TOKEN_MASK: tl.constexpr,
                LAYOUT_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                PRECISION: tl.constexpr):
    """Add one query block's contribution to a key block's dK, dV (tiles kept transposed:
    (BLOCK_N, BLOCK_M)). Keys need no mask here: invalid keys are zeroed at the store.
    MASKED: the query block may end past seq_len; APPLY_RULE: the layout rule of a partial tile."""
    pos_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_rows(Qh, pos_m, pos_m < seq_len, stride_q_tok, offs_d, CHECK_ROWS=MASKED, HEAD_DIM=HEAD_DIM,
                   BLOCK_D=BLOCK_D)
    do = _load_rows(DOh, pos_m, pos_m < seq_len, stride_o_tok, offs_d, CHECK_ROWS=MASKED, HEAD_DIM=HEAD_DIM,
                    BLOCK_D=BLOCK_D)
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
        keep = _layout_keep(pos_m[None, :], pos_n[:, None], Blocks, stride_blocks_row, TokenMask, stride_tm_row,
                            layout_len, window, num_global, HAS_TOKEN_MASK=HAS_TOKEN_MASK, LAYOUT_BLOCK=LAYOUT_BLOCK)
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
    # strides (elements)
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,  # inputs: any strides
    stride_o_tok, stride_o_head,  # output gradients: contiguous (tokens, H, D)
    stride_state_head, stride_state_row, stride_index_head, stride_index_row, stride_count_head,
    stride_blocks_head, stride_blocks_row, stride_tm_head, stride_tm_row,
    # meta-parameters
    scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_PACKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    SPARSE: tl.constexpr, HAS_TOKEN_MASK: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    kb, head, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, seq_len, kv_len, holes = _sequence(batch, CuSeqlens, KeyBounds, padded_len, IS_PACKED=IS_PACKED,
                                              HAS_KEY_MASK=HAS_KEY_MASK)
    if kb * BLOCK_N >= seq_len:
        return

    # ---- this program's key block stays in registers; dK, dV accumulate in fp32
    offs_d = tl.arange(0, BLOCK_D)
    pos_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    grad_off = start * stride_o_tok + head * stride_o_head
    k = _load_rows(K + start * stride_k_tok + head * stride_k_head, pos_n, pos_n < seq_len, stride_k_tok, offs_d,
                   CHECK_ROWS=True, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    v = _load_rows(V + start * stride_v_tok + head * stride_v_head, pos_n, pos_n < seq_len, stride_v_tok, offs_d,
                   CHECK_ROWS=True, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    Qh, DOh = Q + start * stride_q_tok + head * stride_q_head, DOut + grad_off
    Lse_h, Delta_h = Lse + start * num_heads + head, Delta + start * num_heads + head
    Blocks_h = Blocks + head * stride_blocks_head
    TokenMask_h = TokenMask + head.to(tl.int64) * stride_tm_head

    # ---- visit the query blocks that attend to this key block (none if all its keys are padding)
    if kb * BLOCK_N < kv_len:
        if SPARSE:
            count = tl.load(QCount + head * stride_count_head + kb)
            for j in range(0, count):
                qb = tl.load(QIndex + head * stride_index_head + kb * stride_index_row + j)
                state = tl.load(TileState + head * stride_state_head + qb * stride_state_row + kb)
                if (state != FULL) | ((qb + 1) * BLOCK_M > seq_len):
                    dk, dv = _dkdv_visit(
                        dk, dv, k, v, Qh, DOh, Lse_h, Delta_h, qb, pos_n, seq_len, num_heads, stride_q_tok,
                        stride_o_tok, offs_d, qk_scale, Blocks_h, stride_blocks_row, TokenMask_h, stride_tm_row,
                        layout_len, window, num_global, MASKED=True, APPLY_RULE=True, HAS_TOKEN_MASK=HAS_TOKEN_MASK,
                        LAYOUT_BLOCK=LAYOUT_BLOCK, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M,
                        PRECISION=PRECISION)
                else:
                    dk, dv = _dkdv_visit(
                        dk, dv, k, v, Qh, DOh, Lse_h, Delta_h, qb, pos_n, seq_len, num_heads, stride_q_tok,
                        stride_o_tok, offs_d, qk_scale, Blocks_h, stride_blocks_row, TokenMask_h, stride_tm_row,
                        layout_len, window, num_global, MASKED=False, APPLY_RULE=False, HAS_TOKEN_MASK=False,
                        LAYOUT_BLOCK=LAYOUT_BLOCK, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M,
                        PRECISION=PRECISION)
        else:
            num_unmasked = seq_len // BLOCK_M
            for qb in range(0, num_unmasked):
                dk, dv = _dkdv_visit(
                    dk, dv, k, v, Qh, DOh, Lse_h, Delta_h, qb, pos_n, seq_len, num_heads, stride_q_tok,
                    stride_o_tok, offs_d, qk_scale, Blocks_h, stride_blocks_row, TokenMask_h, stride_tm_row,
                    layout_len, window, num_global, MASKED=False, APPLY_RULE=False, HAS_TOKEN_MASK=False,
                    LAYOUT_BLOCK=LAYOUT_BLOCK, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M,
                    PRECISION=PRECISION)
            for qb in range(num_unmasked, tl.cdiv(seq_len, BLOCK_M)):
                # Rows past seq_len read as zeros with lse = +inf: p = 0. No layout rule in dense mode.
                dk, dv = _dkdv_visit(
                    dk, dv, k, v, Qh, DOh, Lse_h, Delta_h, qb, pos_n, seq_len, num_heads, stride_q_tok,
                    stride_o_tok, offs_d, qk_scale, Blocks_h, stride_blocks_row, TokenMask_h, stride_tm_row,
                    layout_len, window, num_global, MASKED=True, APPLY_RULE=False, HAS_TOKEN_MASK=False,
                    LAYOUT_BLOCK=LAYOUT_BLOCK, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M,
                    PRECISION=PRECISION)

    # ---- padding keys never contributed: their gradients are exactly 0
    valid = pos_n < kv_len
    if HAS_KEY_MASK:
        valid = valid & (tl.load(KeyMask + batch.to(tl.int64) * padded_len + pos_n, mask=valid, other=0) != 0)
    dk = tl.where(valid[:, None], dk * scale, 0.0)
    dv = tl.where(valid[:, None], dv, 0.0)
    _store_rows(DK + grad_off, dk, pos_n, seq_len, stride_o_tok, offs_d, HEAD_DIM=HEAD_DIM)
    _store_rows(DV + grad_off, dv, pos_n, seq_len, stride_o_tok, offs_d, HEAD_DIM=HEAD_DIM)


@triton.jit
def _dq_visit(dq, q, do, lse2, delta, Kh, Vh, kb, pos_m, kv_len, stride_k_tok, stride_v_tok, offs_d, qk_scale,
              KeyMaskRow, Blocks, stride_blocks_row, TokenMask, stride_tm_row, layout_len, window, num_global,
              MASKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr, APPLY_RULE: tl.constexpr,
              HAS_TOKEN_MASK: tl.constexpr, LAYOUT_BLOCK: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Add one key block's contribution to a query block's dQ (masking as in the forward)."""
    pos_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    if MASKED:
        # dS is 0 at padding keys, but 0 times a NaN K row is NaN in dS K: K loads them as
        # zeros. V need not (dS is selected to 0 below); see _fwd_visit for why only one.
        real = _real_keys(pos_n, kv_len, KeyMaskRow, HAS_KEY_MASK=HAS_KEY_MASK)
        k = _load_rows(Kh, pos_n, real, stride_k_tok, offs_d, CHECK_ROWS=True, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    else:
        k = _load_rows(Kh, pos_n, None, stride_k_tok, offs_d, CHECK_ROWS=False, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    v = _load_rows(Vh, pos_n, pos_n < kv_len, stride_v_tok, offs_d, CHECK_ROWS=MASKED, HEAD_DIM=HEAD_DIM,
                   BLOCK_D=BLOCK_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        keep = real[None, :]
        if APPLY_RULE:
            keep = keep & _layout_keep(pos_m[:, None], pos_n[None, :], Blocks, stride_blocks_row, TokenMask,
                                       stride_tm_row, layout_len, window, num_global,
                                       HAS_TOKEN_MASK=HAS_TOKEN_MASK, LAYOUT_BLOCK=LAYOUT_BLOCK)
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
    # strides (elements)
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,  # inputs: any strides
    stride_o_tok, stride_o_head,  # output gradients: contiguous (tokens, H, D)
    stride_state_head, stride_state_row, stride_index_head, stride_index_row, stride_count_head,
    stride_blocks_head, stride_blocks_row, stride_tm_head, stride_tm_row,
    # meta-parameters
    scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_PACKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    SPARSE: tl.constexpr, HAS_TOKEN_MASK: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    qb, head, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, seq_len, kv_len, holes = _sequence(batch, CuSeqlens, KeyBounds, padded_len, IS_PACKED=IS_PACKED,
                                              HAS_KEY_MASK=HAS_KEY_MASK)
    if qb * BLOCK_M >= seq_len:
        return

    # ---- the query block, its output gradient and row statistics stay in registers
    offs_d = tl.arange(0, BLOCK_D)
    pos_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    grad_off = start * stride_o_tok + head * stride_o_head
    q = _load_rows(Q + start * stride_q_tok + head * stride_q_head, pos_m, pos_m < seq_len, stride_q_tok, offs_d,
                   CHECK_ROWS=True, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    Kh, Vh = K + start * stride_k_tok + head * stride_k_head, V + start * stride_v_tok + head * stride_v_head
    do = _load_rows(DOut + grad_off, pos_m, pos_m < seq_len, stride_o_tok, offs_d, CHECK_ROWS=True,
                    HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    lse = tl.load(Lse + (start + pos_m) * num_heads + head, mask=pos_m < seq_len, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(Delta + (start + pos_m) * num_heads + head, mask=pos_m < seq_len, other=0.0)
    KeyMaskRow = KeyMask + batch.to(tl.int64) * padded_len
    Blocks_h = Blocks + head * stride_blocks_head
    TokenMask_h = TokenMask + head.to(tl.int64) * stride_tm_head
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # ---- visit the key blocks (same lists and masking as the forward)
    if SPARSE:
        count = tl.load(KvCount + head * stride_count_head + qb)
        for j in range(0, count):
            kb = tl.load(KvIndex + head * stride_index_head + qb * stride_index_row + j)
            state = tl.load(TileState + head * stride_state_head + qb * stride_state_row + kb)
            needs_mask = (state != FULL) | ((kb + 1) * BLOCK_N > kv_len) | holes
            if needs_mask:
                dq = _dq_visit(
                    dq, q, do, lse2, delta, Kh, Vh, kb, pos_m, kv_len, stride_k_tok, stride_v_tok, offs_d, qk_scale,
                    KeyMaskRow, Blocks_h, stride_blocks_row, TokenMask_h, stride_tm_row, layout_len, window,
                    num_global, MASKED=True, HAS_KEY_MASK=HAS_KEY_MASK, APPLY_RULE=True,
                    HAS_TOKEN_MASK=HAS_TOKEN_MASK, LAYOUT_BLOCK=LAYOUT_BLOCK,
                    HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, PRECISION=PRECISION)
            else:
                dq = _dq_visit(
                    dq, q, do, lse2, delta, Kh, Vh, kb, pos_m, kv_len, stride_k_tok, stride_v_tok, offs_d, qk_scale,
                    KeyMaskRow, Blocks_h, stride_blocks_row, TokenMask_h, stride_tm_row, layout_len, window,
                    num_global, MASKED=False, HAS_KEY_MASK=False, APPLY_RULE=False,
                    HAS_TOKEN_MASK=False, LAYOUT_BLOCK=LAYOUT_BLOCK,
                    HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, PRECISION=PRECISION)
    else:
        num_unmasked = tl.where(holes, 0, kv_len // BLOCK_N)
        for kb in range(0, num_unmasked):
            dq = _dq_visit(
                dq, q, do, lse2, delta, Kh, Vh, kb, pos_m, kv_len, stride_k_tok, stride_v_tok, offs_d, qk_scale,
                KeyMaskRow, Blocks_h, stride_blocks_row, TokenMask_h, stride_tm_row, layout_len, window,
                num_global, MASKED=False, HAS_KEY_MASK=False, APPLY_RULE=False,
                HAS_TOKEN_MASK=False, LAYOUT_BLOCK=LAYOUT_BLOCK,
                HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, PRECISION=PRECISION)
        for kb in range(num_unmasked, tl.cdiv(kv_len, BLOCK_N)):
            dq = _dq_visit(
                dq, q, do, lse2, delta, Kh, Vh, kb, pos_m, kv_len, stride_k_tok, stride_v_tok, offs_d, qk_scale,
                KeyMaskRow, Blocks_h, stride_blocks_row, TokenMask_h, stride_tm_row, layout_len, window,
                num_global, MASKED=True, HAS_KEY_MASK=HAS_KEY_MASK, APPLY_RULE=False,
                HAS_TOKEN_MASK=False, LAYOUT_BLOCK=LAYOUT_BLOCK,
                HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, PRECISION=PRECISION)

    _store_rows(DQ + grad_off, dq * scale, pos_m, seq_len, stride_o_tok, offs_d, HEAD_DIM=HEAD_DIM)
