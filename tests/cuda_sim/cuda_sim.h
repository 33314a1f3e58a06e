// A small CPU simulator for glm5's CUDA kernels, so their index arithmetic, fragment layouts and
// barriers are tested on machines without a GPU (the real hardware tests are tests/ops/test_cuda_*.py).
//
// Every CUDA thread of a CTA is a fiber (ucontext) on the calling OS thread; CTAs run one after
// another. __syncthreads is a barrier over the CTA, and the warp-collective operations (shuffles,
// ldmatrix, mma.sync) exchange their operands through per-warp slots behind a warp barrier, then compute
// each lane's result exactly as the PTX ISA defines it (the layouts are restated in
// csrc/cuda/common/mma.cuh). Hopper's wgmma reads its operands from shared memory through the kernel's
// descriptors (wgmma.cuh, gmma_desc.h). A cp.async copy lands at its issue or at the cp.async.wait_group
// that retires it, and a wgmma batch runs at its issue or at its wait (seeded coin flips, GLM5_SIM_ASYNC),
// so a kernel that reads data before waiting for it, or overwrites a buffer that other threads still
// read, reads the wrong bytes here too. mma accumulates in fp32 in increasing k order (the hardware's
// order within one mma is unspecified: results match to fp32 rounding, not bitwise).
//
// Include this before any glm5 kernel header. Dynamic shared memory is glm5::cuda::dynamic_smem()
// (device_utils.cuh), never `extern __shared__`; a `__shared__` variable in a kernel body becomes a
// function-local static, which all threads of the CTA share (CTAs run one at a time, and each kernel
// instantiation has its own). Besides the shuffles and mma: __syncwarp, __ballot_sync, __any_sync,
// __match_any_sync, __popc, __ffs and cub::BlockScan's sums and scans (the kernel headers include cub
// only outside the simulator). Not supported: atomics, threads that exit before a __syncthreads the
// others still reach, warp-divergent collectives (every lane of a warp must reach each collective; full
// masks only).
#pragma once
#define GLM5_CUDA_SIM 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <vector_types.h>

// After the CUDA headers (their include guards keep this definition): see above.
#undef __shared__
#define __shared__ static

#include <array>
#include <algorithm>
#include <functional>
#include <random>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <utility>
#include <type_traits>
#include <vector>

#include <ucontext.h>

#include "../../csrc/cuda/common/gmma_desc.h"  // wgmma's operand layouts (decoded by wgmma::mma below)
#include "../../csrc/cuda/common/mma.cuh"      // kIsMmaType, pack2 (its PTX wrappers are replaced below)

namespace glm5_sim {

struct Slot {
  uint32_t r[8];
  const void* ptr;
};

// Barrier over the fibers of one CTA (or one warp). The last arriver carries on; the others yield
// to the scheduler, which resumes them once the generation has moved on.
struct Barrier {
  explicit Barrier(int n) : count(n) {}
  void arrive_and_wait();
  int count, arrived = 0;
  uint64_t gen = 0;
};

// A warp's mma operands, decoded once from the 32 lanes' fragments (id: the collective's number).
struct MmaOperands {
  unsigned id = ~0u;
  float A[16][16], B[16][8];
};

struct Warp {
  Barrier bar{32};
  MmaOperands mma[2];
  std::array<Slot, 32> slot[2]{};  // collectives alternate between the two (see warp_exchange)
};

// One wgmma.mma_async a thread has issued: its accumulators, descriptors and shape (see wgmma::mma).
struct WgmmaOp {
  float* d;
  uint64_t da, db;
  int n;
  bool trans_a, trans_b, accumulate, bf16;
};

struct Cta {
  explicit Cta(int nthreads, size_t smem_bytes) : bar(nthreads), smem(smem_bytes + 128) {
    for (int w = 0; w < nthreads / 32; ++w) warps.push_back(std::make_unique<Warp>());
  }
  Barrier bar;
  int flag = 0;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<std::vector<WgmmaOp>> wgmma_log;  // per warpgroup: every wgmma as its first thread issued it
  std::vector<unsigned char> smem;
  unsigned char* smem_base() {  // 128-byte aligned, as CUDA's dynamic shared memory
    return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem.data()) + 127) & ~uintptr_t(127));
  }
};

struct Copy {
  void* dst;
  const void* src;
  bool valid;
};


