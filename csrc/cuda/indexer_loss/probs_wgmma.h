// The indexer KL loss's sparse target P on Hopper's warpgroup MMA, its own translation unit: probs_wgmma.cu.
#pragma once
#include <ATen/ATen.h>

namespace glm5::cuda {

// P [T, K] fp32: the head-summed main-attention probability of every slot of the sparse key sets
// (probs_wgmma_kernel.cuh), or an undefined tensor, launching nothing, when the kernel does not apply
// (not an sm_90 device, q / kv not bf16 or fp16, D % 64 != 0, H or K zero, alignment, shared memory) or
// GLM5_WGMMA=0 switches the Hopper kernels off. All inputs contiguous, on the current device; lse fp32.
at::Tensor indexer_loss_target_wgmma(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& lse,
                                     const at::Tensor& indices, const at::Tensor& ks, const at::Tensor& ke,
                                     double sm_scale);

}  // namespace glm5::cuda
