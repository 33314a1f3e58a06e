// Warpgroup tensor-core MMA (sm_90a wgmma.mma_async) for the kernels: D (64 x N, fp32 registers) +=
// A (64 x 16) * B (16 x N), both operands in shared memory behind the descriptors of gmma_desc.h. The
// instructions are CuTe's (cute/arch/mma_sm90_gmma.hpp); this header picks the shape and hands over the
// N / 2 accumulator registers.
//
// Accumulator layout (like mma.m16n8k16's C, warp w of the warpgroup owning rows 16 w .. 16 w + 15):
// with g = lane / 4 and c = lane % 4, d[4 i + e] = D[16 w + g + 8 (e / 2)][8 i + 2 c + e % 2], i < N / 8.
//
// Protocol (PTX ISA): fence() before the first mma of a batch whose registers other instructions have
// touched; commit() closes the batch; wait<n>() blocks until at most n batches are in flight, and only
// then may the accumulators be read or the operands' shared memory be overwritten. Shared memory that
// ordinary stores (or cp.async) wrote is seen by wgmma only after fence_proxy_async() and a barrier.
//
// tests/cuda_sim defines GLM5_CUDA_SIM and its own versions (the mma runs at wait time, from shared
// memory as the descriptors address it), so the kernels that use this header run on a CPU.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <utility>

#include "gmma_desc.h"
#include "mma.cuh"

#ifndef GLM5_CUDA_SIM
#include <cute/arch/mma_sm90_gmma.hpp>

namespace glm5::cuda::wgmma {

namespace detail {
using cute::SM90::GMMA::Major;

template <typename T, int N, Major MA, Major MB>
struct Atom;
#define GLM5_WGMMA_ATOM(N)                                                 \
  template <Major MA, Major MB>                                            \
  struct Atom<__nv_bfloat16, N, MA, MB> {                                  \
    using type = cute::SM90::GMMA::MMA_64x##N##x16_F32BF16BF16_SS<MA, MB>; \
  };                                                                       \
  template <Major MA, Major MB>                                            \
  struct Atom<__half, N, MA, MB> {                                         \
    using type = cute::SM90::GMMA::MMA_64x##N##x16_F32F16F16_SS<MA, MB>;   \
  };
GLM5_WGMMA_ATOM(16)
GLM5_WGMMA_ATOM(32)
GLM5_WGMMA_ATOM(64)
GLM5_WGMMA_ATOM(128)
GLM5_WGMMA_ATOM(192)
GLM5_WGMMA_ATOM(256)
#undef GLM5_WGMMA_ATOM

template <typename Op, int R, size_t... I>
__device__ __forceinline__ void fma(float (&d)[R], uint64_t da, uint64_t db, bool accumulate,
                                    std::index_sequence<I...>) {
  Op::fma(da, db, d[I]..., accumulate ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
}
}  // namespace detail

// d (+)= A B: B K-major (TransB false: B^T's N rows) or MN-major (TransB true: B's 16 k rows) at db; A
// K-major (its 64 rows) or MN-major (TransA true: A^T's 16 rows of 64) at da; accumulate false ignores
// d's old values.
template <typename T, int N, bool TransB, bool TransA = false>
__device__ __forceinline__ void mma(float (&d)[N / 2], uint64_t da, uint64_t db, bool accumulate) {
  static_assert(kIsMmaType<T>, "wgmma: bf16 or fp16 only");
  using Op = typename detail::Atom<T, N, TransA ? detail::Major::MN : detail::Major::K,
                                   TransB ? detail::Major::MN : detail::Major::K>::type;
  detail::fma<Op>(d, da, db, accumulate, std::make_index_sequence<N / 2>{});
}

__device__ __forceinline__ void fence() { cute::warpgroup_arrive(); }
__device__ __forceinline__ void commit() { cute::warpgroup_commit_batch(); }
template <int n>
__device__ __forceinline__ void wait() {
  cute::warpgroup_wait<n>();
}
// Keeps the compiler from moving accesses to these registers across the asynchronous mma.
template <int R>
__device__ __forceinline__ void fence_operand(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) cute::warpgroup_fence_operand(d[i]);
}
// Orders this thread's earlier shared-memory writes (stores, cp.async after its wait) before later
// asynchronous-proxy reads (wgmma operands).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

}  // namespace glm5::cuda::wgmma
#endif  // GLM5_CUDA_SIM
