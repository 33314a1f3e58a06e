// Host launcher of the indexer loss target on warpgroup MMA (kernel and design: probs_wgmma_kernel.cuh).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdlib>

#include "../common/host_utils.h"
#include "probs_wgmma.h"
#include "probs_wgmma_kernel.cuh"

namespace glm5::cuda {

using namespace indexer_probs_wgmma;

at::Tensor indexer_loss_target_wgmma(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& lse,
                               const at::Tensor& indices, const at::Tensor& ks, const at::Tensor& ke, double sm_scale) {
  if (env_off("GLM5_WGMMA")) return {};
  const auto dtype = q.scalar_type();
  if ((dtype != at::kBFloat16 && dtype != at::kHalf) || kv.scalar_type() != dtype || lse.scalar_type() != at::kFloat)
    return {};
  if (at::cuda::getCurrentDeviceProperties()->major != 9) return {};  // wgmma is sm_90a only
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), K = indices.size(1);
  if (T == 0 || H == 0 || K == 0 || D % 64 != 0 || !aligned16(q.data_ptr()) || !aligned16(kv.data_ptr())) return {};
  const size_t smem = smem_bytes(int(D));
  if (smem > max_smem_optin(q.get_device())) return {};

  at::Tensor P = at::empty({T, K}, q.options().dtype(at::kFloat));
  Params p{};
  p.q = q.data_ptr();
  p.kv = kv.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.indices = indices.data_ptr<int32_t>();
  p.ks = ks.data_ptr<int32_t>();
  p.ke = ke.data_ptr<int32_t>();
  p.P = P.data_ptr<float>();
  p.T = T;
  p.S = int(kv.size(0)), p.H = int(H), p.D = int(D), p.K = int(K);
  p.sm_scale = sm_scale;
  auto launch = [&](auto kernel) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<unsigned(T), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (dtype == at::kBFloat16) launch(head_summed_probs_wgmma_kernel<__nv_bfloat16>);
  else launch(head_summed_probs_wgmma_kernel<__half>);
  return P;
}

}  // namespace glm5::cuda
