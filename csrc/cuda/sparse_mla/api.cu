// CUDA host wrappers of glm5::sparse_mla_fwd / glm5::sparse_mla_bwd (kernels: kernels.cuh).
// Same checks and error messages as the CPU path (csrc/cpu/sparse_mla.cpp), with one documented
// difference: index VALUES are not range-checked on the host (that would sync the stream); a
// slot outside [-1, S) is treated like -1 (skipped), and never read out of bounds.
// bf16/fp16 forwards with D % 64 == 0 and d_v in {128, 512} run on Hopper's warpgroup MMA (fwd_wgmma.cu),
// other ones with D % 16 == 0 and d_v % 32 == 0 on mma.sync tensor cores (fwd_tc.cu); the rest,
// and every dtype when GLM5_SPARSE_MLA_SIMT=1, on the CUDA-core kernels of kernels.cuh. Likewise the
// backward's per-query kernel: wgmma for D 192 / 576 with d_v % 64 == 0 (bwd_wgmma.cu), mma.sync for
// D % 16 == 0 and d_v % 16 == 0 (bwd_tc.cu); its sort and reduction are shared.
// Status: compiled for sm_90a, not yet verified on a GPU.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/cub.cuh>

#include <cmath>
#include <cstdlib>
#include <tuple>

#include "glm5/checks.h"
#include "glm5/sparse_mla_checks.h"
#include "../common/host_utils.h"
#include "bwd_tc.h"
#include "bwd_wgmma.h"
#include "fwd_tc.h"
#include "fwd_wgmma.h"
#include "host_params.h"
#include "kernels.cuh"
#include "plan.h"

