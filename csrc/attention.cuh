// Fused bidirectional attention, forward and deterministic backward, on tensor cores.
//
// Algorithm (FlashAttention-2 style; the same math as kernels/attention.py):
//   forward   one block per (64-query tile, head, sequence), 4 warps x 16 query rows.
//             Walk the key tiles of the sequence: S = Q Kᵀ (mma.sync m16n8k16, fp32
//             accumulators), online softmax in fp32 and log2 units (running max m, running
//             sum l, rescale O by 2^(m_old - m_new)), O += P V with P re-packed from the
//             accumulator registers into A fragments. Finally O /= l, lse = ln2·(m + log2 l).
//   backward  three kernels, no atomics, so the result is bit-for-bit reproducible:
//             delta = rowsum(dO ∘ O);
//             dK/dV: one block per 64-key tile, walking the query tiles:
//                    Pᵀ = exp(scale·K Qᵀ - lse),  dV += Pᵀ dO,
//                    dPᵀ = V dOᵀ,  dSᵀ = Pᵀ ∘ (dPᵀ - delta),  dK += scale · dSᵀ Q;
//             dQ:    one block per 64-query tile, walking the key tiles, recomputing P:
//                    dS = P ∘ (dO Vᵀ - delta),  dQ += scale · dS K.
//             (Recomputing P twice costs one extra Q Kᵀ product; it buys determinism.)
//
// Block-sparse attention is the same three kernels with another walk (TileWalk): instead of
// every tile up to the last real key, each block visits the tiles of the layout blocks on its
// visit list (launchers.h, BlockSparseParams: per query block the key blocks for the forward
// and dQ, per key block the query blocks for dK/dV). A skipped layout block is never loaded; a
// full one needs only the key mask; a partial one applies the token rule per element (window,
// global tokens, token mask), as a -inf score or a zero probability. A layout block is a
// multiple of the 64-row query tile, so every tile lies in one layout block and takes its state
// (the Triton kernel also pools smaller layout blocks; here the Python driver refuses them).
// A block-sparse row whose kept set is empty outputs 0 with lse = -inf, like a row without keys.
//
// Layouts: packed (T, H, D) with cu_seqlens, or padded (B, S, H, D) with an optional
// (B, S) key mask applied element-wise, so left-padding or holes work too; key tiles past
// the last real key of a sequence (key_len, computed on the device) are skipped. Padded
// query rows are computed like the reference does (they attend to the real keys).
// A row with no real key outputs 0 with lse = -inf, and contributes no gradient.
// Padding never contributes, even when it holds NaN: K and V rows that are not real keys
// are zero-filled on load (copy_tile, Rows::kKeys), not only given zero probability.
// NaN in a real row gives NaN in every row that sees it.
//
// Limits: fp16 / bf16 (sm_80+), head_dim a multiple of 8 up to 128; the kernels are
// instantiated for the head-dim buckets of head_dims.h (32, 64, 128) and zero-pad a smaller
// head dim to the next bucket.
// Shared memory stays under the 48 KiB default (no opt-in needed): the key tile shrinks
// to 32 for head dim 128. Every tile sits row-major in shared memory (rows padded by 8
// elements: conflict-free fragment reads); an operand needed transposed (V in P V, Q and
// dO in the dK/dV products, K in dS K) is read with ldmatrix.trans. Every kernel
// double-buffers the tiles of its inner loop with cp.async (16-byte copies, zero-fill past
// the ends): the next tile is in flight while the warps work on the current one. Not done
// (yet): wgmma / TMA on sm_90a, larger tiles with 8 warps, a split-KV forward for long
// sequences, an unmasked fast path for interior full tiles, layout blocks smaller than 64; no
// GPU timing has been taken of any variant.
#pragma once

#include <cmath>

#include "device.cuh"
#include "launchers.h"

namespace fastmlm {
namespace attention {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kRowsPerWarp = 16;                    // the m of m16n8k16
constexpr int kBlockRows = kWarps * kRowsPerWarp;   // rows owned by one block
constexpr int kPad = 8;                             // shared-memory row padding (elements)

// Tile sizes for one head-dim bucket. LD* are shared-memory row strides in elements.
template <int HEAD_DIM>
struct Tiles {
  static constexpr int kInner = HEAD_DIM >= 128 ? 32 : 64;  // keys (fwd, dQ) or queries (dK/dV) per step
  static constexpr int kLd = HEAD_DIM + kPad;               // row stride of every tile (16-byte multiple)
};

// Where one sequence's tokens live, and how many keys are worth visiting: all of them when
// packed; in the padded layout up to the last real key (keys past it are all padding).
struct Sequence {
  int64_t start;
  int len;               // rows: queries, keys, outputs
  int keys;              // keys [0, keys) may be real; the rest are skipped
  const bool* key_mask;  // this sequence's row of the (B, S) key mask, or null (every key is real)
};

FASTMLM_DEVICE Sequence sequence(const AttentionParams& p, int b) {
  if (p.cu_seqlens != nullptr) {
    const int start = p.cu_seqlens[b];
    const int len = p.cu_seqlens[b + 1] - start;
    return {start, len, len, nullptr};
  }
  const int keys = p.key_len != nullptr && p.key_len[b] < p.max_seqlen ? p.key_len[b] : p.max_seqlen;
  const bool* mask = p.key_mask == nullptr ? nullptr : p.key_mask + static_cast<int64_t>(b) * p.max_seqlen;
  return {static_cast<int64_t>(b) * p.max_seqlen, p.max_seqlen, keys, mask};
}

// Element offset of (token, head, 0) in a contiguous (tokens, heads, head_dim) tensor.
FASTMLM_DEVICE int64_t row_offset(const AttentionParams& p, int64_t token, int head) {
  return (token * p.heads + head) * p.head_dim;
}

FASTMLM_DEVICE bool key_is_real(Sequence seq, int key) {
  return key < seq.keys && (seq.key_mask == nullptr || seq.key_mask[key]);
}

// =========================================================================== the walk
// Which tiles of the inner loop a block visits, in ascending order, and which of them need the
// layout's token rule. One code path for both ops: dense attention walks every tile of [0, end); block-sparse attention
// walks, for each layout block on this block's visit list, the tiles of that layout block,
// cut at end. (A layout block is a whole number of tiles: the binding and the Python driver
// require block_size to be a multiple of kBlockRows, and kInner divides kBlockRows.)
// end is seq.keys for the key walks (forward, dQ) and seq.len for the query walk (dK/dV).
struct TileWalk {
  const int* visits;  // the visit list: layout block indices, ascending; null = dense
  int count;          // entries of visits
  int block_size;     // layout block edge in tokens (dense: unused)
  int end;            // tiles start before end
  int step;           // tile edge: kInner
  int slot = 0;       // the entry of visits the last tile returned lies in

