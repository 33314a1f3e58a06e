// Launch plans of the MoE CUDA kernels: pure functions of the shapes and shared-memory bounds (no ATen,
// no CUDA runtime), shared by the host launchers (api.cu) and the CPU simulator's binding
// (tests/cuda_sim/sim_moe.cpp), so the simulated launch is the real one by construction.
#pragma once
#include <algorithm>
#include <cstdint>

#include "params.h"

namespace glm5::moe {

// Blocks of a grid-stride launch over work_items, per_block items a block, at least 1, at most cap.
inline int moe_launch_blocks(int64_t work_items, int64_t per_block, int64_t cap = int64_t{1} << 16) {
  return static_cast<int>(std::max<int64_t>(1, std::min((work_items + per_block - 1) / per_block, cap)));
}

// moe_route: warps (tokens) per block and the dynamic shared memory of the group scores. 4 warps,
// or 1 when 4 warps' scores exceed smem_limit (48 KiB on a GPU: no opt-in needed); smem may still
// exceed it, which the caller reports.
struct MoeRoutePlan {
  int warps;
  int64_t smem;
};
inline constexpr int64_t kMoeRouteSmemLimit = 48 * 1024;
inline MoeRoutePlan moe_route_plan(int64_t n_group, int64_t acc_bytes, int64_t smem_limit) {
  MoeRoutePlan r{4, n_group > 1 ? 4 * n_group * acc_bytes : 0};
  if (r.smem > smem_limit) r = {1, n_group * acc_bytes};
  return r;
}

// moe_permute: each chunk's E int32 counters live in shared memory when they fit counter_smem_limit
// (32 KiB on a GPU), else in the global chunk_counts buffer (smem 0).
struct MoePermutePlan {
  bool use_smem;
  size_t smem;
};
inline constexpr int64_t kMoePermuteCounterSmemLimit = 32 * 1024;
inline MoePermutePlan moe_permute_plan(int64_t E, int64_t counter_smem_limit) {
  const int64_t counter_bytes = E * 4;
  const bool use_smem = counter_bytes <= counter_smem_limit;
  return {use_smem, use_smem ? static_cast<size_t>(counter_bytes) : 0};
}

// moe_permute's row copy: the widest access (16, 8, 4, 2 or 1 bytes) that divides the row size and
// both base addresses.
inline int moe_row_copy_width(int64_t row_bytes, uintptr_t src, uintptr_t dst) {
  for (int a : {16, 8, 4, 2}) {
    if (row_bytes % a == 0 && src % a == 0 && dst % a == 0) return a;
  }
  return 1;
}

}  // namespace glm5::moe
