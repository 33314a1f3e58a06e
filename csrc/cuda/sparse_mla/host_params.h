// The sparse MLA parameter blocks filled from their tensors, shared by the host launchers (api.cu,
// fwd_tc.cu, fwd_wgmma.cu) and the CPU simulator's bindings. ATen only; no device code.
#pragma once
#include <ATen/ATen.h>

#include "params.h"

namespace glm5::cuda {

// q [T, H, D], kv [S, D], indices [T, K] int32, out [T, H, d_v], lse [T, H]: contiguous and checked by the
// caller. The tiling fields (hb, bk, ld) are left to the SIMT launcher.
inline SparseMlaFwdParams sparse_mla_fwd_params(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& indices,
                                                double sm_scale, at::Tensor& out, at::Tensor& lse) {
  SparseMlaFwdParams p{};
  p.q = q.data_ptr();
  p.kv = kv.data_ptr();
  p.indices = indices.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  p.T = q.size(0);
  p.H = int(q.size(1)), p.D = int(q.size(2)), p.S = int(kv.size(0)), p.K = int(indices.size(1));
  p.dv = int(out.size(2));
  p.scale = sm_scale;
  return p;
}

// The backward's: grad_out [T, H, d_v], the forward's tensors and out / lse, dq_acc [T, H, D] and the
// chunk's rows buffer; the query chunk (t0, t1) and the SIMT tiling are the caller's.
inline SparseMlaBwdParams sparse_mla_bwd_params(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& kv,
                                                const at::Tensor& indices, const at::Tensor& out,
                                                const at::Tensor& lse, double sm_scale, at::Tensor& dq_acc,
                                                at::Tensor& rows) {
  SparseMlaBwdParams p{};
  p.q = q.data_ptr();
  p.kv = kv.data_ptr();
  p.indices = indices.data_ptr<int32_t>();
  p.dout = grad_out.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  p.dq_acc = dq_acc.data_ptr();
  p.rows = rows.data_ptr();
  p.H = int(q.size(1)), p.D = int(q.size(2)), p.S = int(kv.size(0)), p.K = int(indices.size(1));
  p.dv = int(grad_out.size(2));
  p.scale = sm_scale;
  return p;
}

}  // namespace glm5::cuda