  // The first tile's start, or -1 when there is none.
  FASTMLM_DEVICE int first() {
    if (visits == nullptr) return end > 0 ? 0 : -1;
    slot = 0;
    return count > 0 && visits[0] * block_size < end ? visits[0] * block_size : -1;
  }
  // The tile after the one at pos, or -1. Called once per tile, in order (it moves slot on).
  FASTMLM_DEVICE int next(int pos) {
    const int after = pos + step;
    if (visits == nullptr) return after < end ? after : -1;
    const int block_end = (visits[slot] + 1) * block_size;
    if (after < block_end && after < end) return after;
    ++slot;
    return slot < count && visits[slot] * block_size < end ? visits[slot] * block_size : -1;
  }
};

constexpr int8_t kPartial = 2;  // the tile states of fastmlm/ops/block_layout.py: 0 skip, 1 full, 2 partial

// The layout's head for attention head `head` (one layout may serve every head).
FASTMLM_DEVICE int layout_head(const BlockSparseParams& s, int head) { return s.layout_heads == 1 ? 0 : head; }

// The walk of one block: over key tiles for the query block at row0 (kv_index: forward, dQ),
// or over query tiles for the key block at key0 (q_index: dK/dV).
FASTMLM_DEVICE TileWalk make_walk(const AttentionParams& p, int head, int outer0, bool over_queries, int end,
                                  int step) {
  const BlockSparseParams& s = p.sparse;
  if (s.blocks == nullptr) return {nullptr, 0, 0, end, step};
  const int64_t row = static_cast<int64_t>(layout_head(s, head)) * s.num_blocks + outer0 / s.block_size;
  const int* index = over_queries ? s.q_index : s.kv_index;
  const int* count = over_queries ? s.q_count : s.kv_count;
  return {index + row * s.num_blocks, count[row], s.block_size, end, step};
}

// Whether the tile of queries q0.. and keys k0.. needs the token rule: a partial layout block
// (never in dense attention, where the key mask alone decides).
FASTMLM_DEVICE bool tile_is_partial(const AttentionParams& p, int head, int q0, int k0) {
  const BlockSparseParams& s = p.sparse;
  if (s.blocks == nullptr) return false;
  const int64_t at = (static_cast<int64_t>(layout_head(s, head)) * s.num_blocks + q0 / s.block_size) * s.num_blocks +
                     k0 / s.block_size;
  return s.blocks[at] == kPartial;
}

// The token rule of a partial tile for query i and key j (positions in the sequence):
// |i - j| <= window, or a global token on either side, or token_mask[i, j].
FASTMLM_DEVICE bool rule_keeps(const AttentionParams& p, int head, int i, int j) {
  const BlockSparseParams& s = p.sparse;
  const int d = i - j;
  if ((d < 0 ? -d : d) <= s.window || i < s.num_global || j < s.num_global) return true;
  if (s.token_mask == nullptr || i >= s.layout_len || j >= s.layout_len) return false;
  const int64_t mask_head = s.mask_heads == 1 ? 0 : head;
  return s.token_mask[(mask_head * s.layout_len + i) * s.layout_len + j];
}

// In a partial tile, set the entries of this warp's accumulator tile that the token rule drops
// to `dropped` (-inf for a score, 0 for a probability or dS): a select, so whatever the product
// held there (even NaN) is gone. The accumulator's rows are row0 + g and row0 + g + 8, its
// columns col0 + 8n + 2t (+1); KEY_ROWS says the rows are keys (dK/dV's Pᵀ), else queries.
// Called only for partial tiles, so the dense walk runs none of it.
template <int COLS, bool KEY_ROWS>
FASTMLM_DEVICE void drop_by_rule(float (&acc)[COLS / 8][4], const AttentionParams& p, int head, int row0, int col0,
                                 float dropped) {
  const int g = thread_x() % kWarpSize / 4, t = thread_x() % 4;
  for (int n = 0; n < COLS / 8; ++n)
    for (int i = 0; i < 4; ++i) {
      const int row = row0 + g + 8 * (i / 2), col = col0 + n * 8 + 2 * t + (i & 1);
      if (!(KEY_ROWS ? rule_keeps(p, head, col, row) : rule_keeps(p, head, row, col))) acc[n][i] = dropped;
    }
}

// Which rows of a tile are read from memory: query and dO rows up to the end of the
// sequence, key and value rows only where the key is real. The other rows, and columns past
// head_dim, read as zero, so they add nothing to any product. Zero-filling padding keys, not
// only giving them zero probability, matters: 0 · NaN is NaN, so a NaN or inf stored at a
// padding position would otherwise reach the real rows through P V, dO Vᵀ and dS K.
enum class Rows { kQueries, kKeys };

FASTMLM_DEVICE bool row_is_read(Sequence seq, int row, Rows rows) {
  return rows == Rows::kKeys ? key_is_real(seq, row) : row < seq.len;
}

// Copy ROWS rows (tokens row0.. of one head of one sequence) into shared memory, row-major
// (ROWS x ld), zero where row_is_read says so.
template <class T, int ROWS, int HEAD_DIM>
FASTMLM_DEVICE void copy_tile(T* dst, int ld, const T* src, const AttentionParams& p, Sequence seq, int head,
                              int row0, Rows rows) {
  constexpr int kVecsPerRow = HEAD_DIM / 8;
  for (int i = thread_x(); i < ROWS * kVecsPerRow; i += kThreads) {
    const int r = i / kVecsPerRow, c = (i % kVecsPerRow) * 8;
    Vec16 v{};
    if (c < p.head_dim && row_is_read(seq, row0 + r, rows))
      v = *reinterpret_cast<const Vec16*>(src + row_offset(p, seq.start + row0 + r, head) + c);
    *reinterpret_cast<Vec16*>(dst + r * ld + c) = v;
  }
}

// A fragment (16 x 16) of a row-major tile: A[m][k] = tile[m * ld + k0 + k].
template <class T>
FASTMLM_DEVICE void load_frag_a(uint32_t (&a)[4], const T* tile, int ld, int k0) {
  const int g = thread_x() % kWarpSize / 4, t = thread_x() % 4;
  a[0] = load_pair(tile + g * ld + k0 + 2 * t);
  a[1] = load_pair(tile + (g + 8) * ld + k0 + 2 * t);
  a[2] = load_pair(tile + g * ld + k0 + 8 + 2 * t);
  a[3] = load_pair(tile + (g + 8) * ld + k0 + 8 + 2 * t);
}

// B fragment (16 x 8) of a tile holding Bᵀ row-major: B[k][n] = tile[(n0 + n) * ld + k0 + k].
template <class T>
FASTMLM_DEVICE void load_frag_b(uint32_t (&b)[2], const T* tile, int ld, int n0, int k0) {
  const int g = thread_x() % kWarpSize / 4, t = thread_x() % 4;
  b[0] = load_pair(tile + (n0 + g) * ld + k0 + 2 * t);
  b[1] = load_pair(tile + (n0 + g) * ld + k0 + 8 + 2 * t);
}

// The same copy with cp.async: issued now, landing by a later cp_async_wait (forward pipeline).
template <class T, int ROWS, int HEAD_DIM>
FASTMLM_DEVICE void copy_tile_async(T* dst, int ld, const T* src, const AttentionParams& p, Sequence seq, int head,
                                    int row0, Rows rows) {
  constexpr int kVecsPerRow = HEAD_DIM / 8;
  for (int i = thread_x(); i < ROWS * kVecsPerRow; i += kThreads) {
    const int r = i / kVecsPerRow, c = (i % kVecsPerRow) * 8;
    const bool inside = c < p.head_dim && row_is_read(seq, row0 + r, rows);
    cp_async_16(dst + r * ld + c, inside ? src + row_offset(p, seq.start + row0 + r, head) + c : src, inside);
  }
}

// B fragment (16 x 8) of a tile holding B row-major: B[k][n] = tile[(k0 + k) * ld + n0 + n],
// read transposed by ldmatrix (lanes 0-15 name the 16 rows k0..k0+15; 16-31 repeat them).
template <class T>
FASTMLM_DEVICE void load_frag_b_trans(uint32_t (&b)[2], const T* tile, int ld, int k0, int n0) {
  ldmatrix_x2_trans(b, tile + (k0 + thread_x() % 16) * ld + n0);
}

// Two neighbouring 16x8 accumulator tiles (columns 16j..16j+15) as the A fragment of the
// next product: the accumulator and A layouts line up, so this is only a pack to 16 bits.
template <class T>
FASTMLM_DEVICE void acc_to_frag_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = Pair<T>::pack(lo[0], lo[1]);
  a[1] = Pair<T>::pack(lo[2], lo[3]);
  a[2] = Pair<T>::pack(hi[0], hi[1]);
  a[3] = Pair<T>::pack(hi[2], hi[3]);
}

// Sum (or max) over the 4 lanes that hold one accumulator row.
FASTMLM_DEVICE float row_sum4(float x) {
  x += shuffle_xor(x, 1);
  return x + shuffle_xor(x, 2);
}
FASTMLM_DEVICE float row_max4(float x) {
  x = fmaxf(x, shuffle_xor(x, 1));
  return fmaxf(x, shuffle_xor(x, 2));
}

// Store a 16 x HEAD_DIM accumulator block (rows row0 + g, row0 + g + 8) times `factor[r]`.
template <class T, int HEAD_DIM>
FASTMLM_DEVICE void store_rows(T* dst, const AttentionParams& p, Sequence seq, int head, int row0,
                               const float (&acc)[HEAD_DIM / 8][4], const float (&factor)[2]) {
  const int g = thread_x() % kWarpSize / 4, t = thread_x() % 4;
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + g + 8 * r;
    if (row >= seq.len) continue;
    T* base = dst + row_offset(p, seq.start + row, head);
    for (int nd = 0; nd < HEAD_DIM / 8; ++nd) {
      const int col = nd * 8 + 2 * t;
      if (col < p.head_dim)
        *reinterpret_cast<uint32_t*>(base + col) =
            Pair<T>::pack(acc[nd][2 * r] * factor[r], acc[nd][2 * r + 1] * factor[r]);
    }
  }
}