namespace {

using namespace glm5::cuda;

using glm5::sparse_mla_checks::Dims;

Dims check_inputs(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& indices, double sm_scale,
                  int64_t d_v) {
  const Dims dm = glm5::sparse_mla_checks::fwd_args(q, kv, indices, sm_scale, d_v, at::kCUDA);
  glm5::checked_int32(dm.H, "q.size(1) (H)");
  glm5::checked_int32(dm.D, "q.size(2) (D_qk)");
  glm5::checked_int32(dm.S, "kv.size(0) (S)");
  glm5::checked_int32(dm.K, "indices.size(1) (K)");
  TORCH_CHECK(dm.T < (int64_t(1) << 31), "q.size(0) (T) = ", dm.T, " does not fit in int32");
  return dm;
}

std::tuple<at::Tensor, at::Tensor> sparse_mla_fwd_cuda(const at::Tensor& q_in, const at::Tensor& kv_in,
                                                       const at::Tensor& indices_in, double sm_scale, int64_t d_v) {
  const Dims dm = check_inputs(q_in, kv_in, indices_in, sm_scale, d_v);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), kv = kv_in.contiguous(), indices = indices_in.contiguous();
  at::Tensor out = at::empty({dm.T, dm.H, d_v}, q.options());
  at::Tensor lse = at::empty({dm.T, dm.H}, q.options().dtype(acc_dtype(q.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  // bf16/fp16 fast paths: warpgroup MMA on Hopper for the GLM-5 shapes, mma.sync for the rest.
  if (sparse_mla_fwd_wgmma(q, kv, indices, sm_scale, out, lse)) return {out, lse};
  if (sparse_mla_fwd_tc(q, kv, indices, sm_scale, out, lse)) return {out, lse};
  const size_t limit = max_smem_optin(q.get_device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(q.scalar_type(), "sparse_mla_fwd", [&](auto t_tag, auto c_tag) {
    using T = decltype(t_tag);
    using ct = decltype(c_tag);
    SparseMlaFwdParams p = sparse_mla_fwd_params(q, kv, indices, sm_scale, out, lse);
    const SparseMlaSimtPlan plan = sparse_mla_fwd_plan(p.H, p.D, p.dv, limit, sparse_mla_fwd_smem<ct>);
    p.hb = plan.hb, p.bk = plan.bk, p.ld = plan.ld;
    const size_t smem = plan.smem;
    TORCH_CHECK(smem <= limit, "sparse_mla_fwd: D_qk = ", dm.D, " needs ", smem,
                " bytes of shared memory, more than this GPU's ", limit);
    auto kernel = sparse_mla_fwd_kernel<T, ct>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    const dim3 grid(unsigned(dm.T), unsigned((dm.H + p.hb - 1) / p.hb));
    kernel<<<grid, kSparseMlaThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

// The backward's chunk budget; GLM5_SPARSE_MLA_BWD_CHUNK_BYTES overrides it (as on the CPU).
int64_t bwd_chunk_bytes() {
  const char* env = std::getenv("GLM5_SPARSE_MLA_BWD_CHUNK_BYTES");
  return env != nullptr ? std::max<int64_t>(std::atoll(env), 1) : kSparseMlaBwdChunkBytes;
}

std::tuple<at::Tensor, at::Tensor> sparse_mla_bwd_contiguous(const at::Tensor& grad_out, const at::Tensor& q,
                                                             const at::Tensor& kv, const at::Tensor& indices,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             double sm_scale, const Dims& dm) {
  const auto acc = acc_dtype(q.scalar_type());
  at::Tensor dq_acc = at::zeros(q.sizes(), q.options().dtype(acc));
  at::Tensor dkv_acc = at::zeros(kv.sizes(), kv.options().dtype(acc));
  auto finish = [&] {
    return std::make_tuple(dq_acc.scalar_type() == q.scalar_type() ? dq_acc : dq_acc.to(q.scalar_type()),
                           dkv_acc.scalar_type() == kv.scalar_type() ? dkv_acc : dkv_acc.to(kv.scalar_type()));
  };
  if (dm.T == 0 || dm.H == 0 || dm.D == 0 || dm.K == 0 || dm.S == 0) return finish();
  const size_t limit = max_smem_optin(q.get_device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t esize = int64_t(c10::elementSize(acc));
  const int64_t chunk = sparse_mla_bwd_chunk(bwd_chunk_bytes(), dm.T, dm.K, dm.D, esize);
  // Checked once: the sort handles at most chunk * K < 2^31 slots (int32 row numbers).
  const int64_t n_max = chunk * dm.K;
  TORCH_CHECK(n_max < (int64_t(1) << 31), "sparse_mla_bwd: chunk of ", n_max, " slots does not fit in int32");
  at::Tensor rows = at::empty({n_max, dm.D}, q.options().dtype(acc));
  auto opts_i = q.options().dtype(at::kInt);
  at::Tensor keys_in = at::empty({n_max}, opts_i), keys_out = at::empty({n_max}, opts_i);
  at::Tensor vals_in = at::empty({n_max}, opts_i), vals_out = at::empty({n_max}, opts_i);
  int end_bit = 1;
  while ((int64_t(1) << end_bit) <= dm.S) ++end_bit;  // keys are in [0, S]
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, (const uint32_t*)nullptr, (uint32_t*)nullptr,
                                                 (const int32_t*)nullptr, (int32_t*)nullptr, n_max, 0, end_bit,
                                                 stream));
  at::Tensor temp = at::empty({int64_t(temp_bytes) + 1}, q.options().dtype(at::kByte));

  dispatch_float(q.scalar_type(), "sparse_mla_bwd", [&](auto t_tag, auto c_tag) {
    using T = decltype(t_tag);
    using ct = decltype(c_tag);
    SparseMlaBwdParams p = sparse_mla_bwd_params(grad_out, q, kv, indices, out, lse, sm_scale, dq_acc, rows);
    const SparseMlaSimtPlan plan = sparse_mla_bwd_plan(p.H, p.D, p.dv, limit, sparse_mla_bwd_smem<ct>);
    p.hb = plan.hb, p.bk = plan.bk, p.ld = plan.ld, p.ldv = plan.ldv;
    const size_t smem = plan.smem;
    TORCH_CHECK(smem <= limit, "sparse_mla_bwd: D_qk = ", dm.D, ", H = ", dm.H, " need ", smem,
                " bytes of shared memory, more than this GPU's ", limit);
    auto kernel = sparse_mla_bwd_kernel<T, ct>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));

    SparseMlaReduceParams r{};
    r.sorted_keys = reinterpret_cast<const uint32_t*>(keys_out.data_ptr<int32_t>());
    r.sorted_rows = vals_out.data_ptr<int32_t>();
    r.rows = rows.data_ptr();
    r.dkv_acc = dkv_acc.data_ptr();
    r.S = p.S, r.D = p.D;
    for (int64_t c0 = 0; c0 < dm.T; c0 += chunk) {
      const int64_t c1 = std::min(dm.T, c0 + chunk), n = (c1 - c0) * dm.K;
      p.t0 = c0, p.t1 = c1;
      // Tensor cores when supported: wgmma (bwd_wgmma.h), else mma.sync (bwd_tc.h).
      if (!sparse_mla_bwd_wgmma(p, q.scalar_type(), stream) && !sparse_mla_bwd_tc(p, q.scalar_type(), stream)) {
        kernel<<<unsigned(c1 - c0), kSparseMlaThreads, smem, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      auto* kin = reinterpret_cast<uint32_t*>(keys_in.data_ptr<int32_t>());
      auto* kout = reinterpret_cast<uint32_t*>(keys_out.data_ptr<int32_t>());
      const int blocks = int(std::min<int64_t>((n + 255) / 256, 4096));
      sparse_mla_sort_keys_kernel<<<blocks, 256, 0, stream>>>(p.indices + c0 * dm.K, n, p.S, kin,
                                                              vals_in.data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      size_t bytes = temp_bytes;
      C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.data_ptr(), bytes, kin, kout, vals_in.data_ptr<int32_t>(),
                                                     vals_out.data_ptr<int32_t>(), n, 0, end_bit, stream));
      r.n = n;
      sparse_mla_reduce_kernel<ct><<<unsigned(dm.S), 128, 0, stream>>>(r);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return finish();
}

std::tuple<at::Tensor, at::Tensor> sparse_mla_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                                                       const at::Tensor& kv, const at::Tensor& indices,
                                                       const at::Tensor& out, const at::Tensor& lse, double sm_scale,
                                                       int64_t d_v) {
  const Dims dm = check_inputs(q, kv, indices, sm_scale, d_v);
  glm5::sparse_mla_checks::bwd_args(grad_out, out, lse, q, dm, acc_dtype(q.scalar_type()));
  const c10::cuda::CUDAGuard guard(q.device());
  return sparse_mla_bwd_contiguous(grad_out.contiguous(), q.contiguous(), kv.contiguous(), indices.contiguous(),
                                   out.contiguous(), lse.contiguous(), sm_scale, dm);
}

}  // namespace

TORCH_LIBRARY_IMPL(glm5, CUDA, m) {
  m.impl("sparse_mla_fwd", &sparse_mla_fwd_cuda);
  m.impl("sparse_mla_bwd", &sparse_mla_bwd_cuda);
}