// The running CUDA thread's state. The scheduler swaps each fiber's copy in and out of tctx around
// every resume, so kernel code sees its own thread's values.
struct ThreadCtx {
  uint3 thread{}, block{};
  dim3 block_dim{}, grid_dim{};
  Cta* cta = nullptr;
  std::vector<Copy> open;                 // cp.async copies not yet committed
  std::vector<std::vector<Copy>> groups;  // committed, in flight (oldest first)
  unsigned collectives = 0;               // warp collectives this thread has reached in the CTA
  std::vector<WgmmaOp> wg_open;                // wgmma issued, not yet committed
  std::vector<std::vector<WgmmaOp>> wg_groups; // committed batches in flight (oldest first)
  int wg_batch = -1;                           // the open batch runs: -1 undecided, 0 at its wait, 1 at issue
  size_t wg_issued = 0;                        // wgmma this thread has issued in the CTA
};
inline thread_local ThreadCtx tctx;

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  ThreadCtx t;
  bool done = false;
  const uint64_t* wait_gen = nullptr;  // blocked until *wait_gen != wait_val
  uint64_t wait_val = 0;
};

struct Scheduler {
  ucontext_t main;
  std::vector<Fiber> fibers;
  int current = -1;
  std::function<void()> body;
  std::mt19937 async_rng;  // when each cp.async lands and each wgmma batch runs (see cp_async_16, wgmma::mma)
  int async_mode = 2;      // 0 lazy: at the wait; 1 eager: at issue; 2 either, by coin flip
  bool eager() { return async_mode == 1 || (async_mode == 2 && (async_rng() & 1u)); }
};
inline thread_local Scheduler* sched = nullptr;

inline void fiber_entry() {
  sched->body();
  sched->fibers[sched->current].done = true;  // uc_link returns to the scheduler
}

inline void Barrier::arrive_and_wait() {
  if (++arrived == count) {
    arrived = 0;
    ++gen;
    return;
  }
  Fiber& f = sched->fibers[sched->current];
  f.wait_gen = &gen;
  f.wait_val = gen;
  swapcontext(&f.ctx, &sched->main);
}

inline int lane() { return int(tctx.thread.x) & 31; }
inline Warp& warp() { return *tctx.cta->warps[tctx.thread.x / 32]; }

// Runs kernel() for every thread of every CTA of the grid (blocks in x, then y, then z order). The
// threads of a CTA are fibers (ucontext) on the calling OS thread: a thread runs until it reaches a
// barrier or a warp collective, then the scheduler resumes the next runnable one, in an order
// reshuffled on every pass (seeded, GLM5_SIM_SEED: runs are reproducible) so that a missing barrier between two
// threads shows up whichever of them writes first. Each CTA starts with its shared memory filled with
// 0xff bytes (NaN as a float, -1 as an int), so a kernel that reads shared memory it never wrote sees
// garbage, as on a GPU. A barrier that not every thread reaches is reported as a deadlock.
template <typename F>
void launch(dim3 grid, dim3 block, size_t smem_bytes, F&& kernel) {
  constexpr size_t kStack = size_t(256) << 10;
  const int nthreads = int(block.x * block.y * block.z);
  if (block.y != 1 || block.z != 1 || nthreads % 32 != 0 || nthreads == 0)
    throw std::invalid_argument("cuda_sim: 1-D blocks of whole warps only");
  const uint64_t nctas = uint64_t(grid.x) * grid.y * grid.z;
  if (nctas == 0) return;
  Scheduler s;
  s.fibers.resize(nthreads);
  for (auto& f : s.fibers) f.stack.reset(new char[kStack]);
  s.body = [&] { kernel(); };
  Scheduler* outer = std::exchange(sched, &s);
  std::vector<int> order(nthreads);
  const char* seed = std::getenv("GLM5_SIM_SEED");  // another seed, another interleaving
  std::mt19937 rng(seed != nullptr ? unsigned(std::strtoul(seed, nullptr, 10)) : 12345u);
  s.async_rng.seed(seed != nullptr ? unsigned(std::strtoul(seed, nullptr, 10)) + 1u : 54321u);
  const char* mode = std::getenv("GLM5_SIM_ASYNC");  // lazy | eager | mixed (default)
  s.async_mode = mode == nullptr ? 2 : std::strcmp(mode, "lazy") == 0 ? 0 : std::strcmp(mode, "eager") == 0 ? 1 : 2;
  for (uint64_t b = 0; b < nctas; ++b) {
    Cta cta(nthreads, smem_bytes);
    std::memset(cta.smem.data(), 0xff, cta.smem.size());
    for (int i = 0; i < nthreads; ++i) {
      Fiber& f = s.fibers[i];
      f.t = ThreadCtx{};
      f.t.thread = uint3{unsigned(i), 0, 0};
      f.t.block = uint3{unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / grid.x / grid.y)};
      f.t.block_dim = block;
      f.t.grid_dim = grid;
      f.t.cta = &cta;
      f.done = false;
      f.wait_gen = nullptr;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.get();
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = &s.main;
      makecontext(&f.ctx, fiber_entry, 0);
      order[i] = i;
    }
    for (int finished = 0; finished < nthreads;) {
      bool progress = false;
      std::shuffle(order.begin(), order.end(), rng);
      finished = 0;
      for (int i : order) {
        Fiber& f = s.fibers[i];
        if (!f.done && f.wait_gen != nullptr && *f.wait_gen == f.wait_val) continue;  // still blocked
        if (!f.done) {
          f.wait_gen = nullptr;
          s.current = i;
          std::swap(tctx, f.t);
          swapcontext(&s.main, &f.ctx);
          std::swap(tctx, f.t);
          progress = true;
        }
        if (f.done) {
          if (!f.t.open.empty() || !f.t.groups.empty()) std::abort();        // copies never waited for
          if (!f.t.wg_open.empty() || !f.t.wg_groups.empty()) std::abort();  // wgmma never waited for
          ++finished;
        }
      }
      if (!progress && finished < nthreads) {
        sched = outer;
        throw std::runtime_error("cuda_sim: deadlock: a barrier or warp collective that not every thread reaches");
      }
    }
  }
  sched = outer;
}

