// moe_unpermute and its backward on the GPU: one block per token, threads over the model width.
// Forward: out[n, d] = sum_j w[n, j] * y[row_map[n, j], d] in slot order (fp32, fp64 for fp64).
// Backward: dy[row_map[n, j]] = w[n, j] * grad[n] (dy is zero-filled by the host wrapper, so rows
// no slot points at stay zero) and dw[n, j] = grad[n] . y[row_map[n, j]], a block reduction in a
// fixed order (per-thread strided partial sums, then a shared-memory tree): deterministic.
#pragma once
#include "common.cuh"

namespace glm5::moe {

constexpr int kUnpermuteThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void moe_unpermute_kernel(UnpermuteParams<scalar_t, acc_t> p) {
  const int64_t n = blockIdx.x;
  const int32_t* rows = p.row_map + n * p.k;
  const acc_t* w = p.w + n * p.k;
  for (int64_t d = threadIdx.x; d < p.D; d += blockDim.x) {
    acc_t acc = 0;
    for (int j = 0; j < p.k; ++j) {
      const int32_t r = rows[j];
      if (r < 0 || r >= p.M) continue;  // dropped slot (out-of-range rows are rejected or skipped)
      acc += w[j] * to_acc(p.y[static_cast<int64_t>(r) * p.D + d]);
    }
    p.out[n * p.D + d] = from_acc<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void moe_unpermute_bwd_kernel(UnpermuteParams<scalar_t, acc_t> p) {
  __shared__ acc_t red[kUnpermuteThreads];
  const int64_t n = blockIdx.x;
  const scalar_t* g = p.grad + n * p.D;
  for (int j = 0; j < p.k; ++j) {
    const int32_t r = p.row_map[n * p.k + j];
    if (r < 0 || r >= p.M) {  // uniform across the block
      if (threadIdx.x == 0) p.dw[n * p.k + j] = acc_t(0);
      continue;
    }
    const acc_t wj = p.w[n * p.k + j];
    const scalar_t* yr = p.y + static_cast<int64_t>(r) * p.D;
    scalar_t* dyr = p.out + static_cast<int64_t>(r) * p.D;
    acc_t part = 0;
    for (int64_t d = threadIdx.x; d < p.D; d += blockDim.x) {
      const acc_t gd = to_acc(g[d]);
      part += gd * to_acc(yr[d]);
      dyr[d] = from_acc<scalar_t>(wj * gd);
    }
    red[threadIdx.x] = part;
    __syncthreads();
    for (int s = kUnpermuteThreads / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0) p.dw[n * p.k + j] = red[0];
    __syncthreads();  // red is reused by the next slot
  }
}

}  // namespace glm5::moe