// This warp's 16 rows of a block tile staged in shared memory (kBlockRows x HEAD_DIM,
// row-major, row stride Tiles::kLd) as the A fragments of every k step of the head dim.
template <class T, int HEAD_DIM>
FASTMLM_DEVICE void load_warp_frags(uint32_t (&frag)[HEAD_DIM / 16][4], const T* block_tile) {
  constexpr int kLd = Tiles<HEAD_DIM>::kLd;
  const T* warp_rows = block_tile + thread_x() / kWarpSize * kRowsPerWarp * kLd;
  for (int kk = 0; kk < HEAD_DIM / 16; ++kk) load_frag_a(frag[kk], warp_rows, kLd, kk * 16);
}

// acc (16 x N, this warp's rows) += A Bᵀ: A is the warp's 16 x HEAD_DIM rows as fragments,
// B a row-major N x HEAD_DIM tile in shared memory (S = Q Kᵀ, Pᵀ = K Qᵀ, dPᵀ = V dOᵀ, dP = dO Vᵀ).
template <class T, int N, int HEAD_DIM>
FASTMLM_DEVICE void mma_a_bt(float (&acc)[N / 8][4], const uint32_t (&a)[HEAD_DIM / 16][4], const T* b_tile) {
  for (int n = 0; n < N / 8; ++n)
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
      uint32_t bf[2];
      load_frag_b(bf, b_tile, Tiles<HEAD_DIM>::kLd, n * 8, kk * 16);
      mma_16816<T>(acc[n], a[kk], bf);
    }
}

