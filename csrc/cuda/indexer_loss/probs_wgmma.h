// The indexer KL loss's target P on Hopper's warpgroup MMA, its own translation unit: probs_wgmma.cu.
#pragma once
#include <ATen/ATen.h>

namespace glm5::cuda {

// Whether the warpgroup-MMA target kernel (probs_wgmma_kernel.cuh) takes these inputs: an sm_90 device,
// bf16/fp16 q and kv with D % 64 == 0 and 16-byte aligned rows, fp32 lse, H > 0, the shared memory it
// needs, and GLM5_WGMMA not 0. Contiguous tensors on the current device.
bool indexer_loss_target_wgmma_ok(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& lse);

// P [q1 - q0, ld] fp32 (ld >= the widest set: K, or the widest ke - ks): the head-summed main-attention
// probability of every position of the key sets of queries [q0, q1): the K slots of indices (sparse), or
// the visible keys ks[t], ks[t] + 1, ... (dense, indices undefined). Needs indexer_loss_target_wgmma_ok.
void indexer_loss_target_wgmma(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& lse,
                               const at::Tensor& indices, const at::Tensor& ks, const at::Tensor& ke, double sm_scale,
                               int64_t q0, int64_t q1, at::Tensor& P);

}  // namespace glm5::cuda
