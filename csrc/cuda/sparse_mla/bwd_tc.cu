// Host launcher of the tensor-core sparse MLA backward (kernel and design: bwd_tc_kernel.cuh).
// Status: compiled for sm_90a, not yet run on a GPU (tests/ops/test_cuda_sparse_mla_bwd_tc.py); the
// kernel source also runs on the CPU simulator (tests/cuda_sim/test_sim_sparse_mla_bwd_tc.py).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <cstdlib>

#include "../common/host_utils.h"
#include "bwd_tc.h"
#include "bwd_tc_kernel.cuh"

namespace glm5::cuda {
namespace {

using namespace sparse_mla_tc_bwd;

bool aligned(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

}  // namespace

bool sparse_mla_bwd_tc(const SparseMlaBwdParams& p, c10::ScalarType dtype, cudaStream_t stream) {
  if (env_flag("GLM5_SPARSE_MLA_SIMT")) return false;
  if (dtype != c10::kBFloat16 && dtype != c10::kHalf) return false;
  if (p.t1 <= p.t0 || p.H <= 0 || p.K <= 0 || p.S <= 0) return false;
  if (p.D <= 0 || p.D % 16 != 0 || p.dv <= 0 || p.dv % 16 != 0 || p.dv > p.D) return false;
  if (!aligned(p.q, 16) || !aligned(p.kv, 16) || !aligned(p.dout, 16)) return false;  // cp.async rows
  if (!aligned(p.dq_acc, 8) || !aligned(p.rows, 8)) return false;                      // float2 stores
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (prop->major < 8) return false;  // mma.sync with bf16 inputs
  const int mt = pick_mt(p.H, p.D, p.dv, prop->sharedMemPerBlockOptin);
  if (mt == 0) return false;
  const size_t smem = SmemLayout(16 * mt, p.D, p.dv).total;

  auto launch = [&](auto kernel) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<unsigned(p.t1 - p.t0), kThreads, smem, stream>>>(p, mt);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (dtype == c10::kBFloat16) launch(sparse_mla_bwd_tc_kernel<__nv_bfloat16>);
  else launch(sparse_mla_bwd_tc_kernel<__half>);
  return true;
}

}  // namespace glm5::cuda