// acc (16 x HEAD_DIM) += P B: P is a 16 x N accumulator block of this warp, rounded to T as
// A fragments, B a row-major N x HEAD_DIM tile read transposed by ldmatrix
// (O += P V, dV += Pᵀ dO, dK += dSᵀ Q, dQ += dS K).
template <class T, int N, int HEAD_DIM>
FASTMLM_DEVICE void mma_p_b(float (&acc)[HEAD_DIM / 8][4], const float (&pr)[N / 8][4], const T* b_tile) {
  for (int kk = 0; kk < N / 16; ++kk) {
    uint32_t p_frag[4];
    acc_to_frag_a<T>(p_frag, pr[2 * kk], pr[2 * kk + 1]);
    for (int nd = 0; nd < HEAD_DIM / 8; ++nd) {
      uint32_t bf[2];
      load_frag_b_trans(bf, b_tile, Tiles<HEAD_DIM>::kLd, kk * 16, nd * 8);
      mma_16816<T>(acc[nd], p_frag, bf);
    }
  }
}

// Shared memory of a kernel that first stages STAGED tensors' block rows (kBlockRows x head
// dim each, read once into registers) and then double-buffers its inner loop in the same
// space: two buffers of two tiles (kInner x head dim: K and V, or Q and dO), followed by
// STATS floats per tile row and buffer (the key bias, or lse2 and delta). Buffer b (0 or 1)
// starts at element b * kBuffer, its second tile kTile later, and its floats at float
// b * kStats after the kTiles elements of tiles.
template <class T, int HEAD_DIM, int STAGED, int STATS>
struct PipelineSmem {
  using Tl = Tiles<HEAD_DIM>;
  static constexpr int kTile = Tl::kInner * Tl::kLd;  // one tile of the inner loop
  static constexpr int kBuffer = 2 * kTile;
  static constexpr int kStats = STATS * Tl::kInner;
  static constexpr int kStaging = STAGED * kBlockRows * Tl::kLd;
  static constexpr int kTiles = 2 * kBuffer > kStaging ? 2 * kBuffer : kStaging;
  static constexpr size_t kBytes = kTiles * sizeof(T) + 2 * kStats * sizeof(float);
};

// Issue, as one cp.async group, the copy of rows row0.. of two tensors into the two tiles of a
// buffer (first at dst, second kTile elements later); it lands by a later cp_async_wait.
template <class T, int ROWS, int HEAD_DIM>
FASTMLM_DEVICE void issue_tile_pair(T* dst, int tile, const void* first, const void* second,
                                    const AttentionParams& p, Sequence seq, int head, int row0, Rows rows) {
  constexpr int kLd = Tiles<HEAD_DIM>::kLd;
  copy_tile_async<T, ROWS, HEAD_DIM>(dst, kLd, static_cast<const T*>(first), p, seq, head, row0, rows);
  copy_tile_async<T, ROWS, HEAD_DIM>(dst + tile, kLd, static_cast<const T*>(second), p, seq, head, row0, rows);
  cp_async_commit();
}

// The K and V tiles of keys key0.. into one buffer (K at dst, V `tile` elements later), and
// the tile's key bias: 0 for a real key, -inf otherwise (forward and dQ).
template <class T, int HEAD_DIM>
FASTMLM_DEVICE void issue_kv_tile(T* dst, int tile, float* key_bias, const AttentionParams& p, Sequence seq, int head,
                                  int key0) {
  constexpr int kKeys = Tiles<HEAD_DIM>::kInner;
  issue_tile_pair<T, kKeys, HEAD_DIM>(dst, tile, p.k, p.v, p, seq, head, key0, Rows::kKeys);
  for (int j = thread_x(); j < kKeys; j += kThreads) key_bias[j] = key_is_real(seq, key0 + j) ? 0.f : -INFINITY;
}

