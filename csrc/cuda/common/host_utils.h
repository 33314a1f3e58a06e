// Host-side helpers shared by the CUDA wrappers (api.cu, *_tc.cu): accumulation dtype, device limits,
// the storage/compute dtype dispatch, alignment (odd_stride lives in device_utils.cuh). ATen only; no device code.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdlib>

#include "device_utils.cuh"  // odd_stride

namespace glm5::cuda {

// fp32 accumulation for every float dtype but fp64.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Dynamic shared memory a block may opt into on `device` (232448 bytes on an H100 / H200).
inline size_t max_smem_optin(int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return size_t(v);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The kernels' environment switches, read per call: env_flag(name) is true when `name` is set to anything
// but "" or "0..." (an opt-in such as GLM5_SPARSE_MLA_SIMT=1); env_off(name) is true when it is set to
// "0..." (a default-on path switched off, such as GLM5_WGMMA=0).
inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}
inline bool env_off(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] == '0';
}

// Calls f(T{}, ct{}) with the CUDA storage type of dtype and its compute type.
template <typename F>
void dispatch_float(at::ScalarType dtype, const char* name, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}, float{}); break;
    case at::kDouble: f(double{}, double{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}, float{}); break;
    case at::kHalf: f(__half{}, float{}); break;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", dtype);
  }
}

}  // namespace glm5::cuda
