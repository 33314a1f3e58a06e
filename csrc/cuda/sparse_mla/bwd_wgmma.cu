// Host launcher of the warpgroup-MMA sparse MLA backward (kernel and design: bwd_wgmma_kernel.cuh).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <cstdlib>

#include "../common/host_utils.h"
#include "bwd_wgmma.h"
#include "bwd_wgmma_kernel.cuh"
#include "plan.h"

namespace glm5::cuda {
namespace {

using namespace sparse_mla_wgmma_bwd;

bool aligned(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

size_t smem_of(int D, int dv) { return Layout(D, dv).bytes; }

}  // namespace

bool sparse_mla_bwd_wgmma(const SparseMlaBwdParams& p, c10::ScalarType dtype, cudaStream_t stream) {
  if (env_off("GLM5_WGMMA") || env_flag("GLM5_SPARSE_MLA_SIMT")) return false;
  if (dtype != c10::kBFloat16 && dtype != c10::kHalf) return false;
  if (p.t1 <= p.t0 || p.H <= 0 || p.K <= 0 || p.S <= 0) return false;
  if (!aligned(p.q, 16) || !aligned(p.kv, 16) || !aligned(p.dout, 16)) return false;  // cp.async rows
  if (!aligned(p.dq_acc, 8)) return false;                                             // float2 stores
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (prop->major != 9) return false;  // wgmma is sm_90a only
  const int ncb = sparse_mla_bwd_wgmma_ncb(p.D, p.dv, prop->sharedMemPerBlockOptin, smem_of);
  if (ncb == 0) return false;
  const size_t smem = smem_of(p.D, p.dv);
  sparse_mla_with_ncb(ncb, [&](auto n) {
    constexpr int NCB = decltype(n)::value;
    auto launch = [&](auto kernel) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      kernel<<<unsigned(p.t1 - p.t0), kThreads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (dtype == c10::kBFloat16) launch(sparse_mla_bwd_wgmma_kernel<__nv_bfloat16, NCB>);
    else launch(sparse_mla_bwd_wgmma_kernel<__half, NCB>);
  });
  return true;
}

}  // namespace glm5::cuda