// The head of every double-buffered inner loop: start copying the tile at next0 (if there is
// one: next0 >= 0, see TileWalk) into the other buffer with issue(next0, buffer), then wait
// until this tile has landed and every thread's copies of it are visible. (The other buffer was last read in the
// previous step, which ended with a barrier.)
template <class Issue>
FASTMLM_DEVICE void prefetch_and_wait(int next0, int tile, const Issue& issue) {
  if (next0 >= 0) {
    issue(next0, (tile + 1) % 2);
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  sync_block();
}

// =========================================================================== forward
// Two buffers of (K, V) tiles plus their key bias; the queries are staged through the same space first.
template <class T, int HEAD_DIM>
using ForwardSmem = PipelineSmem<T, HEAD_DIM, /*STAGED=*/1, /*STATS=*/1>;

template <class T, int HEAD_DIM>
FASTMLM_KERNEL void forward_kernel(const AttentionParams p) {
  using Tl = Tiles<HEAD_DIM>;
  using Smem = ForwardSmem<T, HEAD_DIM>;
  constexpr int kKeys = Tl::kInner;
  const int b = block_z(), head = block_y(), row0 = block_x() * kBlockRows;
  const Sequence seq = sequence(p, b);
  if (row0 >= seq.len) return;  // the whole block leaves together
  const int warp = thread_x() / kWarpSize, t = thread_x() % 4;
  T* smem = shared_memory<T>();  // K0 V0 K1 V1, after the query staging
  float* key_bias_buffers = reinterpret_cast<float*>(smem + Smem::kTiles);  // 0 for a real key, -inf otherwise
  const float scale_log2 = p.scale * kLog2e;

  // Stage 1: this warp's 16 query rows as A fragments, kept in registers for the whole loop.
  copy_tile<T, kBlockRows, HEAD_DIM>(smem, Tl::kLd, static_cast<const T*>(p.q), p, seq, head, row0, Rows::kQueries);
  sync_block();
  uint32_t q_frag[HEAD_DIM / 16][4];
  load_warp_frags<T, HEAD_DIM>(q_frag, smem);
  sync_block();  // the staging space becomes the K/V buffers

  // Key tile i goes to buffer i % 2 with cp.async, one tile ahead of the math: while the
  // warps work on tile i, tile i + 1 is in flight. The key bias of the tile goes with it.
  auto issue_tile = [&](int key0, int buffer) {
    issue_kv_tile<T, HEAD_DIM>(smem + buffer * Smem::kBuffer, Smem::kTile, key_bias_buffers + buffer * Smem::kStats, p,
                               seq, head, key0);
  };

  float o[HEAD_DIM / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY};  // running max of rows g and g+8, log2 units
  float l[2] = {0.f, 0.f};              // running sum of 2^(s - m), this lane's columns only

  // The key tiles to visit: all up to the last real key, or the layout's visit list.
  TileWalk walk = make_walk(p, head, row0, /*over_queries=*/false, seq.keys, kKeys);
  int key0 = walk.first();
  if (key0 >= 0) issue_tile(key0, 0);
  for (int tile = 0; key0 >= 0; ++tile) {
    // Stage 2: prefetch the next K/V tile into the other buffer, wait for this one.
    const int next0 = walk.next(key0);
    prefetch_and_wait(next0, tile, issue_tile);
    const T* k_s = smem + (tile % 2) * Smem::kBuffer;
    const T* v_s = k_s + Smem::kTile;
    const float* key_bias = key_bias_buffers + (tile % 2) * Smem::kStats;

    // Stage 3: scores in log2 units, s = (q · k) · scale · log2(e), -inf at keys that are not
    // real and, in a partial block-sparse tile, at pairs the layout's token rule drops.
    float s[kKeys / 8][4] = {};
    mma_a_bt<T, kKeys, HEAD_DIM>(s, q_frag, k_s);
    for (int n = 0; n < kKeys / 8; ++n)
      for (int i = 0; i < 4; ++i) s[n][i] = s[n][i] * scale_log2 + key_bias[n * 8 + 2 * t + (i & 1)];
    if (tile_is_partial(p, head, row0, key0))
      drop_by_rule<kKeys, /*KEY_ROWS=*/false>(s, p, head, row0 + warp * kRowsPerWarp, key0, -INFINITY);

    // Stage 4: online softmax. Accumulator entries 0,1 belong to row g, entries 2,3 to row g+8.
    float tile_max[2] = {m[0], m[1]};
    for (int n = 0; n < kKeys / 8; ++n) {
      tile_max[0] = fmaxf(tile_max[0], fmaxf(s[n][0], s[n][1]));
      tile_max[1] = fmaxf(tile_max[1], fmaxf(s[n][2], s[n][3]));
    }
    float shift[2], rescale[2];
    for (int r = 0; r < 2; ++r) {
      const float new_max = row_max4(tile_max[r]);
      shift[r] = new_max == -INFINITY ? 0.f : new_max;  // no real key yet: keep exp2 finite (gives 0)
      rescale[r] = exp2f(m[r] - shift[r]);              // 2^(m_old - m_new); 0 while m_old = -inf
      m[r] = new_max;
      l[r] *= rescale[r];
    }
    for (int n = 0; n < kKeys / 8; ++n)
      for (int i = 0; i < 4; ++i) {
        s[n][i] = exp2f(s[n][i] - shift[i / 2]);
        l[i / 2] += s[n][i];
      }
    for (int nd = 0; nd < HEAD_DIM / 8; ++nd)
      for (int i = 0; i < 4; ++i) o[nd][i] *= rescale[i / 2];

    // Stage 5: O += P V, P straight from the accumulators (rounded to the input dtype).
    mma_p_b<T, kKeys, HEAD_DIM>(o, s, v_s);
    sync_block();  // every warp is done with this buffer before it is refilled
    key0 = next0;
  }

  // Stage 6: O / l and lse = ln(2) · (m + log2 l). l = 0 means no key contributed: a sequence
  // without real keys, or a row whose block-sparse kept set is empty, outputs 0 with
  // lse = -inf; in dense attention over a sequence with a real key, every score of the row was
  // -inf, which only an infinite input can cause, so the row is NaN. (The comparisons are
  // `l == 0`, not `l > 0`: a NaN l must stay NaN, not turn into a row of zeros.)
  float inv_l[2];
  const int warp_row0 = row0 + warp * kRowsPerWarp;
  const bool dense = p.sparse.blocks == nullptr;
  for (int r = 0; r < 2; ++r) {
    l[r] = row_sum4(l[r]);
    if (l[r] == 0.f && seq.keys > 0 && dense) l[r] = NAN;
    inv_l[r] = l[r] == 0.f ? 0.f : 1.f / l[r];
  }
  store_rows<T, HEAD_DIM>(static_cast<T*>(p.out), p, seq, head, warp_row0, o, inv_l);
  if (t == 0)
    for (int r = 0; r < 2; ++r) {
      const int row = warp_row0 + thread_x() % kWarpSize / 4 + 8 * r;
      if (row < seq.len)
        p.lse[(seq.start + row) * p.heads + head] = l[r] == 0.f ? -INFINITY : (m[r] + log2f(l[r])) * kLn2;
    }
}

// =========================================================================== backward
// delta[row] = Σ_d dO[row, d] · O[row, d], one warp per (token, head) row.
template <class T>
FASTMLM_KERNEL void delta_kernel(const AttentionParams p) {
  const int64_t row = static_cast<int64_t>(block_x()) * kWarps + thread_x() / kWarpSize;
  if (row >= p.total_rows) return;  // whole warps leave together
  const T* dout = static_cast<const T*>(p.dout) + row * p.head_dim;
  const T* out = static_cast<const T*>(p.out) + row * p.head_dim;
  float acc = 0.f;
  for (int c = thread_x() % kWarpSize; c < p.head_dim; c += kWarpSize) acc += to_float(dout[c]) * to_float(out[c]);
  for (int mask = 16; mask > 0; mask /= 2) acc += shuffle_xor(acc, mask);
  if (thread_x() % kWarpSize == 0) p.delta[row] = acc;
}

// Per-query softmax statistics of one tile in shared memory: lse in log2 units (+inf for a
// row without keys or past the end, so exp2(s - lse2) is 0) and delta (0 past the end).
FASTMLM_DEVICE void load_row_stats(float* lse2_s, float* delta_s, int rows, const AttentionParams& p, Sequence seq,
                                   int head, int row0) {
  for (int i = thread_x(); i < rows; i += kThreads) {
    const bool inside = row0 + i < seq.len;
    const int64_t at = (seq.start + row0 + i) * p.heads + head;
    const float lse = inside ? p.lse[at] : -INFINITY;
    lse2_s[i] = lse == -INFINITY ? INFINITY : lse * kLog2e;
    delta_s[i] = inside ? p.delta[at] : 0.f;
  }
}

// Stage 1 of the backward kernels: the block's rows row0.. of two tensors (K and V, or Q and
// dO) staged through shared memory, and this warp's 16 rows of each as A fragments, kept in
// registers for the whole loop. Ends with a barrier: the staging space is free again.
template <class T, int HEAD_DIM>
FASTMLM_DEVICE void stage_frag_pair(uint32_t (&first_frag)[HEAD_DIM / 16][4], uint32_t (&second_frag)[HEAD_DIM / 16][4],
                                    T* smem, const void* first, const void* second, const AttentionParams& p,
                                    Sequence seq, int head, int row0, Rows rows) {
  constexpr int kLd = Tiles<HEAD_DIM>::kLd;
  T* second_stage = smem + kBlockRows * kLd;
  copy_tile<T, kBlockRows, HEAD_DIM>(smem, kLd, static_cast<const T*>(first), p, seq, head, row0, rows);
  copy_tile<T, kBlockRows, HEAD_DIM>(second_stage, kLd, static_cast<const T*>(second), p, seq, head, row0, rows);
  sync_block();
  load_warp_frags<T, HEAD_DIM>(first_frag, smem);
  load_warp_frags<T, HEAD_DIM>(second_frag, second_stage);
  sync_block();
}

// Two buffers of (Q, dO) tiles plus their (lse2, delta); K and V are staged through the same space first.
template <class T, int HEAD_DIM>
using DkDvSmem = PipelineSmem<T, HEAD_DIM, /*STAGED=*/2, /*STATS=*/2>;

template <class T, int HEAD_DIM>
FASTMLM_KERNEL void dkdv_kernel(const AttentionParams p) {
  using Tl = Tiles<HEAD_DIM>;
  using Smem = DkDvSmem<T, HEAD_DIM>;
  constexpr int kQueries = Tl::kInner;
  const int b = block_z(), head = block_y(), key0 = block_x() * kBlockRows;
  const Sequence seq = sequence(p, b);
  if (key0 >= seq.len) return;
  const int warp = thread_x() / kWarpSize, g = thread_x() % kWarpSize / 4, t = thread_x() % 4;
  const int warp_key0 = key0 + warp * kRowsPerWarp;
  T* smem = shared_memory<T>();  // Q0 dO0 Q1 dO1, after the K/V staging
  float* stats = reinterpret_cast<float*>(smem + Smem::kTiles);  // lse2_0 delta_0 lse2_1 delta_1
  const float scale_log2 = p.scale * kLog2e;

  // Stage 1: this warp's 16 keys of K and V as A fragments (staged through shared memory).
  uint32_t k_frag[HEAD_DIM / 16][4], v_frag[HEAD_DIM / 16][4];
  stage_frag_pair<T, HEAD_DIM>(k_frag, v_frag, smem, p.k, p.v, p, seq, head, key0, Rows::kKeys);
  const bool key_real[2] = {key_is_real(seq, warp_key0 + g), key_is_real(seq, warp_key0 + g + 8)};

  // Query tile i goes to buffer i % 2 with cp.async, one tile ahead of the math, with its row statistics.
  auto issue_tile = [&](int q0, int buffer) {
    issue_tile_pair<T, kQueries, HEAD_DIM>(smem + buffer * Smem::kBuffer, Smem::kTile, p.q, p.dout, p, seq, head, q0,
                                           Rows::kQueries);
    float* lse2_dst = stats + buffer * Smem::kStats;
    load_row_stats(lse2_dst, lse2_dst + kQueries, kQueries, p, seq, head, q0);
  };

  // The query tiles to visit: all of them, or those of the query blocks that visit this key
  // block (the transposed visit list). Keys past the last real one get zero gradients: such a
  // block skips the loop.
  TileWalk walk = make_walk(p, head, key0, /*over_queries=*/true, key0 < seq.keys ? seq.len : 0, kQueries);
  float dk[HEAD_DIM / 8][4] = {}, dv[HEAD_DIM / 8][4] = {};
  int q0 = walk.first();
  if (q0 >= 0) issue_tile(q0, 0);
  for (int tile = 0; q0 >= 0; ++tile) {
    // Stage 2: prefetch the next Q/dO tile, wait for this one. Q and dO are the B operands
    // of K Qᵀ and V dOᵀ (plain loads) and of dSᵀ Q and Pᵀ dO (ldmatrix.trans).
    const int next0 = walk.next(q0);
    prefetch_and_wait(next0, tile, issue_tile);
    const T* q_s = smem + (tile % 2) * Smem::kBuffer;
    const T* do_s = q_s + Smem::kTile;
    const float* lse2_s = stats + (tile % 2) * Smem::kStats;
    const float* delta_s = lse2_s + kQueries;

    // Stage 3: Pᵀ[key][query] = exp2(scale·log2e · k·q - lse2[query]), 0 at keys that are not
    // real and, in a partial block-sparse tile, at pairs the token rule drops.
    float pt[kQueries / 8][4] = {};
    mma_a_bt<T, kQueries, HEAD_DIM>(pt, k_frag, q_s);
    for (int n = 0; n < kQueries / 8; ++n)
      for (int i = 0; i < 4; ++i)
        pt[n][i] = key_real[i / 2] ? exp2f(pt[n][i] * scale_log2 - lse2_s[n * 8 + 2 * t + (i & 1)]) : 0.f;
    if (tile_is_partial(p, head, q0, key0)) drop_by_rule<kQueries, /*KEY_ROWS=*/true>(pt, p, head, warp_key0, q0, 0.f);

    // Stage 4: dV += Pᵀ dO.
    mma_p_b<T, kQueries, HEAD_DIM>(dv, pt, do_s);

    // Stage 5: dPᵀ = V dOᵀ, then dSᵀ = Pᵀ ∘ (dPᵀ - delta[query]).
    float ds[kQueries / 8][4] = {};
    mma_a_bt<T, kQueries, HEAD_DIM>(ds, v_frag, do_s);
    for (int n = 0; n < kQueries / 8; ++n)
      for (int i = 0; i < 4; ++i) ds[n][i] = pt[n][i] * (ds[n][i] - delta_s[n * 8 + 2 * t + (i & 1)]);

    // Stage 6: dK += dSᵀ Q (the softmax scale is applied once, at the store).
    mma_p_b<T, kQueries, HEAD_DIM>(dk, ds, q_s);
    sync_block();  // every warp is done with this buffer before it is refilled
    q0 = next0;
  }

  // Stage 7: write this warp's 16 rows of dK (× scale) and dV.
  const float dk_factor[2] = {p.scale, p.scale}, one[2] = {1.f, 1.f};
  store_rows<T, HEAD_DIM>(static_cast<T*>(p.dk), p, seq, head, warp_key0, dk, dk_factor);
  store_rows<T, HEAD_DIM>(static_cast<T*>(p.dv), p, seq, head, warp_key0, dv, one);
}

// Two buffers of (K, V) tiles plus their key bias; Q and dO are staged through the same space first.
template <class T, int HEAD_DIM>
using DqSmem = PipelineSmem<T, HEAD_DIM, /*STAGED=*/2, /*STATS=*/1>;

template <class T, int HEAD_DIM>
FASTMLM_KERNEL void dq_kernel(const AttentionParams p) {
  using Tl = Tiles<HEAD_DIM>;
  using Smem = DqSmem<T, HEAD_DIM>;
  constexpr int kKeys = Tl::kInner;
  const int b = block_z(), head = block_y(), row0 = block_x() * kBlockRows;
  const Sequence seq = sequence(p, b);
  if (row0 >= seq.len) return;
  const int warp = thread_x() / kWarpSize, g = thread_x() % kWarpSize / 4, t = thread_x() % 4;
  const int warp_row0 = row0 + warp * kRowsPerWarp;
  T* smem = shared_memory<T>();  // K0 V0 K1 V1, after the Q/dO staging
  float* key_bias_buffers = reinterpret_cast<float*>(smem + Smem::kTiles);  // 0 for a real key, -inf otherwise
  const float scale_log2 = p.scale * kLog2e;

  // Stage 1: this warp's 16 rows of Q and dO as A fragments, and their lse / delta.
  uint32_t q_frag[HEAD_DIM / 16][4], do_frag[HEAD_DIM / 16][4];
  stage_frag_pair<T, HEAD_DIM>(q_frag, do_frag, smem, p.q, p.dout, p, seq, head, row0, Rows::kQueries);
  float lse2[2], delta[2];
  for (int r = 0; r < 2; ++r) {
    const int row = warp_row0 + g + 8 * r;
    const int64_t at = (seq.start + row) * p.heads + head;
    const float lse = row < seq.len ? p.lse[at] : -INFINITY;
    lse2[r] = lse == -INFINITY ? INFINITY : lse * kLog2e;
    delta[r] = row < seq.len ? p.delta[at] : 0.f;
  }

  // Key tile i goes to buffer i % 2 with cp.async, one tile ahead of the math, with its key bias.
  auto issue_tile = [&](int key0, int buffer) {
    issue_kv_tile<T, HEAD_DIM>(smem + buffer * Smem::kBuffer, Smem::kTile, key_bias_buffers + buffer * Smem::kStats, p,
                               seq, head, key0);
  };

  TileWalk walk = make_walk(p, head, row0, /*over_queries=*/false, seq.keys, kKeys);  // as the forward's
  float dq[HEAD_DIM / 8][4] = {};
  int key0 = walk.first();
  if (key0 >= 0) issue_tile(key0, 0);
  for (int tile = 0; key0 >= 0; ++tile) {
    // Stage 2: prefetch the next K/V tile, wait for this one. K is the B operand of Q Kᵀ
    // (plain loads) and of dS K (ldmatrix.trans), V of dO Vᵀ.
    const int next0 = walk.next(key0);
    prefetch_and_wait(next0, tile, issue_tile);
    const T* k_s = smem + (tile % 2) * Smem::kBuffer;
    const T* v_s = k_s + Smem::kTile;
    const float* key_bias = key_bias_buffers + (tile % 2) * Smem::kStats;

    // Stage 3: P = exp2(scale·log2e · q·k - lse2[row]) and dP = dO Vᵀ.
    float pr[kKeys / 8][4] = {}, ds[kKeys / 8][4] = {};
    mma_a_bt<T, kKeys, HEAD_DIM>(pr, q_frag, k_s);
    mma_a_bt<T, kKeys, HEAD_DIM>(ds, do_frag, v_s);
    // Stage 4: dS = P ∘ (dP - delta[row]), 0 at keys that are not real and at pairs the token
    // rule of a partial tile drops.
    for (int n = 0; n < kKeys / 8; ++n)
      for (int i = 0; i < 4; ++i) {
        const int key = n * 8 + 2 * t + (i & 1);
        const float prob = key_bias[key] == 0.f ? exp2f(pr[n][i] * scale_log2 - lse2[i / 2]) : 0.f;
        ds[n][i] = prob * (ds[n][i] - delta[i / 2]);
      }
    if (tile_is_partial(p, head, row0, key0))
      drop_by_rule<kKeys, /*KEY_ROWS=*/false>(ds, p, head, warp_row0, key0, 0.f);
    // Stage 5: dQ += dS K.
    mma_p_b<T, kKeys, HEAD_DIM>(dq, ds, k_s);
    sync_block();  // every warp is done with this buffer before it is refilled
    key0 = next0;
  }

  // Stage 6: write dQ × scale.
  const float factor[2] = {p.scale, p.scale};
  store_rows<T, HEAD_DIM>(static_cast<T*>(p.dq), p, seq, head, warp_row0, dq, factor);
}

// =========================================================================== launchers
template <class T, int HEAD_DIM>
cudaError_t launch_forward(const AttentionParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0 || p.max_seqlen == 0) return cudaSuccess;
  const dim3 grid(ceil_div(p.max_seqlen, kBlockRows), p.heads, p.batch);
  auto* kernel = &forward_kernel<T, HEAD_DIM>;
  constexpr size_t smem = ForwardSmem<T, HEAD_DIM>::kBytes;
  FASTMLM_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, p);
  return last_launch_error();
}

