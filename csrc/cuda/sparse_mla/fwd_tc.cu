// Host launcher of the tensor-core sparse MLA forward (kernel and design: fwd_tc_kernel.cuh).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdlib>

#include "../common/host_utils.h"
#include "fwd_tc.h"
#include "fwd_tc_kernel.cuh"
#include "host_params.h"
#include "plan.h"

namespace glm5::cuda {
namespace {

using namespace sparse_mla_tc;

template <typename T, int MT>
void launch(const SparseMlaFwdParams& p, size_t smem, cudaStream_t stream) {
  auto kernel = sparse_mla_fwd_tc_kernel<T, MT>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const dim3 grid(unsigned(p.T), unsigned((p.H + 16 * MT - 1) / (16 * MT)));
  kernel<<<grid, 64 * MT, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_mt(int mt, const SparseMlaFwdParams& p, size_t smem, cudaStream_t stream) {
  sparse_mla_with_mt(mt, [&](auto m) { launch<T, decltype(m)::value>(p, smem, stream); });
}

}  // namespace

bool sparse_mla_fwd_tc(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& indices, double sm_scale,
                       at::Tensor& out, at::Tensor& lse) {
  if (env_flag("GLM5_SPARSE_MLA_SIMT")) return false;
  const auto dtype = q.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), S = kv.size(0), K = indices.size(1), dv = out.size(2);
  if (T == 0 || H == 0 || K == 0 || D % 16 != 0 || dv == 0 || dv % 32 != 0 || dv > 16 * kMaxOTiles || dv > D)
    return false;
  if (!aligned16(q.data_ptr()) || !aligned16(kv.data_ptr())) return false;
  const int mt = sparse_mla_fwd_tc_mt(H);
  const int elem = int(q.element_size());
  const size_t smem =
      sparse_mla_with_mt(mt, [&](auto m) { return sparse_mla_fwd_tc_smem<decltype(m)::value>(int(D), elem); });
  if (smem > max_smem_optin(q.get_device())) return false;

  SparseMlaFwdParams p = sparse_mla_fwd_params(q, kv, indices, sm_scale, out, lse);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (dtype == at::kBFloat16) launch_mt<__nv_bfloat16>(mt, p, smem, stream);
  else launch_mt<__half>(mt, p, smem, stream);
  return true;
}

}  // namespace glm5::cuda
