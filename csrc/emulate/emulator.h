// A CPU emulation of the CUDA execution model, just enough to unit-test fastmlm's kernel
// templates on a machine without a GPU (see csrc/device.cuh, FASTMLM_EMULATE).
//
// Every CUDA thread of a block runs as a fiber (ucontext) on one OS thread; blocks run one
// after another. A barrier (__syncthreads, and the warp-wide exchange behind shuffles and
// mma) parks the fiber until every fiber of its group has arrived. The mma is computed
// from the fragments of all 32 lanes, assembled with the PTX ISA's fragment layout, so a
// kernel that gets a fragment index wrong fails here just as it would on a GPU.
// A barrier that some threads never reach is reported as a deadlock instead of hanging.
//
// Slow (microseconds per barrier) and single-threaded: tiny shapes only.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include <vector_types.h>

namespace fastmlm_emu {

struct Barrier {
  int arrived = 0;
  uint64_t generation = 0;
};

// One cp.async copy in flight: its source is read at issue, its destination written only
// when a wait retires its group, so a kernel that reads before waiting sees stale data.
struct AsyncCopy {
  void* dst;
  unsigned char data[16];
};

struct Fiber {
  ucontext_t context;
  uint3 thread_idx;
  bool done = false;
  std::vector<AsyncCopy> open_group;               // issued, not yet committed
  std::vector<std::vector<AsyncCopy>> committed;   // oldest first
};

struct Warp {
  Barrier barrier;
  alignas(16) unsigned char slots[32][64];  // per-lane mailboxes for exchanges
};

struct BlockState {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Barrier block_barrier;
  std::vector<unsigned char> smem;
  ucontext_t scheduler;
  int current = 0;
  uint64_t idle_yields = 0;
  const std::function<void()>* body = nullptr;
};

inline BlockState* g_block = nullptr;
inline uint3 g_block_idx, g_block_dim, g_grid_dim;

inline uint3 thread_idx() { return g_block->fibers[g_block->current].thread_idx; }
inline int lane() { return static_cast<int>(thread_idx().x % 32); }
inline Warp& warp() { return g_block->warps[thread_idx().x / 32]; }
inline unsigned char* shared_memory() { return g_block->smem.data(); }

inline void yield() {
  BlockState& b = *g_block;
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

inline void wait(Barrier& barrier, int count) {
  const uint64_t generation = barrier.generation;
  if (++barrier.arrived == count) {
    barrier.arrived = 0;
    ++barrier.generation;
    g_block->idle_yields = 0;
    return;
  }
  while (barrier.generation == generation) {
    if (++g_block->idle_yields > 50'000'000ull) {
      std::fprintf(stderr, "fastmlm emulator: deadlock, a barrier is never reached by every thread\n");
      std::abort();
    }
    yield();
  }
}

inline void sync_block() { wait(g_block->block_barrier, static_cast<int>(g_block->fibers.size())); }

template <class V>
V shuffle_xor(V value, int lane_mask) {
  static_assert(sizeof(V) <= 64, "value too large for the emulator's mailbox");
  Warp& w = warp();
  const int me = lane();
  std::memcpy(w.slots[me], &value, sizeof(V));
  wait(w.barrier, 32);
  V result;
  std::memcpy(&result, w.slots[me ^ lane_mask], sizeof(V));
  wait(w.barrier, 32);
  return result;
}

// D (16x8, fp32) += A (16x16) · B (16x8), assembled from every lane's fragments.
template <class Unpack>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], Unpack unpack) {
  struct Frag {
    uint32_t a[4], b[2];
  };
  Warp& w = warp();
  const int me = lane();
  Frag mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  std::memcpy(w.slots[me], &mine, sizeof(Frag));
  wait(w.barrier, 32);
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    Frag f;
    std::memcpy(&f, w.slots[l], sizeof(Frag));
    const int g = l / 4, t = l % 4;
    for (int r = 0; r < 4; ++r) {
      const float2 v = unpack(f.a[r]);
      const int row = g + (r % 2) * 8, col = 2 * t + (r / 2) * 8;
      A[row][col] = v.x;
      A[row][col + 1] = v.y;
    }
    for (int r = 0; r < 2; ++r) {
      const float2 v = unpack(f.b[r]);
      const int k = 2 * t + r * 8;
      B[k][g] = v.x;
      B[k + 1][g] = v.y;
    }
  }
  wait(w.barrier, 32);
  const int g = me / 4, t = me % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i / 2) * 8, col = 2 * t + (i % 2);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    d[i] += acc;
  }
}