template <class T, int HEAD_DIM>
cudaError_t launch_backward(const AttentionParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0 || p.max_seqlen == 0) return cudaSuccess;
  if (p.total_rows > 0) {
    const dim3 rows_grid(static_cast<unsigned>((p.total_rows + kWarps - 1) / kWarps));
    auto* delta = &delta_kernel<T>;
    FASTMLM_LAUNCH(delta, rows_grid, dim3(kThreads), 0, stream, p);
    if (cudaError_t err = last_launch_error(); err != cudaSuccess) return err;
  }
  const dim3 grid(ceil_div(p.max_seqlen, kBlockRows), p.heads, p.batch);
  auto* dkdv = &dkdv_kernel<T, HEAD_DIM>;
  constexpr size_t dkdv_smem = DkDvSmem<T, HEAD_DIM>::kBytes;
  FASTMLM_LAUNCH(dkdv, grid, dim3(kThreads), dkdv_smem, stream, p);
  if (cudaError_t err = last_launch_error(); err != cudaSuccess) return err;
  auto* dq = &dq_kernel<T, HEAD_DIM>;
  constexpr size_t dq_smem = DqSmem<T, HEAD_DIM>::kBytes;
  FASTMLM_LAUNCH(dq, grid, dim3(kThreads), dq_smem, stream, p);
  return last_launch_error();
}

