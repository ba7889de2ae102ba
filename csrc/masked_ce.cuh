// Fused masked-LM cross-entropy: the kernels around the vocabulary projection.
//
// Algorithm (same semantics as kernels/masked_ce.py; the driver is
// fastmlm/ops/cuda_impl/masked_ce.py):
//   gather      rows = hidden[positions] (a -1 position gives a zero row).
//   forward     for each vocabulary chunk [v0, v0 + C): logits = rows · W[v0:v0+C]ᵀ on the
//               tensor cores (cuBLAS, through torch.matmul), then chunk_stats_kernel folds
//               the chunk into a running per-row state in fp32, the online logsumexp:
//                   m' = max(m, max_c z),  s' = s·e^(m - m') + Σ_c e^(z - m'),
//               plus Σ z (for label smoothing), the target's logit and the first argmax.
//               finish_kernel then gives lse = m + ln s and
//                   loss = (1 - eps)(lse - z_t) + eps (lse - Σz / V) + zl · lse².
//               Only one (R, C) chunk of logits exists at a time, never (R, V).
//   backward    per chunk, recompute the logits and turn them into (a new buffer)
//                   dz = g · (e^(z - lse) (1 + 2 zl lse) - eps / V - (1 - eps) [v = t])
//               (chunk_grad_kernel); the driver multiplies dz into d_rows and d_weight.
//
// So the "fusion" is of the softmax / loss / gradient arithmetic with the chunked
// projection; the matrix products themselves are cuBLAS's. The kernels' reductions have a
// fixed order (one block per row, chunks in order); with positions, d_hidden is scattered
// by index_add_, whose order is not fixed when a position repeats.
// Bias is added in fp32 inside the kernels. Types: fp32, fp16, bf16 in; statistics fp32.
#pragma once

#include <cmath>

#include "device.cuh"
#include "launchers.h"