// One warp-collective step: publish this lane's slot, wait, compute from all slots. Consecutive
// collectives use alternate slot sets, so one barrier suffices: a lane can publish into a set again
// only after the next collective's barrier, which every lane reaches after reading that set.
template <typename Post, typename Read>
inline void warp_exchange(Post&& post, Read&& read) {
  Warp& w = warp();
  auto& slots = w.slot[tctx.collectives++ & 1];
  post(slots[lane()]);
  w.bar.arrive_and_wait();
  read(slots);
}

template <typename T>
inline float to_float(uint16_t bits) {
  T v;
  std::memcpy(&v, &bits, 2);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return __half2float(v);
}

}  // namespace glm5_sim

#undef __launch_bounds__
#define __launch_bounds__(...)
#define threadIdx (::glm5_sim::tctx.thread)
#define blockIdx (::glm5_sim::tctx.block)
#define blockDim (::glm5_sim::tctx.block_dim)
#define gridDim (::glm5_sim::tctx.grid_dim)

// CUDA's global min/max overloads (mixed integer types take the common type).
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) { return a < b ? a : b; }
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

inline void __syncthreads() { glm5_sim::tctx.cta->bar.arrive_and_wait(); }

inline int __syncthreads_or(int pred) {
  auto& cta = *glm5_sim::tctx.cta;
  if (pred) cta.flag = 1;
  cta.bar.arrive_and_wait();
  const int any = cta.flag;
  cta.bar.arrive_and_wait();
  if (threadIdx.x == 0) cta.flag = 0;
  cta.bar.arrive_and_wait();
  return any;
}

template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int lane_mask) {
  static_assert(sizeof(V) <= sizeof(glm5_sim::Slot::r));
  V out;
  glm5_sim::warp_exchange([&](glm5_sim::Slot& s) { std::memcpy(s.r, &v, sizeof(V)); },
                          [&](auto& slots) { std::memcpy(&out, slots[glm5_sim::lane() ^ lane_mask].r, sizeof(V)); });
  return out;
}

// CUDA's global isnan overloads.
using std::isnan;

inline void __syncwarp(unsigned = 0xffffffffu) { glm5_sim::warp().bar.arrive_and_wait(); }

inline unsigned __ballot_sync(unsigned, int pred) {  // bit l: lane l's predicate
  unsigned out = 0;
  glm5_sim::warp_exchange([&](glm5_sim::Slot& s) { s.r[0] = pred ? 1u : 0u; },
                          [&](auto& slots) {
                            for (int l = 0; l < 32; ++l) out |= slots[l].r[0] << l;
                          });
  return out;
}

inline int __any_sync(unsigned, int pred) {
  int any = 0;
  glm5_sim::warp_exchange([&](glm5_sim::Slot& s) { s.r[0] = pred != 0; },
                          [&](auto& slots) {
                            for (const auto& s : slots) any |= int(s.r[0]);
                          });
  return any;
}

