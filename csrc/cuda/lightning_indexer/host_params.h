// The lightning indexer's parameter block filled from its tensors, shared by the host launchers (api.cu,
// tc.cu) and the CPU simulator's bindings. ATen only; no device code.
#pragma once
#include <ATen/ATen.h>

#include "../common/device_utils.cuh"  // odd_stride
#include "params.h"

namespace glm5::cuda {

// q [T, HI, DI], k [S, DI], w [T, HI], ks / ke [T] int32: contiguous and checked by the caller. The
// outputs and the tiling (bs, topk) are the caller's; ldk is the SIMT kernels' padded k-tile stride.
inline IndexerParams indexer_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
                                    const at::Tensor& ks, const at::Tensor& ke) {
  IndexerParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.w = w.data_ptr();
  p.ks = ks.data_ptr<int32_t>();
  p.ke = ke.data_ptr<int32_t>();
  p.T = q.size(0);
  p.S = int(k.size(0)), p.HI = int(q.size(1)), p.DI = int(q.size(2));
  p.ldk = odd_stride(p.DI);
  return p;
}

}  // namespace glm5::cuda
