// Tensor-core sparse MLA backward (bf16 / fp16 inputs, fp32 accumulation), its own translation unit:
// bwd_tc.cu.
#pragma once
#include <c10/core/ScalarType.h>
#include <cuda_runtime.h>

#include "params.h"

namespace glm5::cuda {

// Does what sparse_mla_bwd_kernel does for the query chunk [p.t0, p.t1): writes dq_acc (fp32) of those
// queries and the per-(t, slot) key-gradient rows of every valid slot into p.rows, on `stream`, and
// returns true. Launches nothing and returns false when the inputs are outside what the tensor-core
// kernel handles (dtype, D % 16, d_v % 16, alignment, shared memory) or GLM5_SPARSE_MLA_SIMT=1 asks
// for the SIMT kernels; the caller then runs the SIMT kernel. Only p's data pointers, t0/t1, sizes and
// scale are read (hb / bk / ld / ldv are the SIMT kernel's tiling). Current device.
bool sparse_mla_bwd_tc(const SparseMlaBwdParams& p, c10::ScalarType dtype, cudaStream_t stream);

}  // namespace glm5::cuda
