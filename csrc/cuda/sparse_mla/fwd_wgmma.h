// Warpgroup-MMA sparse MLA forward for Hopper (bf16 / fp16), its own translation unit: fwd_wgmma.cu.
#pragma once
#include <ATen/ATen.h>

namespace glm5::cuda {

// Fills out [T, H, dv] and lse [T, H] (fp32) like the other forward kernels and returns true, or
// launches nothing and returns false when the inputs are outside what the wgmma kernel handles (not an
// sm_90 device, dtype, D % 64, d_v not 128 or 512, alignment, shared memory), or GLM5_WGMMA=0
// or GLM5_SPARSE_MLA_SIMT=1 asks for another kernel. Inputs are checked, contiguous and on the current device.
bool sparse_mla_fwd_wgmma(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& indices, double sm_scale,
                          at::Tensor& out, at::Tensor& lse);

}  // namespace glm5::cuda
