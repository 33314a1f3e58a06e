// Tensor-core sparse MLA forward (bf16 / fp16), its own translation unit: fwd_tc.cu.
#pragma once
#include <ATen/ATen.h>

namespace glm5::cuda {

// Fills out [T, H, dv] and lse [T, H] (fp32) like sparse_mla_fwd_kernel and returns true, or launches
// nothing and returns false when the inputs are outside what the tensor-core kernel handles (dtype,
// D % 16, dv % 32, alignment, shared memory) or GLM5_SPARSE_MLA_SIMT=1 asks for the SIMT kernel.
// Inputs are checked, contiguous and on the current device.
bool sparse_mla_fwd_tc(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& indices, double sm_scale,
                       at::Tensor& out, at::Tensor& lse);

}  // namespace glm5::cuda
