// CUTLASS 3 Hopper k-grouped GEMM, bf16: the MoE weight gradient dw[e] = dy[rows of e]^T @ x[rows of e]
// (see grouped_gemm_cutlass.h). The reduction runs over expert e's rows, so each group's CUTLASS K is
// its row count; both operands are read in place through layouts that need no transpose copy.
#ifndef GLM5_DISABLE_CUTLASS_GROUPED_GEMM
#include "grouped_gemm_cutlass.h"

namespace glm5::moe {
namespace cutlass_gemm {

// Group e as CUTLASS's (M, N, K) = (N, K, rows_e), with s = start[e]:
//   A (M x K = N x rows): dy rows seen column-major, element (n, r) at dy[(s + r) * N + n] (M contiguous, ld N);
//   B (K x N = rows x K): x rows seen N-major,       element (r, k) at x[(s + r) * K + k]  (N contiguous, ld K);
//   D (M x N = N x K):    dw[e] row-major,           element (n, k) at dw[e * N * K + n * K + k] (ld K).
using WgradGemm = GroupedGemmBf16<cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;

// One thread per expert. An expert without rows gets the shape (0, 0, 0): no tiles, so CUTLASS never
// writes its dw[e] (given K = 0 it would store uncleared accumulators); zero_empty_experts_kernel
// writes those zeros instead.
__global__ void fill_wgrad_arrays_kernel(WgradGemm::Arrays a, const int64_t* start, const int64_t* end, int32_t E,
                                         const WgradGemm::Element* dy, const WgradGemm::Element* x,
                                         WgradGemm::Element* dw, int32_t N, int32_t K, WgradGemm::StrideA sa,
                                         WgradGemm::StrideB sb, WgradGemm::StrideD sd) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  const int64_t s = start[e], rows = end[e] - s;  // 0 <= rows <= M <= INT32_MAX (checked on the host)
  a.shapes[e] = rows > 0 ? WgradGemm::Shape3(N, K, static_cast<int>(rows)) : WgradGemm::Shape3(0, 0, 0);
  a.ptr_a[e] = dy + s * N;
  a.ptr_b[e] = x + s * K;
  a.ptr_d[e] = dw + static_cast<int64_t>(e) * N * K;
  a.stride_a[e] = sa;
  a.stride_b[e] = sb;
  a.stride_d[e] = sd;
}

// dw[e] = 0 for every expert e without rows: grid.y walks the experts, grid.x * blockDim.x threads walk
// the 16-byte words of one expert's [N, K] matrix (N * K * 2 bytes, a multiple of 16 since K % 8 == 0).
// Blocks on an expert with rows return after two loads. bf16 +0.0 is the all-zero bit pattern.
__global__ void zero_empty_experts_kernel(uint4* dw, int64_t words_per_expert, const int64_t* start,
                                          const int64_t* end, int32_t E) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = blockIdx.y; e < E; e += gridDim.y) {
    if (end[e] != start[e]) continue;
    uint4* d = dw + e * words_per_expert;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < words_per_expert; i += stride) {
      d[i] = make_uint4(0, 0, 0, 0);
    }
  }
}

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
  const auto sa = packed_stride<G::StrideA>(N);  // (1, N): dy^T, M (= n) contiguous
  const auto sb = packed_stride<G::StrideB>(K);  // (1, K): x, N (= k) contiguous
  const auto sd = packed_stride<G::StrideD>(K);  // (K, 1): dw[e] row-major
  const auto* dyp = reinterpret_cast<const Element*>(dy.data_ptr());
  const auto* xp = reinterpret_cast<const Element*>(x.data_ptr());
  auto* dwp = reinterpret_cast<Element*>(dw.data_ptr());
  const int64_t* sp = start.data_ptr<int64_t>();
  const int64_t* ep = end.data_ptr<int64_t>();
  const int32_t e32 = static_cast<int32_t>(E), n32 = static_cast<int32_t>(N), k32 = static_cast<int32_t>(K);
  return run_grouped<G>("grouped_gemm_wgrad", E, dy, [&](const G::Arrays& a, cudaStream_t stream) {
    fill_wgrad_arrays_kernel<<<static_cast<unsigned>((E + 127) / 128), 128, 0, stream>>>(a, sp, ep, e32, dyp, xp, dwp,
                                                                                        n32, k32, sa, sb, sd);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Disjoint from everything the GEMM writes (CUTLASS has no tiles in empty experts' dw[e]).
    const int64_t words = N * K * static_cast<int64_t>(sizeof(Element)) / 16;
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>((words + 2047) / 2048, 128)),
                    static_cast<unsigned>(std::min<int64_t>(E, 65535)));
    zero_empty_experts_kernel<<<grid, 256, 0, stream>>>(reinterpret_cast<uint4*>(dwp), words, sp, ep, e32);
  });
}

}  // namespace glm5::moe
#endif  // GLM5_DISABLE_CUTLASS_GROUPED_GEMM
