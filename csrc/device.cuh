// Device primitives shared by the fastmlm kernels: the few things a kernel needs beyond
// plain C++ (tensor-core mma, warp shuffles, block barrier, dynamic shared memory, launch).
//
// Compiled by nvcc they map to PTX / CUDA built-ins. Compiled by a host C++ compiler with
// -DFASTMLM_EMULATE they map to a CPU emulation (csrc/emulate/emulator.h) that runs every
// CUDA thread as a fiber, so the kernel templates can be unit-tested on a machine without a
// GPU. Keep kernels to these primitives (no other intrinsics) so both builds stay in step.
//
// No torch headers here: kernel translation units must compile fast and without torch.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <cuda_fp16.h>

#ifdef FASTMLM_EMULATE
#include "emulate/emulator.h"
#define FASTMLM_DEVICE inline
#define FASTMLM_KERNEL
#define FASTMLM_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  fastmlm_emu::launch(grid, block, smem_bytes, [=]() { kernel(__VA_ARGS__); })
#else
#define FASTMLM_DEVICE __device__ __forceinline__
#define FASTMLM_KERNEL __global__
#define FASTMLM_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  kernel<<<grid, block, smem_bytes, stream>>>(__VA_ARGS__)
#endif

namespace fastmlm {

constexpr int kWarpSize = 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ----------------------------------------------------------------- thread coordinates
FASTMLM_DEVICE int thread_x() { return static_cast<int>(threadIdx.x); }
FASTMLM_DEVICE int block_x() { return static_cast<int>(blockIdx.x); }
FASTMLM_DEVICE int block_y() { return static_cast<int>(blockIdx.y); }
FASTMLM_DEVICE int block_z() { return static_cast<int>(blockIdx.z); }
FASTMLM_DEVICE int block_threads() { return static_cast<int>(blockDim.x); }
FASTMLM_DEVICE int grid_x() { return static_cast<int>(gridDim.x); }

// ----------------------------------------------------------------- synchronisation
FASTMLM_DEVICE void sync_block() {
#ifdef FASTMLM_EMULATE
  fastmlm_emu::sync_block();
#else
  __syncthreads();
#endif
}

// Butterfly exchange inside a warp: lane i receives the value of lane i ^ lane_mask.
template <class V>
FASTMLM_DEVICE V shuffle_xor(V value, int lane_mask) {
#ifdef FASTMLM_EMULATE
  return fastmlm_emu::shuffle_xor(value, lane_mask);
#else
  return __shfl_xor_sync(0xffffffffu, value, lane_mask);
#endif
}

// Dynamic shared memory of the block, 16-byte aligned.
template <class V>
FASTMLM_DEVICE V* shared_memory() {
#ifdef FASTMLM_EMULATE
  return reinterpret_cast<V*>(fastmlm_emu::shared_memory());
#else
  extern __shared__ __align__(16) unsigned char fastmlm_smem[];
  return reinterpret_cast<V*>(fastmlm_smem);
#endif
}

// ----------------------------------------------------------------- element types
// The 16-bit input types travel in pairs packed into one 32-bit register, the unit of
// the mma fragments: the lower 16 bits hold the element with the lower index.
FASTMLM_DEVICE __half2 to_pair(float lo, float hi, __half) { return __floats2half2_rn(lo, hi); }
FASTMLM_DEVICE __nv_bfloat162 to_pair(float lo, float hi, __nv_bfloat16) { return __floats2bfloat162_rn(lo, hi); }
FASTMLM_DEVICE float2 to_float2(__half2 h) { return __half22float2(h); }
FASTMLM_DEVICE float2 to_float2(__nv_bfloat162 h) { return __bfloat1622float2(h); }

template <class T>
struct Pair {
  using Packed = decltype(to_pair(0.f, 0.f, T()));  // __half2 or __nv_bfloat162
  static_assert(sizeof(Packed) == 4, "a pair of 16-bit elements fills one register");
  static FASTMLM_DEVICE uint32_t pack(float lo, float hi) {
    const Packed h = to_pair(lo, hi, T());
    uint32_t bits;
    memcpy(&bits, &h, 4);
    return bits;
  }
  static FASTMLM_DEVICE float2 unpack(uint32_t bits) {
    Packed h;
    memcpy(&h, &bits, 4);
    return to_float2(h);
  }
};

FASTMLM_DEVICE float to_float(float x) { return x; }
FASTMLM_DEVICE float to_float(__half x) { return __half2float(x); }
FASTMLM_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> FASTMLM_DEVICE T from_float(float x);
template <> FASTMLM_DEVICE float from_float<float>(float x) { return x; }
template <> FASTMLM_DEVICE __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> FASTMLM_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ----------------------------------------------------------------- tensor-core mma
// d += a · b for one warp, m16n8k16, 16-bit inputs, fp32 accumulators (sm_80+).
// Fragment layout (PTX ISA, "mma.m16n8k16"), with g = lane / 4 and t = lane % 4:
//   a[0] = A[g][2t..2t+1]    a[1] = A[g+8][2t..2t+1]   a[2] = A[g][2t+8..]   a[3] = A[g+8][2t+8..]
//   b[0] = B[2t..2t+1][g]    b[1] = B[2t+8..2t+9][g]
//   d[0..1] = D[g][2t..2t+1] d[2..3] = D[g+8][2t..2t+1]
template <class T>
FASTMLM_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef FASTMLM_EMULATE
  fastmlm_emu::mma_16816(d, a, b, [](uint32_t bits) { return Pair<T>::unpack(bits); });
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(__CUDA_ARCH__)
  static_assert(sizeof(T) == 0, "fastmlm's tensor-core kernels need sm_80 or newer");
#endif
}