namespace fastmlm {
namespace masked_ce {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr unsigned kMaxGrid = 1u << 20;  // grid-stride kernels cap their grid here

FASTMLM_DEVICE int64_t grid_stride_start() { return static_cast<int64_t>(block_x()) * kThreads + thread_x(); }
FASTMLM_DEVICE int64_t grid_stride() { return static_cast<int64_t>(grid_x()) * kThreads; }

// rows[r, :] = hidden[positions[r], :], or zeros when positions[r] is -1 (or out of range).
template <class T>
FASTMLM_KERNEL void gather_rows_kernel(const MaskedCEParams p) {
  const T* hidden = static_cast<const T*>(p.hidden);
  T* rows = static_cast<T*>(p.rows);
  const int64_t total = p.num_rows * p.hidden_size;
  for (int64_t i = grid_stride_start(); i < total; i += grid_stride()) {
    const int64_t r = i / p.hidden_size, c = i % p.hidden_size;
    const int64_t pos = p.positions[r];
    rows[i] = pos >= 0 && pos < p.num_tokens ? hidden[pos * p.hidden_size + c] : from_float<T>(0.f);
  }
}

// The partial state of one row over some logits: max, Σ e^(z - max), Σ z, first argmax.
struct RowState {
  float max = -INFINITY;
  float sum_exp = 0.f;
  float sum = 0.f;
  float best = -INFINITY;
  int64_t best_index = INT64_MAX;
};

// sum_exp, taken from the max it was summed against to a new (not smaller) max. An empty
// state (sum 0, max -inf) stays 0 rather than 0 · e^(-inf + inf) = NaN. The test is on the
// sum, not on the max: a state that has seen only NaN logits has max -inf (fmaxf skips NaN)
// but sum NaN, and that NaN must survive into lse and the loss.
FASTMLM_DEVICE float scaled(float sum_exp, float from_max, float to_max) {
  return sum_exp == 0.f ? 0.f : sum_exp * expf(from_max - to_max);
}

FASTMLM_DEVICE RowState merge(const RowState& a, const RowState& b) {
  RowState out;
  out.max = fmaxf(a.max, b.max);
  out.sum_exp = scaled(a.sum_exp, a.max, out.max) + scaled(b.sum_exp, b.max, out.max);
  out.sum = a.sum + b.sum;
  const bool take_b = b.best > a.best || (b.best == a.best && b.best_index < a.best_index);  // first among ties
  out.best = take_b ? b.best : a.best;
  out.best_index = take_b ? b.best_index : a.best_index;
  return out;
}

FASTMLM_DEVICE RowState warp_merge(RowState s) {
  for (int mask = 16; mask > 0; mask /= 2) {
    RowState other;
    other.max = shuffle_xor(s.max, mask);
    other.sum_exp = shuffle_xor(s.sum_exp, mask);
    other.sum = shuffle_xor(s.sum, mask);
    other.best = shuffle_xor(s.best, mask);
    other.best_index = shuffle_xor(s.best_index, mask);
    s = merge(s, other);
  }
  return s;
}

// One block per row: fold logits[r, 0:C] (+ bias) into the running state of row r.
template <class T>
FASTMLM_KERNEL void chunk_stats_kernel(const MaskedCEParams p) {
  const int64_t r = block_x();
  const T* logits = static_cast<const T*>(p.logits) + r * p.chunk;
  const T* bias = static_cast<const T*>(p.bias);

  // Stage 1: each thread's strided share of the chunk, online.
  RowState s;
  for (int64_t j = thread_x(); j < p.chunk; j += kThreads) {
    const float z = to_float(logits[j]) + (bias != nullptr ? to_float(bias[j]) : 0.f);
    s.sum += z;
    if (z > s.max) {
      s.sum_exp = scaled(s.sum_exp, s.max, z) + 1.f;
      s.max = z;
    } else {
      s.sum_exp += expf(z - s.max);
    }
    if (z > s.best) {  // j only grows, so this keeps the first maximum of this thread
      s.best = z;
      s.best_index = j;
    }
  }

  // Stage 2: warps, then the block (fixed order: deterministic).
  RowState* partial = shared_memory<RowState>();
  s = warp_merge(s);
  if (thread_x() % kWarpSize == 0) partial[thread_x() / kWarpSize] = s;
  sync_block();
  if (thread_x() != 0) return;
  for (int w = 1; w < kWarps; ++w) s = merge(s, partial[w]);

  // Stage 3: merge into the running state of the row (chunks arrive in order).
  float* state = p.stats + r * 4;
  const float new_max = fmaxf(state[0], s.max);
  state[1] = scaled(state[1], state[0], new_max) + scaled(s.sum_exp, s.max, new_max);
  state[0] = new_max;
  state[2] += s.sum;
  const int64_t target = p.targets[r];
  if (target >= p.v0 && target < p.v0 + p.chunk)
    state[3] = to_float(logits[target - p.v0]) + (bias != nullptr ? to_float(bias[target - p.v0]) : 0.f);
  if (s.best > p.best_logit[r]) {  // strict: an earlier chunk keeps a tie
    p.best_logit[r] = s.best;
    p.best[r] = p.v0 + s.best_index;
  }
}

// Per row: lse, loss and "argmax is the target", zero where the row does not count.
FASTMLM_KERNEL void finish_kernel(const MaskedCEParams p) {
  for (int64_t r = grid_stride_start(); r < p.num_rows; r += grid_stride()) {
    const float* state = p.stats + r * 4;
    const int64_t target = p.targets[r];
    const bool counts = target >= 0;
    const float lse = state[0] + logf(state[1]);
    const float eps = p.label_smoothing;
    const float loss = (1.f - eps) * (lse - state[3]) + eps * (lse - state[2] / static_cast<float>(p.vocab)) +
                       p.z_loss * lse * lse;
    p.loss[r] = counts ? loss : 0.f;
    p.lse_out[r] = counts ? lse : 0.f;
    p.correct[r] = counts && p.best[r] == target;
  }
}

// dlogits[r, j] = g_r · (e^(z - lse_r) (1 + 2 zl lse_r) - eps / V - (1 - eps) [v0 + j = t_r]); 0 where r does not count.
template <class T>
FASTMLM_KERNEL void chunk_grad_kernel(const MaskedCEParams p) {
  const T* logits = static_cast<const T*>(p.logits);
  const T* bias = static_cast<const T*>(p.bias);
  T* dlogits = static_cast<T*>(p.dlogits);
  const float eps = p.label_smoothing, uniform = p.label_smoothing / static_cast<float>(p.vocab);
  const int64_t total = p.num_rows * p.chunk;
  for (int64_t i = grid_stride_start(); i < total; i += grid_stride()) {
    const int64_t r = i / p.chunk, j = i % p.chunk;
    const int64_t target = p.targets[r];
    float dz = 0.f;
    if (target >= 0) {  // rows that do not count have no lse: skip the exp entirely
      const float lse = p.lse[r];
      const float z = to_float(logits[i]) + (bias != nullptr ? to_float(bias[j]) : 0.f);
      dz = expf(z - lse) * (1.f + 2.f * p.z_loss * lse) - uniform - (p.v0 + j == target ? 1.f - eps : 0.f);
      dz *= p.grad[r];
    }
    dlogits[i] = from_float<T>(dz);
  }
}

inline unsigned grid_for(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks > kMaxGrid ? kMaxGrid : blocks);
}

// A kernel that strides over `items` elements (grid_for blocks of kThreads); nothing to do: no launch.
inline cudaError_t launch_grid_stride(void (*kernel)(const MaskedCEParams), int64_t items, const MaskedCEParams& p,
                                      cudaStream_t stream) {
  if (items == 0) return cudaSuccess;
  FASTMLM_LAUNCH(kernel, dim3(grid_for(items)), dim3(kThreads), 0, stream, p);
  return last_launch_error();
}

template <class T>
cudaError_t launch_gather(const MaskedCEParams& p, cudaStream_t stream) {
  return launch_grid_stride(&gather_rows_kernel<T>, p.num_rows * p.hidden_size, p, stream);
}

// One block per row (a block reduces the row over the chunk).
template <class T>
cudaError_t launch_chunk_stats(const MaskedCEParams& p, cudaStream_t stream) {
  if (p.num_rows == 0) return cudaSuccess;
  auto* kernel = &chunk_stats_kernel<T>;
  constexpr size_t smem = kWarps * sizeof(RowState);
  FASTMLM_LAUNCH(kernel, dim3(static_cast<unsigned>(p.num_rows)), dim3(kThreads), smem, stream, p);
  return last_launch_error();
}

template <class T>
cudaError_t launch_chunk_grad(const MaskedCEParams& p, cudaStream_t stream) {
  return launch_grid_stride(&chunk_grad_kernel<T>, p.num_rows * p.chunk, p, stream);
}

inline cudaError_t launch_finish(const MaskedCEParams& p, cudaStream_t stream) {
  return launch_grid_stride(&finish_kernel, p.num_rows, p, stream);
}

}  // namespace masked_ce
}  // namespace fastmlm
