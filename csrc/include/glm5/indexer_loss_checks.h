// Argument checks of indexer_kl_loss_fwd / indexer_kl_loss_bwd, shared by the CPU
// (csrc/cpu/indexer_loss.cpp) and CUDA (csrc/cuda/indexer_loss/api.cu) host wrappers so both raise the
// same errors. The VALUES of ks/ke/indices are checked by the CPU path only (on the CUDA path that
// would sync the stream; its kernels clamp instead).
#pragma once
#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "glm5/checks.h"

namespace glm5::indexer_loss_checks {

struct Dims {
  int64_t T, S, HI, DI, H, D, K;  // K = indices.size(1), 0 in dense mode
};

// Every tensor a `device`-type tensor on q_idx's device; q_idx [T,HI,DI], k_idx [S,DI], w [T,HI] of one float
// dtype; q [T,H,D], kv [S,D] of one float dtype; lse [T,H] fp32/fp64; ks, ke [T] int32; indices [T,K] int32
// or absent; finite sm_scale; S fits int32. Each error names the schema argument it rejects.
inline Dims inputs(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w, const at::Tensor& q,
                   const at::Tensor& kv, const at::Tensor& lse, const at::Tensor& ks, const at::Tensor& ke,
                   double sm_scale, const std::optional<at::Tensor>& indices, c10::DeviceType device) {
  GLM5_CHECK_DEVICE_TYPE(q_idx, device);
  GLM5_CHECK_DEVICE_TYPE(k_idx, device);
  GLM5_CHECK_DEVICE_TYPE(w, device);
  GLM5_CHECK_DEVICE_TYPE(q, device);
  GLM5_CHECK_DEVICE_TYPE(kv, device);
  GLM5_CHECK_DEVICE_TYPE(lse, device);
  GLM5_CHECK_DEVICE_TYPE(ks, device);
  GLM5_CHECK_DEVICE_TYPE(ke, device);
  GLM5_CHECK_SAME_DEVICE(k_idx, q_idx);  // (several GPUs: one device for all)
  GLM5_CHECK_SAME_DEVICE(w, q_idx);
  GLM5_CHECK_SAME_DEVICE(q, q_idx);
  GLM5_CHECK_SAME_DEVICE(kv, q_idx);
  GLM5_CHECK_SAME_DEVICE(lse, q_idx);
  GLM5_CHECK_SAME_DEVICE(ks, q_idx);
  GLM5_CHECK_SAME_DEVICE(ke, q_idx);
  if (indices.has_value()) {  // spelled out so the messages say "indices"
    const at::Tensor& ix = *indices;
    TORCH_CHECK(ix.device().type() == device, "indices must be a ", c10::DeviceTypeName(device), " tensor, got ",
                ix.device());
    TORCH_CHECK(ix.device() == q_idx.device(), "indices is on ", ix.device(), " but q_idx is on ", q_idx.device());
    TORCH_CHECK(ix.dim() == 2, "indices must have 2 dimensions, got ", ix.dim(), " (shape ", ix.sizes(), ")");
    TORCH_CHECK(ix.scalar_type() == at::kInt, "indices must be Int, got ", ix.scalar_type());
    TORCH_CHECK(ix.size(0) == q_idx.size(0), "indices.size(0) must be ", q_idx.size(0), ", got ", ix.size(0),
                " (shape ", ix.sizes(), ")");
  }
  GLM5_CHECK_NDIM(q_idx, 3);
  GLM5_CHECK_NDIM(k_idx, 2);
  GLM5_CHECK_NDIM(w, 2);
  GLM5_CHECK_NDIM(q, 3);
  GLM5_CHECK_NDIM(kv, 2);
  GLM5_CHECK_NDIM(lse, 2);
  GLM5_CHECK_NDIM(ks, 1);
  GLM5_CHECK_NDIM(ke, 1);
  GLM5_CHECK_FLOAT(q_idx);
  GLM5_CHECK_SAME_DTYPE(k_idx, q_idx);
  GLM5_CHECK_SAME_DTYPE(w, q_idx);
  GLM5_CHECK_FLOAT(q);
  GLM5_CHECK_SAME_DTYPE(kv, q);
  TORCH_CHECK(lse.scalar_type() == at::kFloat || lse.scalar_type() == at::kDouble,
              "lse must be float32 or float64, got ", lse.scalar_type());
  GLM5_CHECK_DTYPE(ks, at::kInt);
  GLM5_CHECK_DTYPE(ke, at::kInt);
  const int64_t T = q_idx.size(0), HI = q_idx.size(1), DI = q_idx.size(2);
  const int64_t S = k_idx.size(0), H = q.size(1), D = q.size(2);
  GLM5_CHECK_SIZE(k_idx, 1, DI);
  GLM5_CHECK_SIZE(w, 0, T);
  GLM5_CHECK_SIZE(w, 1, HI);
  GLM5_CHECK_SIZE(q, 0, T);
  GLM5_CHECK_SIZE(kv, 0, S);
  GLM5_CHECK_SIZE(kv, 1, D);
  GLM5_CHECK_SIZE(lse, 0, T);
  GLM5_CHECK_SIZE(lse, 1, H);
  GLM5_CHECK_SIZE(ks, 0, T);
  GLM5_CHECK_SIZE(ke, 0, T);
  TORCH_CHECK(std::isfinite(sm_scale), "sm_scale must be finite, got ", sm_scale);
  glm5::checked_int32(S, "S (k_idx.size(0))");
  const int64_t K = indices.has_value() ? indices->size(1) : 0;
  return {T, S, HI, DI, H, D, K};
}

// The backward's upstream gradient: grad [T] float on q_idx's device.
inline void grad_arg(const at::Tensor& grad, const at::Tensor& q_idx, int64_t T, c10::DeviceType device) {
  GLM5_CHECK_DEVICE_TYPE(grad, device);
  GLM5_CHECK_SAME_DEVICE(grad, q_idx);
  GLM5_CHECK_NDIM(grad, 1);
  GLM5_CHECK_FLOAT(grad);
  GLM5_CHECK_SIZE(grad, 0, T);
}

}  // namespace glm5::indexer_loss_checks
