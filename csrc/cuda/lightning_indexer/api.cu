// CUDA host wrappers of glm5::indexer_logits, indexer_logits_bwd and indexer_topk (kernels:
// kernels.cuh). Same checks and error messages as the CPU path (csrc/cpu/indexer.cpp) for dtypes,
// ranks, shapes and devices, with two documented differences (both avoid a host sync):
// - ks/ke VALUES are not validated; the kernels clamp them to [0, S] (ks > ke: no visible key).
// - indexer_topk treats a NaN score as -inf (never selected) instead of raising ValueError.
// bf16/fp16 inputs of supported shapes take the tensor-core kernels (tc.h); the rest the SIMT ones.
// Status: compiled for sm_90a, not yet verified on a GPU.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "glm5/checks.h"
#include "glm5/indexer_checks.h"
#include "../common/host_utils.h"
#include "host_params.h"
#include "kernels.cuh"
#include "tc.h"

namespace {

using namespace glm5::cuda;

at::ScalarType acc_type(const at::Tensor& q) { return acc_dtype(q.scalar_type()); }

// Shapes and dtypes as the CPU path (glm5/indexer_checks.h); ks/ke values are clamped on the device.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, const at::Tensor& ks,
                  const at::Tensor& ke) {
  glm5::indexer_checks::inputs(q, k, w, ks, ke, at::kCUDA);
  glm5::checked_int32(q.size(1), "q.size(1) (HI)");
  glm5::checked_int32(q.size(2), "q.size(2) (DI)");
  TORCH_CHECK(q.size(0) < (int64_t(1) << 31), "q.size(0) (T) = ", q.size(0), " does not fit in int32");
}

// The largest power-of-two tile in [lo_bs, hi_bs] whose shared memory fits, or a clear error.
template <typename SmemFn>
int pick_tile(int hi_bs, int lo_bs, size_t limit, const SmemFn& smem, const char* op) {
  for (int bs = hi_bs; bs >= lo_bs; bs /= 2)
    if (smem(bs) <= limit) return bs;
  TORCH_CHECK(false, op, ": these sizes need ", smem(lo_bs), " bytes of shared memory, more than this GPU's ", limit);
  return 0;
}

