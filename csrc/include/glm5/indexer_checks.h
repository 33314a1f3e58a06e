// Argument checks of the lightning-indexer ops (indexer_logits, its backward, indexer_topk), shared by
// the CPU (csrc/cpu/indexer.cpp) and CUDA (csrc/cuda/lightning_indexer/api.cu) host wrappers so both
// raise the same errors. ks/ke values are checked on the host by the CPU path only (see ranges_values).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "glm5/checks.h"

namespace glm5::indexer_checks {

// q [T,HI,DI] float on `device`, k [S,DI] and w [T,HI] of q's dtype, ks/ke [T] int32; S fits int32.
inline void inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, const at::Tensor& ks,
                   const at::Tensor& ke, c10::DeviceType device) {
  GLM5_CHECK_DEVICE_TYPE(q, device);
  GLM5_CHECK_SAME_DEVICE(k, q);
  GLM5_CHECK_SAME_DEVICE(w, q);
  GLM5_CHECK_NDIM(q, 3);
  GLM5_CHECK_NDIM(k, 2);
  GLM5_CHECK_NDIM(w, 2);
  GLM5_CHECK_FLOAT(q);
  GLM5_CHECK_SAME_DTYPE(k, q);
  GLM5_CHECK_SAME_DTYPE(w, q);
  const int64_t T = q.size(0), HI = q.size(1), DI = q.size(2), S = k.size(0);
  TORCH_CHECK(k.size(1) == DI, "k.size(1) must equal q.size(2) (the indexer head dim DI=", DI, "), got k of shape ",
              k.sizes());
  TORCH_CHECK(w.size(0) == T && w.size(1) == HI, "w must have shape (T, HI) = (", T, ", ", HI, "), got ", w.sizes());
  glm5::checked_int32(S, "k.size(0) (S)");  // key indices are returned as int32
  GLM5_CHECK_SAME_DEVICE(ks, q);
  GLM5_CHECK_SAME_DEVICE(ke, q);
  TORCH_CHECK_VALUE(ks.scalar_type() == at::kInt && ks.dim() == 1 && ks.size(0) == T,
                    "ks must be an int32 tensor of shape (", T, ",), got ", ks.scalar_type(), " ", ks.sizes());
  TORCH_CHECK_VALUE(ke.scalar_type() == at::kInt && ke.dim() == 1 && ke.size(0) == T,
                    "ke must be an int32 tensor of shape (", T, ",), got ", ke.scalar_type(), " ", ke.sizes());
}

// ks/ke values (host memory): 0 <= ks[t] <= ke[t] <= S (as glm5.ops.reference.check_ranges).
inline void ranges_values(const int32_t* ksp, const int32_t* kep, int64_t T, int64_t S) {
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK_VALUE(0 <= ksp[t] && ksp[t] <= kep[t] && kep[t] <= S, "ks/ke must satisfy 0 <= ks <= ke <= S=", S,
                      ", got ks[", t, "]=", ksp[t], ", ke[", t, "]=", kep[t]);
  }
}

}  // namespace glm5::indexer_checks
