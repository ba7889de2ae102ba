// The head-dim buckets of the attention kernels: the one list that launchers.h (declarations,
// bucket dispatch), bindings.cpp (checks, messages, fastmlm._C.HEAD_DIMS), the instantiation
// files attention_hd<N>.cu and the emulator (emulate/emulated_kernels.cpp) all expand.
// The Python side reads it with fastmlm.tools.compile_cuda.head_dims(); the compile check
// (make compile-cuda) and tests/test_cuda_build.py fail when a bucket has no attention_hd<N>.cu
// or such a file names a bucket missing here.
//
// X(HD) is applied to every bucket, in ascending order (head_dim_bucket relies on it). Each
// bucket is a multiple of 16 (the k of mma m16n8k16); a head dim that is a multiple of 8 runs
// in the smallest bucket that holds it, zero-padded.
//
// Adding a bucket: append it here and add attention_hd<N>.cu (two lines, as the others); mind
// the shared memory of a larger one (attention.cuh, Tiles: under 48 KiB without an opt-in).
#pragma once

#define FASTMLM_FOR_EACH_HEAD_DIM(X) X(32) X(64) X(128)

namespace fastmlm {

#define FASTMLM_HEAD_DIM_ITEM(HD) HD,
inline constexpr int kHeadDims[] = {FASTMLM_FOR_EACH_HEAD_DIM(FASTMLM_HEAD_DIM_ITEM)};
#undef FASTMLM_HEAD_DIM_ITEM
inline constexpr int kNumHeadDims = sizeof(kHeadDims) / sizeof(kHeadDims[0]);
inline constexpr int kMaxHeadDim = kHeadDims[kNumHeadDims - 1];

constexpr bool head_dims_are_valid() {
  for (int i = 0; i < kNumHeadDims; ++i)
    if (kHeadDims[i] % 16 != 0 || (i > 0 && kHeadDims[i] <= kHeadDims[i - 1])) return false;
  return true;
}
static_assert(head_dims_are_valid(), "FASTMLM_FOR_EACH_HEAD_DIM: ascending multiples of 16");

constexpr bool is_head_dim_bucket(int hd) {
  for (int i = 0; i < kNumHeadDims; ++i)
    if (kHeadDims[i] == hd) return true;
  return false;
}

// The smallest instantiated head dim that holds head_dim (the kernel zero-pads the rest), or 0.
constexpr int head_dim_bucket(int head_dim) {
  if (head_dim <= 0 || head_dim % 8 != 0) return 0;
  for (int i = 0; i < kNumHeadDims; ++i)
    if (head_dim <= kHeadDims[i]) return kHeadDims[i];
  return 0;
}

}  // namespace fastmlm
