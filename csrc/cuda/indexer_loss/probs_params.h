// The indexer loss target kernel's parameter block filled from its tensors, shared by its launcher
// (probs_wgmma.cu) and the CPU simulator's binding. ATen only; no device code of its own.
#pragma once
#include <ATen/ATen.h>

#include "probs_wgmma_kernel.cuh"

namespace glm5::cuda::indexer_probs_wgmma {

// Queries from q0 on into the rows of P [chunk, ld] (the launch grid says how many); indices undefined:
// dense sets. Contiguous tensors, lse fp32.
inline Params make_params(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& lse, const at::Tensor& indices,
                          const at::Tensor& ks, const at::Tensor& ke, double sm_scale, int64_t q0, at::Tensor& P) {
  Params p{};
  p.q = q.data_ptr();
  p.kv = kv.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.indices = indices.defined() ? indices.data_ptr<int32_t>() : nullptr;
  p.ks = ks.data_ptr<int32_t>();
  p.ke = ke.data_ptr<int32_t>();
  p.P = P.data_ptr<float>();
  p.t0 = q0, p.ld = P.size(1);
  p.T = q.size(0);
  p.S = int(kv.size(0)), p.H = int(q.size(1)), p.D = int(q.size(2));
  p.K = indices.defined() ? int(indices.size(1)) : 0;
  p.sm_scale = sm_scale;
  return p;
}

}  // namespace glm5::cuda::indexer_probs_wgmma
