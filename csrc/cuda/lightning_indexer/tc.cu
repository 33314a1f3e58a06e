// Host launchers of the tensor-core lightning-indexer kernels (design: tc_kernels.cuh).
// Knobs (results never depend on them; tests use them to cover every path):
//   GLM5_INDEXER_SIMT=1          the SIMT kernels for every dtype and shape
//   GLM5_INDEXER_TOPK_QB=1|2|4   queries per top-k CTA (default: the most that still fills the GPU)
//   GLM5_INDEXER_TOPK_CAP=N      top-k candidates gathered per query before a sorted merge, in
//                                [256, 1024] (default 1024)
//   GLM5_INDEXER_LOGITS_QB=N     queries per logits CTA, 1..1024 (default: up to 32)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "../common/host_utils.h"
#include "host_params.h"
#include "tc.h"
#include "tc_kernels.cuh"

namespace glm5::cuda {
namespace {

// The positive integer in environment variable `name`, or 0 when it is unset or empty.
int env_int(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || v[0] == '\0') return 0;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && x > 0 && x <= (1 << 20), name, " must be a positive integer, got '", v,
              "'");
  return int(x);
}

int num_sms(const at::Tensor& q) { return at::cuda::getDeviceProperties(q.get_device())->multiProcessorCount; }

size_t smem_optin(const at::Tensor& q) { return max_smem_optin(q.get_device()); }

template <typename T>
void launch_logits(const IndexerParams& p, size_t smem, cudaStream_t stream) {
  auto kernel = indexer_logits_tc_kernel<T>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const dim3 grid(unsigned((p.T + p.qb - 1) / p.qb), unsigned((p.S + kTcTileKeys - 1) / kTcTileKeys));
  kernel<<<grid, kTcThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int QB>
void launch_topk(const IndexerParams& p, size_t smem, cudaStream_t stream) {
  auto kernel = indexer_topk_tc_kernel<T, QB>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<unsigned((p.T + QB - 1) / QB), kTcThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_topk_qb(int qb, const IndexerParams& p, size_t smem, cudaStream_t stream) {
  switch (qb) {
    case 1: launch_topk<T, 1>(p, smem, stream); break;
    case 2: launch_topk<T, 2>(p, smem, stream); break;
    default: launch_topk<T, 4>(p, smem, stream); break;
  }
}

}  // namespace

bool indexer_tc_eligible(const at::Tensor& q, const at::Tensor& k) {
  if (env_flag("GLM5_INDEXER_SIMT")) return false;
  const auto dtype = q.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  const int64_t HI = q.size(1), DI = q.size(2);
  if (HI < 16 || HI % 16 != 0 || DI < 16 || DI % 16 != 0 || DI > 16 * kTcMaxKSteps) return false;
  return aligned16(q.data_ptr()) && aligned16(k.data_ptr()) && tc_logits_smem(int(HI), int(DI)).total <= smem_optin(q);
}

void indexer_logits_tc(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, const at::Tensor& ks,
                       const at::Tensor& ke, at::Tensor& logits) {
  IndexerParams p = indexer_params(q, k, w, ks, ke);
  p.logits = logits.data_ptr();
  const int64_t tiles = (p.S + kTcTileKeys - 1) / kTcTileKeys;
  TORCH_CHECK(tiles <= 65535, "indexer_logits: S = ", p.S, " needs ", tiles, " key tiles, more than 65535");
  // Enough CTAs for two waves when T allows, at most 32 queries per CTA (each reuses the key tile).
  int qb = env_int("GLM5_INDEXER_LOGITS_QB");
  if (qb == 0) {
    qb = 32;
    while (qb > 1 && (p.T + qb - 1) / qb * tiles < 2 * int64_t(num_sms(q))) qb /= 2;
  }
  p.qb = int(std::min<int64_t>(qb, p.T));
  const size_t smem = tc_logits_smem(p.HI, p.DI).total;  // fits: indexer_tc_eligible
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (q.scalar_type() == at::kBFloat16) launch_logits<__nv_bfloat16>(p, smem, stream);
  else launch_logits<__half>(p, smem, stream);
}

bool indexer_topk_tc(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, const at::Tensor& ks,
                     const at::Tensor& ke, int64_t topk, at::Tensor& indices, at::Tensor& scores) {
  IndexerParams p = indexer_params(q, k, w, ks, ke);
  p.topk = int(topk);
  p.out_idx = indices.data_ptr<int32_t>();
  p.out_val = scores.data_ptr();
  const size_t limit = smem_optin(q);
  const int want_qb = env_int("GLM5_INDEXER_TOPK_QB");
  const int want_cap = env_int("GLM5_INDEXER_TOPK_CAP");
  TORCH_CHECK(want_qb == 0 || want_qb == 1 || want_qb == 2 || want_qb == 4,
              "GLM5_INDEXER_TOPK_QB must be 1, 2 or 4, got ", want_qb);
  TORCH_CHECK(want_cap == 0 || (want_cap >= kTcTileKeys && want_cap <= kSortN),
              "GLM5_INDEXER_TOPK_CAP must be in [", kTcTileKeys, ", ", kSortN, "], got ", want_cap);
  p.cap = want_cap ? want_cap : kSortN;
  // Queries per CTA: the most (of 4, 2, 1) that still gives every SM a CTA, fewer when the shared
  // memory does not fit.
  int qb = want_qb;
  if (qb == 0) {
    const int64_t sms = num_sms(q);
    qb = (p.T + 3) / 4 >= sms ? 4 : (p.T + 1) / 2 >= sms ? 2 : 1;
  }
  for (; qb >= 1; qb /= 2) {
    const size_t smem = tc_topk_smem(qb, p.HI, p.DI, p.topk).total;
    if (smem <= limit) {
      cudaStream_t stream = at::cuda::getCurrentCUDAStream();
      if (q.scalar_type() == at::kBFloat16) launch_topk_qb<__nv_bfloat16>(qb, p, smem, stream);
      else launch_topk_qb<__half>(qb, p, smem, stream);
      return true;
    }
    TORCH_CHECK(want_qb == 0, "indexer_topk: GLM5_INDEXER_TOPK_QB=", want_qb, " needs ", smem,
                " bytes of shared memory, more than this GPU's ", limit);
  }
  return false;
}

}  // namespace glm5::cuda
