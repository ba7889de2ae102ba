// The interface between the binding (bindings.cpp, which knows torch) and the kernels
// (*.cu, which do not): plain structs of pointers, sizes and strides, and one launcher per
// kernel family and instantiation. Keeping torch out of the kernel translation units keeps
// them fast to compile and lets csrc/emulate run them on the CPU.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "head_dims.h"

namespace fastmlm {

// ----------------------------------------------------------------- attention
// Block-sparse attention: the layout (fastmlm/ops/block_layout.py) as the kernels walk it. A
// layout block of block_size tokens (a multiple of the kernels' 64-row query tile, so every
// kernel tile lies in one layout block and takes its state) is 0 = skip, 1 = full, 2 = partial;
// a partial tile keeps pair (i, j) where |i - j| <= window, i < num_global, j < num_global or
// token_mask[i, j]. Per head (layout_heads = heads) or one for all (layout_heads = 1), every
// array is contiguous with nb = num_blocks:
//   blocks (Hl, nb, nb) int8; kv_index (Hl, nb, nb) / kv_count (Hl, nb) int32: per query block
//   the visited key blocks, ascending (visit_list); q_index / q_count: per key block the query
//   blocks that visit it (the transposed list, for dK/dV); token_mask (Hm, L, L) bool or null,
//   Hm = mask_heads (1 or heads, independent of Hl: a union of layouts may have either).
// blocks == null means dense attention: every tile up to the last real key.
struct BlockSparseParams {
  const int8_t* blocks = nullptr;
  const int* kv_index = nullptr;
  const int* kv_count = nullptr;
  const int* q_index = nullptr;
  const int* q_count = nullptr;
  const bool* token_mask = nullptr;
  int layout_heads = 0;
  int mask_heads = 0;
  int num_blocks = 0;
  int layout_len = 0;  // L, the token mask's side
  int block_size = 0;
  int window = -1;
  int num_global = 0;
};

// Every tensor is contiguous. q, k, v, out, dout, dq, dk, dv share the layout
//   padded: (B, S, H, D)    packed: (T, H, D)
// and lse / delta the same without D. Sequence b's tokens start at token
// cu_seqlens[b] (packed) or b * max_seqlen (padded) and number cu_seqlens[b+1] - cu_seqlens[b]
// (packed) or max_seqlen (padded). In the padded layout key_mask (B, S) marks real keys.
struct AttentionParams {
  // pointers
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  const bool* key_mask = nullptr;   // padded layout, may be null (every key is real)
  const int* key_len = nullptr;     // padded layout with key_mask: last real key + 1 per sequence
  const int* cu_seqlens = nullptr;  // packed layout, else null
  const void* dout = nullptr;       // backward only
  float* delta = nullptr;           // backward scratch: rowsum(dout * out), laid out like lse
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  // sizes
  int batch = 0;
  int heads = 0;
  int max_seqlen = 0;
  int head_dim = 0;       // runtime head dim, a multiple of 8, <= the kernel's HEAD_DIM
  int64_t total_rows = 0;  // tokens * heads (lse / delta entries)
  // options
  float scale = 1.f;
  BlockSparseParams sparse;  // blocks == null: dense
};

// The element types. The emulator's C interface passes them as these integers, in this order
// (fastmlm/ops/cuda_impl/emulate.py: _DTYPES; tests/test_cuda_emulator_schema.py checks).
enum class DType { kFloat16, kBFloat16, kFloat32 };

// One instantiation file per head-dim bucket of head_dims.h (attention_hd<N>.cu), both 16-bit
// dtypes: attention_forward_hd<N> and attention_backward_hd<N>.
#define FASTMLM_DECLARE_ATTENTION(HD)                                                              \
  cudaError_t attention_forward_hd##HD(const AttentionParams& p, DType dtype, cudaStream_t stream); \
  cudaError_t attention_backward_hd##HD(const AttentionParams& p, DType dtype, cudaStream_t stream);
FASTMLM_FOR_EACH_HEAD_DIM(FASTMLM_DECLARE_ATTENTION)
#undef FASTMLM_DECLARE_ATTENTION

// Forward: out, lse. Backward: delta (scratch), dq, dk, dv. dtype: kFloat16 or kBFloat16.
// The head dim picks the instantiation (head_dim_bucket); one it does not fit is an invalid value.
#define FASTMLM_BUCKET_CASE(HD, DIRECTION) \
  case HD: return attention_##DIRECTION##_hd##HD(p, dtype, stream);
#define FASTMLM_FORWARD_CASE(HD) FASTMLM_BUCKET_CASE(HD, forward)
#define FASTMLM_BACKWARD_CASE(HD) FASTMLM_BUCKET_CASE(HD, backward)
inline cudaError_t attention_forward(const AttentionParams& p, DType dtype, cudaStream_t stream) {
  switch (head_dim_bucket(p.head_dim)) {
    FASTMLM_FOR_EACH_HEAD_DIM(FASTMLM_FORWARD_CASE)
    default: return cudaErrorInvalidValue;
  }
}
inline cudaError_t attention_backward(const AttentionParams& p, DType dtype, cudaStream_t stream) {
  switch (head_dim_bucket(p.head_dim)) {
    FASTMLM_FOR_EACH_HEAD_DIM(FASTMLM_BACKWARD_CASE)
    default: return cudaErrorInvalidValue;
  }
}
#undef FASTMLM_FORWARD_CASE
#undef FASTMLM_BACKWARD_CASE
#undef FASTMLM_BUCKET_CASE

// ----------------------------------------------------------------- masked LM loss
// Rows r in [0, R); vocabulary chunk [v0, v0 + chunk). targets[r] is the target id, or -1
// when the row does not count. See csrc/masked_ce.cuh for the algorithm.
struct MaskedCEParams {
  // pointers
  const void* hidden = nullptr;  // gather: (T, H) source rows
  const int64_t* positions = nullptr;
  void* rows = nullptr;          // gather: (R, H) destination
  const void* logits = nullptr;  // (R, chunk) one vocabulary chunk of logits, input dtype
  const void* bias = nullptr;    // (chunk,) or null
  const int64_t* targets = nullptr;
  float* stats = nullptr;        // (R, 4) running max, sum of exp, sum of logits, target logit
  int64_t* best = nullptr;       // (R,) running argmax; its logit is kept in best_logit
  float* best_logit = nullptr;   // (R,)
  const float* lse = nullptr;    // (R,) backward input
  const float* grad = nullptr;   // (R,) upstream gradient per row
  float* loss = nullptr;         // (R,) finish outputs
  float* lse_out = nullptr;
  bool* correct = nullptr;
  void* dlogits = nullptr;       // (R, chunk) backward output, input dtype
  // sizes
  int64_t num_rows = 0;
  int64_t num_tokens = 0;
  int64_t hidden_size = 0;
  int64_t vocab = 0;
  int64_t v0 = 0;
  int64_t chunk = 0;
  // options
  float label_smoothing = 0.f;
  float z_loss = 0.f;
};

cudaError_t gather_rows(const MaskedCEParams& p, DType dtype, cudaStream_t stream);
cudaError_t masked_ce_chunk_stats(const MaskedCEParams& p, DType dtype, cudaStream_t stream);
cudaError_t masked_ce_finish(const MaskedCEParams& p, cudaStream_t stream);
cudaError_t masked_ce_chunk_grad(const MaskedCEParams& p, DType dtype, cudaStream_t stream);

}  // namespace fastmlm
