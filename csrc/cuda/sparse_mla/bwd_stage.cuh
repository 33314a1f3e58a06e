// Per-head staging shared by the tensor-core sparse MLA backward kernels (bwd_tc_kernel.cuh,
// bwd_wgmma_kernel.cuh). Device code only.
#pragma once
#include <cmath>

#include "../common/device_utils.cuh"

namespace glm5::cuda {

// lse and Delta = rowsum(dO * O) (fp32, lanes over d_v, a fixed butterfly) of the group's heads h0 + h,
// h < nrows, into shared memory; padded heads (h >= hb) get lse = +inf (so P = dS = 0) and Delta = 0.
// dog / og / lseg point at query t's rows; one warp per head, warps strided by nwarps.
template <typename T>
__device__ inline void stage_lse_delta(const T* dog, const T* og, const float* lseg, int h0, int hb, int nrows, int dv,
                                       float* lse_s, float* delta_s, int warp, int lane, int nwarps) {
  for (int h = warp; h < nrows; h += nwarps) {  // h is warp-uniform
    float v = 0.f;
    if (h < hb) {
      const T* a = dog + int64_t(h0 + h) * dv;
      const T* b = og + int64_t(h0 + h) * dv;
      for (int d = lane; d < dv; d += 32) v += to_ct<float>(a[d]) * to_ct<float>(b[d]);
      v = warp_sum(v);
    }
    if (lane == 0) {
      delta_s[h] = v;
      lse_s[h] = h < hb ? lseg[h0 + h] : INFINITY;
    }
  }
}

}  // namespace glm5::cuda
