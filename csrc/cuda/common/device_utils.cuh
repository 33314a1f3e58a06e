// Small device helpers shared by the glm5 CUDA kernels (no ATen): dtype conversions to and from the
// compute type, exp/log for float and double, deterministic warp reductions (fixed butterfly order).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace glm5::cuda {

template <typename ct, typename T>
__device__ __forceinline__ ct to_ct(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return static_cast<ct>(__bfloat162float(v));
  } else if constexpr (std::is_same_v<T, __half>) {
    return static_cast<ct>(__half2float(v));
  } else {
    return static_cast<ct>(v);
  }
}

// Round-to-nearest-even conversion of a compute value to the storage type.
template <typename T, typename ct>
__device__ __forceinline__ T from_ct(ct v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(v));
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }

// The CTA's dynamic shared memory (a function, so tests/cuda_sim can supply its own buffer).
#ifndef GLM5_CUDA_SIM
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(128) unsigned char glm5_dynamic_smem[];
  return glm5_dynamic_smem;
}
#endif

// An odd row stride for shared-memory tiles of 4- or 8-byte elements: lanes reading one column of
// consecutive rows hit distinct banks. (Host code uses it too: launch plans, strides in params.)
__host__ __device__ constexpr int odd_stride(int n) { return n % 2 == 0 ? n + 1 : n; }

// First position in the ascending a[0, n) whose value is >= v (the start of v's run after a sort).
__device__ inline int64_t lower_bound_u32(const uint32_t* a, int64_t n, uint32_t v) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (a[mid] < v) lo = mid + 1; else hi = mid;
  }
  return lo;
}

template <typename ct>
__device__ __forceinline__ ct neg_inf() {
  return -static_cast<ct>(INFINITY);
}

// Butterfly reductions over a full warp: every lane ends with the same value, the order is fixed.
template <typename ct>
__device__ __forceinline__ ct warp_sum(ct v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename ct>
__device__ __forceinline__ ct warp_max(ct v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace glm5::cuda
