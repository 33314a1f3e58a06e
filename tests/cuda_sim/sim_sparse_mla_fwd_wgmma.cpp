// The warpgroup-MMA sparse MLA forward compiled for the CPU simulator (cuda_sim.h, whose wgmma runs from
// the shared-memory descriptors) and bound to Python for test_sim_sparse_mla_fwd_wgmma.py; it mirrors
// the host launcher (fwd_wgmma.cu): parameter block, grid, block, shared memory and the plan of plan.h.
#include "cuda_sim.h"
// clang-format off: the simulator must come first
#include "../../csrc/cuda/sparse_mla/fwd_wgmma_kernel.cuh"
#include "../../csrc/cuda/sparse_mla/plan.h"
// clang-format on

#include <torch/extension.h>

#include "../../csrc/cuda/sparse_mla/host_params.h"

#include <tuple>

namespace {

using namespace glm5::cuda;
using namespace glm5::cuda::sparse_mla_wgmma;

constexpr size_t kH200SmemOptin = 232448;

// sparse_mla_fwd_wgmma on CPU tensors (bf16 or fp16); shapes outside the kernel's plan are refused.
std::tuple<at::Tensor, at::Tensor> sparse_mla_fwd_wgmma(const at::Tensor& q, const at::Tensor& kv,
                                                        const at::Tensor& indices, double sm_scale, int64_t dv) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, "bf16 or fp16");
  const int nv = sparse_mla_fwd_wgmma_nv(q.size(2), dv, kH200SmemOptin, smem_bytes);
  TORCH_CHECK(nv != 0 && indices.size(1) > 0, "shape outside the wgmma kernel's plan");
  const at::Tensor qc = q.contiguous(), kvc = kv.contiguous(), ic = indices.contiguous();
  at::Tensor out = at::empty({q.size(0), q.size(1), dv}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  SparseMlaFwdParams p = sparse_mla_fwd_params(qc, kvc, ic, sm_scale, out, lse);
  const dim3 grid(unsigned(p.T), unsigned((p.H + kHeads - 1) / kHeads));
  sparse_mla_with_nv(nv, [&](auto n) {
    constexpr int NV = decltype(n)::value;
    auto run = [&](auto tag) {
      using T = decltype(tag);
      glm5_sim::launch(grid, dim3(kThreads), smem_bytes(p.D), [&] { sparse_mla_fwd_wgmma_kernel<T, NV>(p); });
    };
    if (q.scalar_type() == at::kBFloat16) run(__nv_bfloat16{});
    else run(__half{});
  });
  return {out, lse};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("sparse_mla_fwd_wgmma", &sparse_mla_fwd_wgmma); }
