// Host launcher of the indexer loss target on warpgroup MMA (kernel and design: probs_wgmma_kernel.cuh).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "../common/host_utils.h"
#include "probs_params.h"
#include "probs_wgmma.h"

namespace glm5::cuda {

using namespace indexer_probs_wgmma;

bool indexer_loss_target_wgmma_ok(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& lse) {
  if (env_off("GLM5_WGMMA")) return false;
  const auto dtype = q.scalar_type();
  if ((dtype != at::kBFloat16 && dtype != at::kHalf) || kv.scalar_type() != dtype || lse.scalar_type() != at::kFloat)
    return false;
  if (at::cuda::getCurrentDeviceProperties()->major != 9) return false;  // wgmma is sm_90a only
  const int64_t H = q.size(1), D = q.size(2);
  if (H == 0 || D == 0 || D % 64 != 0 || !aligned16(q.data_ptr()) || !aligned16(kv.data_ptr())) return false;
  return smem_bytes(int(D)) <= max_smem_optin(q.get_device());
}

void indexer_loss_target_wgmma(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& lse,
                               const at::Tensor& indices, const at::Tensor& ks, const at::Tensor& ke, double sm_scale,
                               int64_t q0, int64_t q1, at::Tensor& P) {
  if (q1 <= q0) return;
  const Params p = make_params(q, kv, lse, indices, ks, ke, sm_scale, q0, P);
  const size_t smem = smem_bytes(p.D);
  auto launch = [&](auto kernel) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<unsigned(q1 - q0), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (q.scalar_type() == at::kBFloat16) launch(head_summed_probs_wgmma_kernel<__nv_bfloat16>);
  else launch(head_summed_probs_wgmma_kernel<__half>);
}

}  // namespace glm5::cuda
