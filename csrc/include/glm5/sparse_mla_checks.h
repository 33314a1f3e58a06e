// Argument checks of sparse_mla_fwd / sparse_mla_bwd, shared by the CPU (csrc/cpu/sparse_mla.cpp) and
// CUDA (csrc/cuda/sparse_mla/api.cu) host wrappers so both raise the same errors.
#pragma once
#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>

#include "glm5/checks.h"

namespace glm5::sparse_mla_checks {

struct Dims {
  int64_t T, H, D, S, K, dv;
};

// q [T,H,D] float on `device`, kv [S,D] same dtype, indices [T,K] int32, 0 < d_v <= D, finite sm_scale.
inline Dims fwd_args(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& indices, double sm_scale,
                     int64_t d_v, c10::DeviceType device) {
  GLM5_CHECK_DEVICE_TYPE(q, device);
  GLM5_CHECK_SAME_DEVICE(kv, q);
  GLM5_CHECK_SAME_DEVICE(indices, q);
  GLM5_CHECK_FLOAT(q);
  GLM5_CHECK_SAME_DTYPE(kv, q);
  GLM5_CHECK_DTYPE(indices, at::kInt);
  GLM5_CHECK_NDIM(q, 3);
  GLM5_CHECK_NDIM(kv, 2);
  GLM5_CHECK_NDIM(indices, 2);
  Dims dm{q.size(0), q.size(1), q.size(2), kv.size(0), indices.size(1), d_v};
  GLM5_CHECK_SIZE(kv, 1, dm.D);
  GLM5_CHECK_SIZE(indices, 0, dm.T);
  TORCH_CHECK(d_v > 0 && d_v <= dm.D, "d_v must be in [1, D_qk = ", dm.D, "], got ", d_v);
  TORCH_CHECK(std::isfinite(sm_scale), "sm_scale must be finite, got ", sm_scale);
  return dm;
}

// The backward's extra inputs: grad_out and out [T,H,d_v] in q's dtype, lse [T,H] in the accumulation dtype.
inline void bwd_args(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& q,
                     const Dims& dm, at::ScalarType lse_dtype) {
  GLM5_CHECK_SAME_DEVICE(grad_out, q);
  GLM5_CHECK_SAME_DEVICE(out, q);
  GLM5_CHECK_SAME_DEVICE(lse, q);
  GLM5_CHECK_SAME_DTYPE(grad_out, q);
  GLM5_CHECK_SAME_DTYPE(out, q);
  GLM5_CHECK_DTYPE(lse, lse_dtype);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({dm.T, dm.H, dm.dv}), "grad_out must have shape [", dm.T, ", ",
              dm.H, ", ", dm.dv, "], got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == at::IntArrayRef({dm.T, dm.H, dm.dv}), "out must have shape [", dm.T, ", ", dm.H, ", ",
              dm.dv, "], got ", out.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({dm.T, dm.H}), "lse must have shape [", dm.T, ", ", dm.H, "], got ",
              lse.sizes());
}

}  // namespace glm5::sparse_mla_checks