// ldmatrix .x2 .trans: two 8x8 matrices of 16-bit elements from shared memory, transposed.
// Lanes 0-7 give the row addresses of matrix 0, lanes 8-15 those of matrix 1 (16-byte aligned
// rows of 8 elements; the addresses of lanes 16-31 are ignored). Lane (g, t) receives in
// r[m] the elements (row 2t, column g) and (row 2t+1, column g) of matrix m: exactly an mma
// B fragment when the rows are the k index, i.e. when B is stored row-major as [k][n].
FASTMLM_DEVICE void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
#ifdef FASTMLM_EMULATE
  fastmlm_emu::ldmatrix_x2_trans(r, row);
#else
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(address));
#endif
}

// Asynchronous 16-byte copies global -> shared (sm_80 cp.async, bypassing L1). A copy with
// valid = false reads nothing and writes 16 zero bytes. Copies are grouped by
// cp_async_commit(); cp_async_wait<N>() returns once all but the newest N groups of this
// thread have landed. Other threads see the data only after a following sync_block().
FASTMLM_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
#ifdef FASTMLM_EMULATE
  fastmlm_emu::cp_async_16(smem_dst, gmem_src, valid);
#else
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
#endif
}

FASTMLM_DEVICE void cp_async_commit() {
#ifdef FASTMLM_EMULATE
  fastmlm_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
FASTMLM_DEVICE void cp_async_wait() {
#ifdef FASTMLM_EMULATE
  fastmlm_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Two consecutive 16-bit elements as one 32-bit word (the address must be 4-byte aligned).
template <class T>
FASTMLM_DEVICE uint32_t load_pair(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// 16 bytes (eight 16-bit elements), the unit of the global <-> shared copies.
struct alignas(16) Vec16 {
  uint32_t w[4];
};

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// The error of the launch just made (asynchronous errors surface at the next sync).
inline cudaError_t last_launch_error() {
#ifdef FASTMLM_EMULATE
  return cudaSuccess;
#else
  return cudaGetLastError();
#endif
}

}  // namespace fastmlm