// One head-dim bucket, forward or backward, for the dtype asked for: fp16 or bf16; any other
// dtype is an invalid value (the binding admits only these two).
template <int HEAD_DIM, bool BACKWARD>
cudaError_t launch(const AttentionParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16:
      return BACKWARD ? launch_backward<__half, HEAD_DIM>(p, stream) : launch_forward<__half, HEAD_DIM>(p, stream);
    case DType::kBFloat16:
      return BACKWARD ? launch_backward<__nv_bfloat16, HEAD_DIM>(p, stream)
                      : launch_forward<__nv_bfloat16, HEAD_DIM>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace attention
}  // namespace fastmlm

// Defines attention_{forward,backward}_hd<HD> (declared in launchers.h); HD must be a bucket
// of head_dims.h. Expanded once per attention_hd<HD>.cu, and for every bucket by the emulator.
#define FASTMLM_INSTANTIATE_ATTENTION(HD)                                                             \
  static_assert(::fastmlm::is_head_dim_bucket(HD), "attention_hd" #HD ".cu: add " #HD " to csrc/head_dims.h"); \
  namespace fastmlm {                                                                                 \
  cudaError_t attention_forward_hd##HD(const AttentionParams& p, DType dtype, cudaStream_t stream) { \
    return attention::launch<HD, false>(p, dtype, stream);                                            \
  }                                                                                                   \
  cudaError_t attention_backward_hd##HD(const AttentionParams& p, DType dtype, cudaStream_t stream) {\
    return attention::launch<HD, true>(p, dtype, stream);                                             \
  }                                                                                                   \
  }