at::Tensor indexer_logits_cuda(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& w_, const at::Tensor& ks_,
                               const at::Tensor& ke_) {
  check_inputs(q_, k_, w_, ks_, ke_);
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), w = w_.contiguous();
  const at::Tensor ks = ks_.contiguous(), ke = ke_.contiguous();
  const int64_t T = q.size(0), S = k.size(0);
  at::Tensor logits = at::empty({T, S}, q.options().dtype(acc_type(q)));
  if (T == 0 || S == 0) return logits;
  if (indexer_tc_eligible(q, k)) {
    indexer_logits_tc(q, k, w, ks, ke, logits);
    return logits;
  }
  IndexerParams p = indexer_params(q, k, w, ks, ke);
  p.logits = logits.data_ptr();
  const size_t limit = max_smem_optin(q.get_device());
  dispatch_float(q.scalar_type(), "indexer_logits", [&](auto t_tag, auto c_tag) {
    using T_ = decltype(t_tag);
    using ct = decltype(c_tag);
    p.bs = pick_tile(128, 32, limit, [&](int bs) { return indexer_logits_smem<ct>(p.HI, p.DI, bs, p.ldk); },
                     "indexer_logits");
    const size_t smem = indexer_logits_smem<ct>(p.HI, p.DI, p.bs, p.ldk);
    auto kernel = indexer_logits_kernel<T_, ct>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    const int64_t tiles = (S + p.bs - 1) / p.bs;
    TORCH_CHECK(tiles <= 65535, "indexer_logits: S = ", S, " needs ", tiles, " key tiles, more than 65535");
    const dim3 grid{unsigned(T), unsigned(tiles)};
    kernel<<<grid, p.bs, smem, at::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return logits;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> indexer_logits_bwd_cuda(const at::Tensor& grad, const at::Tensor& q_,
                                                                       const at::Tensor& k_, const at::Tensor& w_,
                                                                       const at::Tensor& ks_, const at::Tensor& ke_) {
  check_inputs(q_, k_, w_, ks_, ke_);
  GLM5_CHECK_SAME_DEVICE(grad, q_);
  GLM5_CHECK_NDIM(grad, 2);
  GLM5_CHECK_FLOAT(grad);
  const int64_t T = q_.size(0), HI = q_.size(1), DI = q_.size(2), S = k_.size(0);
  TORCH_CHECK(grad.size(0) == T && grad.size(1) == S, "grad must have shape (T, S) = (", T, ", ", S, "), got ",
              grad.sizes());
  const c10::cuda::CUDAGuard guard(q_.device());
  const auto acc = acc_type(q_);
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), w = w_.contiguous();
  const at::Tensor ks = ks_.contiguous(), ke = ke_.contiguous(), G = grad.to(acc).contiguous();
  at::Tensor dQ = at::zeros({T, HI, DI}, q.options().dtype(acc));
  at::Tensor dK = at::zeros({S, DI}, q.options().dtype(acc));
  at::Tensor dW = at::zeros({T, HI}, q.options().dtype(acc));
  if (T > 0 && S > 0 && HI > 0 && DI > 0) {
    IndexerParams p = indexer_params(q, k, w, ks, ke);
    p.grad = G.data_ptr();
    p.dq = dQ.data_ptr();
    p.dk = dK.data_ptr();
    p.dw = dW.data_ptr();
    const size_t limit = max_smem_optin(q.get_device());
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    dispatch_float(q.scalar_type(), "indexer_logits_bwd", [&](auto t_tag, auto c_tag) {
      using T_ = decltype(t_tag);
      using ct = decltype(c_tag);
      p.bs = pick_tile(64, 1, limit, [&](int bs) { return indexer_bwd_q_smem<ct>(p.HI, p.DI, bs, p.ldk); },
                       "indexer_logits_bwd");
      size_t smem = indexer_bwd_q_smem<ct>(p.HI, p.DI, p.bs, p.ldk);
      auto kq = indexer_bwd_q_kernel<T_, ct>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kq, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      kq<<<unsigned(T), kIndexerThreads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      p.bs = pick_tile(64, 1, limit, [&](int bs) { return indexer_bwd_k_smem<ct>(p.HI, p.DI, bs, p.ldk); },
                       "indexer_logits_bwd");
      smem = indexer_bwd_k_smem<ct>(p.HI, p.DI, p.bs, p.ldk);
      auto kk = indexer_bwd_k_kernel<T_, ct>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kk, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      kk<<<unsigned((S + p.bs - 1) / p.bs), kIndexerThreads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {dQ.to(q_.scalar_type()), dK.to(k_.scalar_type()), dW.to(w_.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> indexer_topk_cuda(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& w_,
                                                     const at::Tensor& ks_, const at::Tensor& ke_, int64_t topk) {
  TORCH_CHECK_VALUE(topk > 0, "topk must be positive, got ", topk);
  check_inputs(q_, k_, w_, ks_, ke_);
  glm5::checked_int32(topk, "topk");
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), w = w_.contiguous();
  const at::Tensor ks = ks_.contiguous(), ke = ke_.contiguous();
  const int64_t T = q.size(0), S = k.size(0);
  at::Tensor indices = at::full({T, topk}, -1, q.options().dtype(at::kInt));
  at::Tensor scores = at::full({T, topk}, -std::numeric_limits<double>::infinity(), q.options().dtype(acc_type(q)));
  if (T == 0 || S == 0) return {indices, scores};
  if (indexer_tc_eligible(q, k) && indexer_topk_tc(q, k, w, ks, ke, topk, indices, scores)) return {indices, scores};
  IndexerParams p = indexer_params(q, k, w, ks, ke);
  p.topk = int(topk);
  p.out_idx = indices.data_ptr<int32_t>();
  p.out_val = scores.data_ptr();
  const size_t limit = max_smem_optin(q.get_device());
  dispatch_float(q.scalar_type(), "indexer_topk", [&](auto t_tag, auto c_tag) {
    using T_ = decltype(t_tag);
    using ct = decltype(c_tag);
    p.bs = pick_tile(kIndexerThreads, 2, limit,
                     [&](int bs) { return indexer_topk_smem<ct>(p.HI, p.DI, bs, p.ldk, p.topk); }, "indexer_topk");
    p.cap = kSortN;
    const size_t smem = indexer_topk_smem<ct>(p.HI, p.DI, p.bs, p.ldk, p.topk);
    auto kernel = indexer_topk_kernel<T_, ct>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<unsigned(T), kIndexerThreads, smem, at::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {indices, scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(glm5, CUDA, m) {
  m.impl("indexer_logits", &indexer_logits_cuda);
  m.impl("indexer_logits_bwd", &indexer_logits_bwd_cuda);
  m.impl("indexer_topk", &indexer_topk_cuda);
}
