// CUTLASS 3 Hopper grouped GEMM, bf16, weights [E, N, K] (trans_w=False): see grouped_gemm_cutlass.h.
#ifndef GLM5_DISABLE_CUTLASS_GROUPED_GEMM
#include "grouped_gemm_cutlass.h"

namespace glm5::moe {

bool grouped_gemm_bf16_cutlass_nt(const at::Tensor& x, const at::Tensor& w, const at::Tensor& start,
                                   const at::Tensor& end, at::Tensor& y) {
  return cutlass_gemm::run_grouped_gemm_bf16<false>(x, w, start, end, y);
}

}  // namespace glm5::moe
#endif  // GLM5_DISABLE_CUTLASS_GROUPED_GEMM
