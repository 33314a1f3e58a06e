// Launch plans of the sparse MLA CUDA kernels: pure functions of the shapes and the device's opt-in
// shared-memory limit (no ATen, no CUDA runtime), shared by the host launchers (api.cu, fwd_tc.cu) and
// the CPU simulator's bindings (tests/cuda_sim), so the simulated launch is the real one by construction.
// The shared-memory formulas stay next to the kernels' layouts (kernels.cuh, fwd_tc_kernel.cuh); the
// plans take them as arguments.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../common/device_utils.cuh"  // odd_stride

namespace glm5::cuda {

// Tiling of the CUDA-core (SIMT) kernels: hb heads x bk keys per step, odd row strides ld (D) and
// ldv (d_v, backward only), and the dynamic shared memory it needs (may exceed the limit: the
// caller reports that).
struct SparseMlaSimtPlan {
  int hb, bk, ld, ldv;
  size_t smem;
};

// Forward: the largest tiling that fits, from 16 heads x 32 keys (~145 KB in fp32 at GLM-5 sizes);
// bk halves down to 8 first, then hb down to 1. smem(hb, bk, ld, dv) is sparse_mla_fwd_smem<ct>.
template <typename SmemFn>
SparseMlaSimtPlan sparse_mla_fwd_plan(int H, int D, int dv, size_t limit, SmemFn&& smem) {
  SparseMlaSimtPlan s{std::min(H, 16), 32, odd_stride(D), 0, 0};
  while (smem(s.hb, s.bk, s.ld, dv) > limit && (s.bk > 8 || s.hb > 1)) {
    if (s.bk > 8) s.bk /= 2;
    else s.hb = std::max(1, s.hb / 2);
  }
  s.smem = smem(s.hb, s.bk, s.ld, dv);
  return s;
}

// Backward: likewise from 16 heads x 16 keys, bk down to 4 first, then hb.
// smem(H, hb, bk, ld, ldv, D) is sparse_mla_bwd_smem<ct>.
template <typename SmemFn>
SparseMlaSimtPlan sparse_mla_bwd_plan(int H, int D, int dv, size_t limit, SmemFn&& smem) {
  SparseMlaSimtPlan s{std::min(H, 16), 16, odd_stride(D), odd_stride(dv), 0};
  while (smem(H, s.hb, s.bk, s.ld, s.ldv, D) > limit && (s.bk > 4 || s.hb > 1)) {
    if (s.bk > 4) s.bk /= 2;
    else s.hb = std::max(1, s.hb / 2);
  }
  s.smem = smem(H, s.hb, s.bk, s.ld, s.ldv, D);
  return s;
}

// The backward's default budget of per-chunk key-gradient rows ([chunk * K, D] in the compute dtype).
inline constexpr int64_t kSparseMlaBwdChunkBytes = int64_t(1) << 30;

// Queries per backward chunk: as many as the budget holds, at least 1, at most T (K, D, esize > 0).
inline int64_t sparse_mla_bwd_chunk(int64_t budget_bytes, int64_t T, int64_t K, int64_t D, int64_t esize) {
  return std::clamp<int64_t>(std::max<int64_t>(budget_bytes, 1) / (K * D * esize), 1, T);
}

// Tensor-core forward: MT m-tiles of 16 heads per CTA (64 * MT threads), as few as cover H, at most 4.
inline int sparse_mla_fwd_tc_mt(int64_t H) { return int(std::min<int64_t>(4, (H + 15) / 16)); }

// Calls f(std::integral_constant<int, MT>{}) for the runtime m-tile count mt (1..4; anything else
// runs as 4) and returns its result: picks the kernel instantiation and its shared-memory size.
template <typename F>
decltype(auto) sparse_mla_with_mt(int mt, F&& f) {
  switch (mt) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}

// Warpgroup-MMA forward (fwd_wgmma_kernel.cuh): the O columns per warpgroup (d_v / 2) when the shapes
// fit it, else 0: D % 64 == 0, d_v in {128, 512} (the instantiated widths), d_v <= D, and its shared
// memory smem(D) (sparse_mla_wgmma::smem_bytes) within the limit.
template <typename SmemFn>
int sparse_mla_fwd_wgmma_nv(int64_t D, int64_t dv, size_t limit, SmemFn&& smem) {
  if (D <= 0 || D % 64 != 0 || dv > D || (dv != 128 && dv != 512)) return 0;
  return smem(int(D)) <= limit ? int(dv / 2) : 0;
}

// Calls f(std::integral_constant<int, NV>{}) for nv = 64 or 256 (the instantiations).
template <typename F>
decltype(auto) sparse_mla_with_nv(int nv, F&& f) {
  if (nv == 64) return f(std::integral_constant<int, 64>{});
  return f(std::integral_constant<int, 256>{});
}

// Warpgroup-MMA backward (bwd_wgmma_kernel.cuh): D / 64 when the shapes fit it, else 0: D 192 or 576
// (the instantiations), d_v % 64 == 0 with 0 < d_v <= D, and its shared memory smem(D, d_v)
// (sparse_mla_wgmma_bwd::Layout(D, d_v).bytes) within the limit.
template <typename SmemFn>
int sparse_mla_bwd_wgmma_ncb(int64_t D, int64_t dv, size_t limit, SmemFn&& smem) {
  if ((D != 192 && D != 576) || dv <= 0 || dv % 64 != 0 || dv > D) return 0;
  return smem(int(D), int(dv)) <= limit ? int(D / 64) : 0;
}

// Calls f(std::integral_constant<int, NCB>{}) for ncb = 3 or 9 (the instantiations).
template <typename F>
decltype(auto) sparse_mla_with_ncb(int ncb, F&& f) {
  if (ncb == 3) return f(std::integral_constant<int, 3>{});
  return f(std::integral_constant<int, 9>{});
}

}  // namespace glm5::cuda