// The lanes whose value equals this lane's (bit l for lane l).
template <typename V>
inline unsigned __match_any_sync(unsigned, V v) {
  static_assert(std::is_integral_v<V> && sizeof(V) <= sizeof(glm5_sim::Slot::r));
  unsigned mask = 0;
  glm5_sim::warp_exchange([&](glm5_sim::Slot& s) { std::memcpy(s.r, &v, sizeof(V)); },
                          [&](auto& slots) {
                            for (int l = 0; l < 32; ++l) {
                              V o;
                              std::memcpy(&o, slots[l].r, sizeof(V));
                              if (o == v) mask |= 1u << l;
                            }
                          });
  return mask;
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }  // 1 + the lowest set bit, 0 for 0

namespace cub {

// cub::BlockScan's sums and scans with cub's contract: blockDim.x == BLOCK_DIM_X, every thread of the
// CTA calls, and the storage may be reused only after a __syncthreads (this version reads it after its
// barrier, so a kernel that reuses it without one races here too). The scans run in thread order; cub's tree order
// differs, which changes nothing for the integer sums and maxima glm5 scans.
template <typename T, int BLOCK_DIM_X>
class BlockScan {
 public:
  struct TempStorage {
    T vals[BLOCK_DIM_X];
  };
  explicit BlockScan(TempStorage& storage) : s_(storage) {
    if (blockDim.x != unsigned(BLOCK_DIM_X)) {  // a launcher bug; nothing can unwind a simulated thread
      std::fprintf(stderr, "cuda_sim: cub::BlockScan<%d> in a block of %u threads\n", BLOCK_DIM_X, blockDim.x);
      std::abort();
    }
  }
  void InclusiveSum(T input, T& output, T& block_aggregate) {
    InclusiveScan(input, output, [](T a, T b) { return a + b; }, block_aggregate);
  }
  void ExclusiveSum(T input, T& output, T& block_aggregate) {
    T inclusive;
    InclusiveSum(input, inclusive, block_aggregate);
    output = inclusive - input;  // exact for the integer sums glm5 scans
  }
  // output = op(...op(op(x_0, x_1), x_2)..., x_t), block_aggregate the same over every thread.
  template <typename Op>
  void InclusiveScan(T input, T& output, Op op, T& block_aggregate) {
    const int t = int(threadIdx.x);
    s_.vals[t] = input;
    __syncthreads();
    T run = s_.vals[0];
    for (int i = 1; i <= t; ++i) run = op(run, s_.vals[i]);
    output = run;
    for (int i = t + 1; i < BLOCK_DIM_X; ++i) run = op(run, s_.vals[i]);
    block_aggregate = run;
  }

 private:
  TempStorage& s_;
};

}  // namespace cub

