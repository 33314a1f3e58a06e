// CUTLASS 3 Hopper k-grouped GEMM, bf16: the MoE weight gradient dw[e] = dy[rows of e]^T @ x[rows of e]
// (see grouped_gemm_cutlass.h). The reduction runs over expert e's rows, so each group's CUTLASS K is
// its row count; both operands are read in place through layouts that need no transpose copy.
#ifndef GLM5_DISABLE_CUTLASS_GROUPED_GEMM
#include "grouped_gemm_cutlass.h"

namespace glm5::moe {
namespace cutlass_gemm {

// The problem arrays (WgradProblem), their fill kernel and zero_empty_experts_kernel live in
// grouped_gemm_cutlass_args.cuh (run on the CPU simulator by tests/cuda_sim).
using WgradGemm = GroupedGemmBf16<WgradProblem::LayoutA, WgradProblem::LayoutB>;

}  // namespace cutlass_gemm

// dy [M, N] and x [M, K] contiguous bf16, dw [E, N, K] contiguous bf16, start/end [E] int64 on the
// device (clamped into [0, M], non-decreasing). Returns false, having launched nothing, when the
// problem does not meet the TMA alignment rules (N and K multiples of 8, 16-byte aligned bases) or
// the GPU is not sm_90: the caller then takes the SIMT kernel. On true every dw[e] is written.
bool grouped_gemm_wgrad_bf16_cutlass(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& start,
                                     const at::Tensor& end, at::Tensor& dw) {
  using namespace cutlass_gemm;
  using G = WgradGemm;
  using Element = G::Element;
  const int64_t E = dw.size(0), M = dy.size(0), N = dy.size(1), K = x.size(1);
  // Rows of one expert are a CUTLASS int; with N % 8 == 0 and K % 8 == 0 every group's A, B and D base
  // (dy + s*N, x + s*K, dw + e*N*K elements) stays 16-byte aligned for any row offset s.
  if (!on_sm90() || E == 0 || N == 0 || K == 0 || N % G::kAlign || K % G::kAlign || M > INT32_MAX ||
      N > INT32_MAX || K > INT32_MAX || !aligned16(dy.data_ptr()) || !aligned16(x.data_ptr()) ||
      !aligned16(dw.data_ptr())) {
    return false;
  }
  const Strides<WgradProblem> strides = wgrad_strides(N, K);
  const auto* dyp = reinterpret_cast<const Element*>(dy.data_ptr());
  const auto* xp = reinterpret_cast<const Element*>(x.data_ptr());
  auto* dwp = reinterpret_cast<Element*>(dw.data_ptr());
  const int64_t* sp = start.data_ptr<int64_t>();
  const int64_t* ep = end.data_ptr<int64_t>();
  const int32_t e32 = static_cast<int32_t>(E), n32 = static_cast<int32_t>(N), k32 = static_cast<int32_t>(K);
  return run_grouped<G>("grouped_gemm_wgrad", E, dy, [&](const G::Arrays& a, cudaStream_t stream) {
    fill_wgrad_arrays_kernel<WgradProblem><<<fill_blocks(E), kFillThreads, 0, stream>>>(a, sp, ep, e32, dyp, xp, dwp,
                                                                                         n32, k32, strides);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Disjoint from everything the GEMM writes (CUTLASS has no tiles in empty experts' dw[e]).
    const int64_t words = N * K * static_cast<int64_t>(sizeof(Element)) / 16;
    zero_empty_experts_kernel<uint4><<<zero_empty_grid(words, E), kZeroThreads, 0, stream>>>(
        reinterpret_cast<uint4*>(dwp), words, sp, ep, e32);
  });
}

}  // namespace glm5::moe
#endif  // GLM5_DISABLE_CUTLASS_GROUPED_GEMM
