// Host launcher of the warpgroup-MMA sparse MLA forward (kernel and design: fwd_wgmma_kernel.cuh).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdlib>

#include "../common/host_utils.h"
#include "fwd_wgmma.h"
#include "fwd_wgmma_kernel.cuh"
#include "host_params.h"
#include "plan.h"

namespace glm5::cuda {
namespace {

using namespace sparse_mla_wgmma;

template <typename T, int NV>
void launch(const SparseMlaFwdParams& p, size_t smem, cudaStream_t stream) {
  auto kernel = sparse_mla_fwd_wgmma_kernel<T, NV>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const dim3 grid(unsigned(p.T), unsigned((p.H + kHeads - 1) / kHeads));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool sparse_mla_fwd_wgmma(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& indices, double sm_scale,
                          at::Tensor& out, at::Tensor& lse) {
  if (env_off("GLM5_WGMMA") || env_flag("GLM5_SPARSE_MLA_SIMT")) return false;
  const auto dtype = q.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  if (at::cuda::getCurrentDeviceProperties()->major != 9) return false;  // wgmma is sm_90a only
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), S = kv.size(0), K = indices.size(1), dv = out.size(2);
  if (T == 0 || H == 0 || K == 0 || !aligned16(q.data_ptr()) || !aligned16(kv.data_ptr())) return false;
  const int nv = sparse_mla_fwd_wgmma_nv(D, dv, max_smem_optin(q.get_device()), smem_bytes);
  if (nv == 0) return false;

  SparseMlaFwdParams p = sparse_mla_fwd_params(q, kv, indices, sm_scale, out, lse);
  const size_t smem = smem_bytes(int(D));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  sparse_mla_with_nv(nv, [&](auto n) {
    if (dtype == at::kBFloat16) launch<__nv_bfloat16, decltype(n)::value>(p, smem, stream);
    else launch<__half, decltype(n)::value>(p, smem, stream);
  });
  return true;
}

}  // namespace glm5::cuda
