// Tensor-core lightning indexer (bf16 / fp16 inputs), its own translation unit: tc.cu.
#pragma once
#include <ATen/ATen.h>

namespace glm5::cuda {

// Whether indexer_logits and indexer_topk take the tensor-core kernels for these (checked, contiguous)
// inputs: bf16/fp16, HI % 16 == 0, DI % 16 == 0, DI <= 128, q and k 16-byte aligned, the logits
// kernel's shared memory fits, and GLM5_INDEXER_SIMT unset (or 0). Both ops ask the same question, so
// their scores stay bit-identical (unless the top-k's lists do not fit next to its tiles, see below).
bool indexer_tc_eligible(const at::Tensor& q, const at::Tensor& k);

// Fill logits [T, S] fp32 (T, S > 0) with the tensor-core kernel; the inputs must be eligible.
void indexer_logits_tc(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, const at::Tensor& ks,
                       const at::Tensor& ke, at::Tensor& logits);

// Fill indices / scores [T, topk] (T, S > 0) with the fused tensor-core top-k and return true, or
// launch nothing and return false when its shared memory does not fit (the caller then runs the SIMT
// kernel). The inputs must be eligible.
bool indexer_topk_tc(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, const at::Tensor& ks,
                     const at::Tensor& ke, int64_t topk, at::Tensor& indices, at::Tensor& scores);

}  // namespace glm5::cuda
