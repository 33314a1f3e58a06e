// Warpgroup-MMA sparse MLA backward for Hopper (bf16 / fp16), its own translation unit: bwd_wgmma.cu.
#pragma once
#include <c10/core/ScalarType.h>
#include <cuda_runtime.h>

#include "params.h"

namespace glm5::cuda {

// Launches the wgmma backward for the chunk [p.t0, p.t1) (writes dq_acc rows and the chunk's key-gradient
// rows, as bwd_tc.h) and returns true, or launches nothing and returns false when the inputs are outside
// what it handles (not an sm_90 device, dtype, D not 192 or 576, d_v % 64, alignment, shared memory), or
// GLM5_WGMMA=0 or GLM5_SPARSE_MLA_SIMT=1 asks for another kernel.
bool sparse_mla_bwd_wgmma(const SparseMlaBwdParams& p, c10::ScalarType dtype, cudaStream_t stream);

}  // namespace glm5::cuda
