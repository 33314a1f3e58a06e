// The tensor-core sparse MLA forward compiled for the CPU simulator (cuda_sim.h) and bound to Python for
// test_sim_sparse_mla_fwd_tc.py; it mirrors the host launcher (fwd_tc.cu): parameter block, grid, block,
// and takes the m-tile count from the launcher's plan (csrc/cuda/sparse_mla/plan.h).
#include "cuda_sim.h"
// clang-format off: the simulator must come first
#include "../../csrc/cuda/sparse_mla/fwd_tc_kernel.cuh"
#include "../../csrc/cuda/sparse_mla/plan.h"
// clang-format on

#include <torch/extension.h>

#include "../../csrc/cuda/sparse_mla/host_params.h"

#include <tuple>

namespace {

using namespace glm5::cuda;

template <typename T, int MT>
void run_fwd_tc(const SparseMlaFwdParams& p) {
  const size_t smem = sparse_mla_tc::sparse_mla_fwd_tc_smem<MT>(p.D, sizeof(T));
  const dim3 grid(unsigned(p.T), unsigned((p.H + 16 * MT - 1) / (16 * MT)));
  glm5_sim::launch(grid, dim3(64 * MT), smem, [&] { sparse_mla_tc::sparse_mla_fwd_tc_kernel<T, MT>(p); });
}

// sparse_mla_fwd_tc on CPU tensors (bf16 or fp16, contiguous); the caller picks supported shapes.
std::tuple<at::Tensor, at::Tensor> sparse_mla_fwd_tc(const at::Tensor& q, const at::Tensor& kv,
                                                     const at::Tensor& indices, double sm_scale, int64_t dv) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, "bf16 or fp16");
  TORCH_CHECK(q.size(2) % 16 == 0 && dv % 32 == 0 && dv <= 512 && indices.size(1) > 0, "unsupported shape");
  const at::Tensor qc = q.contiguous(), kvc = kv.contiguous(), ic = indices.contiguous();
  at::Tensor out = at::empty({q.size(0), q.size(1), dv}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  SparseMlaFwdParams p = sparse_mla_fwd_params(qc, kvc, ic, sm_scale, out, lse);
  const int mt = sparse_mla_fwd_tc_mt(p.H);
  auto go = [&](auto tag) {
    using T = decltype(tag);
    sparse_mla_with_mt(mt, [&](auto m) { run_fwd_tc<T, decltype(m)::value>(p); });
  };
  if (q.scalar_type() == at::kBFloat16) go(__nv_bfloat16{});
  else go(__half{});
  return {out, lse};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("sparse_mla_fwd_tc", &sparse_mla_fwd_tc); }