namespace glm5::cuda {

inline unsigned char* dynamic_smem() { return glm5_sim::tctx.cta->smem_base(); }

// ldmatrix.m8n8.x4(.trans).b16: lanes 8i..8i+7 address the rows of matrix i.
inline void ldmatrix_impl(uint32_t (&r)[4], const void* row, bool trans) {
  glm5_sim::warp_exchange([&](glm5_sim::Slot& s) { s.ptr = row; },
                          [&](auto& slots) {
                            const int L = glm5_sim::lane();
                            for (int i = 0; i < 4; ++i) {
                              uint16_t lo, hi;
                              if (!trans) {  // row L / 4, columns 2 (L % 4), +1
                                const auto* p = static_cast<const uint16_t*>(slots[8 * i + L / 4].ptr);
                                lo = p[2 * (L % 4)], hi = p[2 * (L % 4) + 1];
                              } else {  // rows 2 (L % 4), +1 of column L / 4
                                lo = static_cast<const uint16_t*>(slots[8 * i + 2 * (L % 4)].ptr)[L / 4];
                                hi = static_cast<const uint16_t*>(slots[8 * i + 2 * (L % 4) + 1].ptr)[L / 4];
                              }
                              r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
                            }
                          });
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { ldmatrix_impl(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { ldmatrix_impl(r, row, true); }

// mma.sync.m16n8k16.row.col.f32: rebuild A (16x16) and B (16x8) from the 32 lanes' fragments.
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const glm5_sim::MmaOperands* m = nullptr;
  glm5_sim::warp_exchange(
      [&](glm5_sim::Slot& s) {
        for (int i = 0; i < 4; ++i) s.r[i] = a[i];
        s.r[4] = b0, s.r[5] = b1;
      },
      [&](auto& slots) {
        // The first lane to get here decodes the warp's operands for everyone (same parity rule
        // as the slots: the next collective of this parity starts after every lane has read these).
        const unsigned id = glm5_sim::tctx.collectives;  // already counts this collective
        glm5_sim::MmaOperands& op = glm5_sim::warp().mma[id & 1];
        if (op.id != id) {
          auto lo = [](uint32_t v) { return glm5_sim::to_float<T>(uint16_t(v & 0xffff)); };
          auto hi = [](uint32_t v) { return glm5_sim::to_float<T>(uint16_t(v >> 16)); };
          for (int l = 0; l < 32; ++l) {
            const int g = l / 4, c = l % 4;
            const uint32_t* r = slots[l].r;
            op.A[g][2 * c] = lo(r[0]), op.A[g][2 * c + 1] = hi(r[0]);
            op.A[g + 8][2 * c] = lo(r[1]), op.A[g + 8][2 * c + 1] = hi(r[1]);
            op.A[g][2 * c + 8] = lo(r[2]), op.A[g][2 * c + 9] = hi(r[2]);
            op.A[g + 8][2 * c + 8] = lo(r[3]), op.A[g + 8][2 * c + 9] = hi(r[3]);
            op.B[2 * c][g] = lo(r[4]), op.B[2 * c + 1][g] = hi(r[4]);
            op.B[2 * c + 8][g] = lo(r[5]), op.B[2 * c + 9][g] = hi(r[5]);
          }
          op.id = id;
        }
        m = &op;
      });
  const int g = glm5_sim::lane() / 4, c = glm5_sim::lane() % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * c + (e & 1);
    float v = d[e];
    for (int k = 0; k < 16; ++k) v += m->A[row][k] * m->B[k][col];
    d[e] = v;
  }
}

// A cp.async lands somewhere between its issue and the wait that retires it; the simulator picks either
// end, per copy (GLM5_SIM_ASYNC=mixed, the default: a seeded coin flip), or always the wait (lazy: a
// kernel reading a tile before waiting sees stale bytes) or always the issue (eager: a kernel refilling a
// buffer that other threads still read overwrites it under them).
inline void cp_async_16(void* dst, const void* src, bool valid) {
  if (!glm5_sim::sched->eager()) {
    glm5_sim::tctx.open.push_back({dst, src, valid});
    return;
  }
  if (valid) std::memcpy(dst, src, 16);
  else std::memset(dst, 0, 16);
}
inline void cp_async_commit() {
  auto& t = glm5_sim::tctx;
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}
template <int n>
inline void cp_async_wait() {
  auto& t = glm5_sim::tctx;
  while (t.groups.size() > size_t(n)) {
    for (const auto& c : t.groups.front()) {
      if (c.valid) std::memcpy(c.dst, c.src, 16);
      else std::memset(c.dst, 0, 16);
    }
    t.groups.erase(t.groups.begin());
  }
}


// The shared-window address of a pointer into the CTA's shared memory. The simulated window puts the
// dynamic shared memory at kSmemWindow, 128-byte but not 1024-byte aligned (the real base is not
// promised to be either), so a kernel that needs 1024-byte-aligned tiles must align them by address.
inline constexpr uint32_t kSmemWindow = 0x480;
inline uint32_t smem_addr(const void* p) {
  return uint32_t(static_cast<const unsigned char*>(p) - glm5_sim::tctx.cta->smem_base()) + kSmemWindow;
}

namespace wgmma {

inline void run(const glm5_sim::WgmmaOp& op);
// Runs this thread's committed batches, oldest first, until at most n are in flight.
inline void retire(size_t n) {
  auto& t = glm5_sim::tctx;
  while (t.wg_groups.size() > n) {
    for (const auto& op : t.wg_groups.front()) run(op);
    t.wg_groups.erase(t.wg_groups.begin());
  }
}

// wgmma.mma_async, for the issuing thread's accumulator registers only, reading both operands from shared
// memory as the descriptors address them (gmma_desc.h: the PTX ISA's canonical layouts). A batch runs
// either when the thread's wait() retires it or at issue (after the thread's older batches), a seeded
// coin flip per batch (GLM5_SIM_ASYNC, as cp.async): a kernel that reads its accumulators or overwrites
// an operand before waiting, or issues before its operands are in place, sees the difference here too.
// Every thread of a warpgroup must issue the same wgmma sequence (checked). fp32 products, in k order.
template <typename T, int N, bool TransB, bool TransA = false>
inline void mma(float (&d)[N / 2], uint64_t da, uint64_t db, bool accumulate) {
  static_assert(kIsMmaType<T> && N % 8 == 0 && N >= 8 && N <= 256, "wgmma: m64nNk16, bf16 or fp16");
  auto& t = glm5_sim::tctx;
  auto& cta = *t.cta;
  if (t.block_dim.x % 128 != 0) {
    std::fprintf(stderr, "cuda_sim: wgmma in a block of %u threads (whole warpgroups only)\n", t.block_dim.x);
    std::abort();
  }
  const glm5_sim::WgmmaOp op{d, da, db, N, TransA, TransB, accumulate, std::is_same_v<T, __nv_bfloat16>};
  const size_t wg = t.thread.x / 128;
  if (cta.wgmma_log.size() <= wg) cta.wgmma_log.resize(t.block_dim.x / 128);
  auto& log = cta.wgmma_log[wg];
  if (t.wg_issued == log.size()) {
    log.push_back(op);
  } else {
    const auto& o = log[t.wg_issued];
    if (o.da != da || o.db != db || o.n != N || o.trans_a != TransA || o.trans_b != TransB ||
        o.accumulate != accumulate || o.bf16 != op.bf16) {
      std::fprintf(stderr, "cuda_sim: thread %u issued wgmma #%zu unlike its warpgroup\n", t.thread.x, t.wg_issued);
      std::abort();
    }
  }
  ++t.wg_issued;
  if (t.wg_batch < 0) {
    t.wg_batch = glm5_sim::sched->eager() ? 1 : 0;
    if (t.wg_batch == 1) retire(0);  // the older batches first: wgmma completes in order
  }
  if (t.wg_batch == 1) run(op);
  else t.wg_open.push_back(op);
}

inline void fence() {}
inline void commit() {
  auto& t = glm5_sim::tctx;
  t.wg_groups.push_back(std::move(t.wg_open));  // empty for a batch that ran at issue
  t.wg_open.clear();
  t.wg_batch = -1;
}

inline float smem_value(uint32_t addr, bool bf16) {
  const unsigned char* base = glm5_sim::tctx.cta->smem_base();
  const auto& cta = *glm5_sim::tctx.cta;
  if (addr < kSmemWindow || addr + 2 > kSmemWindow + cta.smem.size() - 128) {
    std::fprintf(stderr, "cuda_sim: wgmma operand at shared address 0x%x outside the CTA's shared memory\n", addr);
    std::abort();
  }
  uint16_t bits;
  std::memcpy(&bits, base + (addr - kSmemWindow), 2);
  return bf16 ? glm5_sim::to_float<__nv_bfloat16>(bits) : glm5_sim::to_float<__half>(bits);
}

inline void run(const glm5_sim::WgmmaOp& op) {
  const gmma::Desc a = gmma::decode(op.da), b = gmma::decode(op.db);
  for (const auto* d : {&a, &b}) {
    if (d->layout != 1 || d->base_offset != 0) {
      std::fprintf(stderr, "cuda_sim: wgmma descriptor not 128-byte swizzled with base offset 0\n");
      std::abort();
    }
  }
  const int tw = int(glm5_sim::tctx.thread.x) % 128, w = tw / 32, g = tw % 32 / 4, c = tw % 4;
  float A[2][16];
  for (int r = 0; r < 2; ++r)
    for (int k = 0; k < 16; ++k) {
      const uint32_t m = 16 * w + g + 8 * r;
      A[r][k] = smem_value(op.trans_a ? gmma::mn_major_addr(a, k, m) : gmma::k_major_addr(a, m, k), op.bf16);
    }
  for (int i = 0; i < op.n / 8; ++i) {
    for (int e = 0; e < 4; ++e) {
      const int n = 8 * i + 2 * c + (e & 1);
      float v = op.accumulate ? op.d[4 * i + e] : 0.f;
      for (int k = 0; k < 16; ++k) {
        const uint32_t addr = op.trans_b ? gmma::mn_major_addr(b, k, n) : gmma::k_major_addr(b, n, k);
        v += A[e >> 1][k] * smem_value(addr, op.bf16);
      }
      op.d[4 * i + e] = v;
    }
  }
}

template <int n>
inline void wait() {
  retire(n);
}
template <int R>
inline void fence_operand(float (&)[R]) {}
inline void fence_proxy_async() {}

}  // namespace wgmma

}  // namespace glm5::cuda
