// Warp-level tensor-core building blocks (sm_80+ PTX, also the fast path on sm_90a without wgmma):
// mma.sync m16n8k16 with fp32 accumulators, ldmatrix fragment loads, cp.async 16-byte copies.
//
// Fragment layouts of mma.m16n8k16 (lane = 4 g + c, g = lane / 4 in [0, 8), c = lane % 4), each
// register holding two consecutive 16-bit elements along the reduction (k) or column index:
//   A (16 x 16, row-major): a0 = A[g][2c, 2c+1], a1 = A[g+8][2c, 2c+1], a2 = A[g][2c+8, 2c+9],
//                           a3 = A[g+8][2c+8, 2c+9]
//   B (16 x 8, "col"):      b0 = B[2c, 2c+1][g],  b1 = B[2c+8, 2c+9][g]
//   C (16 x 8, fp32):       c0, c1 = C[g][2c, 2c+1], c2, c3 = C[g+8][2c, 2c+1]
// ldmatrix (m8n8, 16-bit): lanes 8i..8i+7 give the row addresses of matrix i; lane L receives row
// L / 4, columns 2 (L % 4), +1 of each matrix (the A/B layouts above); with .trans it receives rows
// 2 (L % 4), +1 of column L / 4 instead, which turns a row-major [k][n] tile into B fragments.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace glm5::cuda {

template <typename T>
inline constexpr bool kIsMmaType = std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>;

// tests/cuda_sim defines GLM5_CUDA_SIM and its own (warp-emulated) versions of the PTX wrappers
// below, so the kernels that use them can run on a CPU.
#ifndef GLM5_CUDA_SIM
// d = a * b + d on tensor cores (bf16 or fp16 inputs, fp32 accumulators).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(kIsMmaType<T>, "mma_16816: bf16 or fp16 only");
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 matrices; `row` is this lane's row address (16-byte aligned, in shared memory).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

#endif  // GLM5_CUDA_SIM

// Two values of the compute type packed as one 32-bit register of T (round to nearest even); the
// first value goes to the low half (the lower column / k index of a fragment).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  static_assert(kIsMmaType<T>, "pack2: bf16 or fp16 only");
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

#ifndef GLM5_CUDA_SIM
// 16-byte global -> shared copy that bypasses L1; valid == false writes 16 zero bytes instead (the
// source is then not read, but must still be a legal address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most n of this thread's committed groups are still in flight.
template <int n>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(n));
}
#endif  // GLM5_CUDA_SIM

}  // namespace glm5::cuda