// ldmatrix.x2.trans (see device.cuh): lane (g, t) gets rows 2t, 2t+1 of column g of matrix m,
// whose row j lives at the address lane 8m + j supplied.
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  Warp& w = warp();
  const int me = lane();
  std::memcpy(w.slots[me], &row, sizeof(row));
  wait(w.barrier, 32);
  const int g = me / 4, t = me % 4;
  for (int m = 0; m < 2; ++m) {
    const unsigned char* rows[2];
    std::memcpy(&rows[0], w.slots[8 * m + 2 * t], sizeof(rows[0]));
    std::memcpy(&rows[1], w.slots[8 * m + 2 * t + 1], sizeof(rows[1]));
    uint16_t lo, hi;
    std::memcpy(&lo, rows[0] + 2 * g, 2);
    std::memcpy(&hi, rows[1] + 2 * g, 2);
    r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  wait(w.barrier, 32);
}

inline Fiber& fiber() { return g_block->fibers[g_block->current]; }

inline void cp_async_16(void* dst, const void* src, bool valid) {
  AsyncCopy copy{dst, {}};
  if (valid) std::memcpy(copy.data, src, 16);
  fiber().open_group.push_back(copy);
}

inline void cp_async_commit() {
  Fiber& f = fiber();
  f.committed.push_back(std::move(f.open_group));
  f.open_group.clear();
}

inline void cp_async_wait(int newest_pending) {
  Fiber& f = fiber();
  while (static_cast<int>(f.committed.size()) > newest_pending) {
    for (const AsyncCopy& copy : f.committed.front()) std::memcpy(copy.dst, copy.data, 16);
    f.committed.erase(f.committed.begin());
  }
}

inline void fiber_entry() {
  BlockState& b = *g_block;
  (*b.body)();
  b.fibers[b.current].done = true;
}

// Run body() as every thread of every block of the grid.
inline void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  constexpr size_t kStack = 64 * 1024;
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (block.y != 1 || block.z != 1 || threads % 32 != 0) {
    std::fprintf(stderr, "fastmlm emulator: blocks must be 1-D and a multiple of 32 threads\n");
    std::abort();
  }
  g_grid_dim = make_uint3(grid.x, grid.y, grid.z);
  g_block_dim = make_uint3(block.x, block.y, block.z);
  std::vector<std::unique_ptr<char[]>> stacks(threads);  // reused by every block of the launch
  for (auto& stack : stacks) stack.reset(new char[kStack]);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        BlockState state;
        state.fibers.resize(threads);
        state.warps.resize(threads / 32);
        // Poison shared memory: a kernel reading what it never wrote sees NaN-like garbage.
        state.smem.assign(smem_bytes + 16, 0xFF);
        state.body = &body;
        g_block = &state;
        g_block_idx = make_uint3(bx, by, bz);
        for (int i = 0; i < threads; ++i) {
          Fiber& f = state.fibers[i];
          f.thread_idx = make_uint3(i, 0, 0);
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = stacks[i].get();
          f.context.uc_stack.ss_size = kStack;
          f.context.uc_link = &state.scheduler;
          makecontext(&f.context, fiber_entry, 0);
        }
        for (bool running = true; running;) {  // round-robin until every fiber has returned
          running = false;
          for (int i = 0; i < threads; ++i) {
            if (state.fibers[i].done) continue;
            state.current = i;
            swapcontext(&state.scheduler, &state.fibers[i].context);
            running = true;
          }
        }
        g_block = nullptr;
      }
}

}  // namespace fastmlm_emu

// The CUDA built-in variables, as the kernels spell them.
#define threadIdx (::fastmlm_emu::thread_idx())
#define blockIdx (::fastmlm_emu::g_block_idx)
#define blockDim (::fastmlm_emu::g_block_dim)
#define gridDim (::fastmlm_emu::g_grid_dim)
