// Argument and value checks of the MoE ops, shared by the CPU (csrc/cpu/moe.cpp) and CUDA
// (csrc/cuda/moe/api.cu) host wrappers so both raise the same errors. Value checks read host memory:
// the CUDA wrapper copies to the host first, and only when GLM5_CUDA_VALIDATE asks for it.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "glm5/checks.h"

namespace glm5::moe_checks {

// moe_route: logits [N, E] float, bias [E] float or none, topk / group arguments consistent with E.
inline void route_args(const at::Tensor& logits, const std::optional<at::Tensor>& bias, int64_t topk,
                       int64_t n_group, int64_t topk_group) {
  GLM5_CHECK_NDIM(logits, 2);
  GLM5_CHECK_FLOAT(logits);
  const int64_t E = logits.size(1);
  TORCH_CHECK_VALUE(1 <= topk && topk <= E, "topk must be in [1, num_experts=", E, "], got ", topk);
  TORCH_CHECK_VALUE(n_group >= 1 && E % n_group == 0, "n_group must be a positive divisor of num_experts=", E,
                    ", got ", n_group);
  TORCH_CHECK_VALUE(1 <= topk_group && topk_group <= n_group, "topk_group must be in [1, n_group=", n_group, "], got ",
                    topk_group);
  TORCH_CHECK_VALUE(topk_group * (E / n_group) >= topk, "topk_group=", topk_group, " groups of ", E / n_group,
                    " experts hold fewer than topk=", topk, " experts");
  if (bias.has_value()) {
    [&](const at::Tensor& bias) {  // the checks name the argument "bias"
      GLM5_CHECK_SAME_DEVICE(bias, logits);
      GLM5_CHECK_NDIM(bias, 1);
      GLM5_CHECK_SIZE(bias, 0, E);
      GLM5_CHECK_FLOAT(bias);
    }(*bias);
  }
}

// moe_unpermute (and its backward): y_sorted [M, D] float, row_map [N, k] int32, topk_w [N, k] float.
inline void unpermute_args(const at::Tensor& y_sorted, const at::Tensor& row_map, const at::Tensor& topk_w,
                           c10::DeviceType device) {
  GLM5_CHECK_DEVICE_TYPE(y_sorted, device);
  GLM5_CHECK_NDIM(y_sorted, 2);
  GLM5_CHECK_FLOAT(y_sorted);
  GLM5_CHECK_SAME_DEVICE(row_map, y_sorted);
  GLM5_CHECK_NDIM(row_map, 2);
  GLM5_CHECK_DTYPE(row_map, at::kInt);
  GLM5_CHECK_SAME_DEVICE(topk_w, y_sorted);
  GLM5_CHECK_FLOAT(topk_w);
  TORCH_CHECK(topk_w.sizes() == row_map.sizes(), "topk_w must have row_map's shape ", row_map.sizes(), ", got ",
              topk_w.sizes());
}

// offsets: an int64 tensor of shape [E + 1] on `like`'s device.
inline void offsets_shape(const at::Tensor& offsets, const at::Tensor& like, int64_t E) {
  GLM5_CHECK_SAME_DEVICE(offsets, like);
  TORCH_CHECK_VALUE(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.size(0) == E + 1,
                    "offsets must be an int64 tensor of shape (", E + 1, ",), got ", offsets.scalar_type(), " ",
                    offsets.sizes());
}

// offsets values (host memory): non-decreasing, 0 <= off[0], off[E] <= M.
inline void offsets_values(const int64_t* off, int64_t E, int64_t M) {
  TORCH_CHECK_VALUE(off[0] >= 0 && off[E] <= M, "offsets must satisfy 0 <= offsets[0] and offsets[E] <= M=", M,
                    ", got offsets[0]=", off[0], ", offsets[E]=", off[E]);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK_VALUE(off[e] <= off[e + 1], "offsets must be non-decreasing, got offsets[", e, "]=", off[e],
                      " > offsets[", e + 1, "]=", off[e + 1]);
  }
}

// topk_idx values (a contiguous host tensor [N, k] int32): -1 (dropped) or in [0, E).
inline void expert_idx_values(const at::Tensor& idx, int64_t E) {
  const int32_t* p = idx.data_ptr<int32_t>();
  const int64_t n = idx.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(p[i] >= -1 && p[i] < E, "topk_idx out of range: expert indices must be -1 (dropped) or in [0, ",
                      E, "), got topk_idx[", i / idx.size(1), ", ", i % idx.size(1), "] = ", p[i]);
  }
}

// row_map values (a contiguous host tensor [N, k] int32): -1 or in [0, M), no row twice.
// Returns the "row is referenced" mask.
inline std::vector<uint8_t> row_map_values(const at::Tensor& row_map, int64_t M) {
  std::vector<uint8_t> seen(M, 0);
  const int32_t* p = row_map.data_ptr<int32_t>();
  const int64_t n = row_map.numel(), k = row_map.size(1);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t r = p[i];
    TORCH_CHECK_INDEX(r >= -1 && r < M, "row_map out of range: rows must be -1 or in [0, ", M, "), got row_map[", i / k,
                      ", ", i % k, "] = ", r);
    if (r < 0) continue;
    TORCH_CHECK_VALUE(!seen[r], "row_map repeats row ", r, ": each row of y_sorted belongs to one (token, slot)");
    seen[r] = 1;
  }
  return seen;
}

}  // namespace glm5::moe_checks
