// The warpgroup-MMA sparse MLA backward kernel (csrc/cuda/sparse_mla/bwd_wgmma_kernel.cuh) on the CPU
// simulator, launched as bwd_wgmma.cu launches it (one CTA per query of the chunk, kThreads threads, the
// plan of plan.h) and bound to Python for test_sim_sparse_mla_bwd_wgmma.py.
#include "cuda_sim.h"
// clang-format off: the simulator must come first
#include "../../csrc/cuda/sparse_mla/bwd_wgmma_kernel.cuh"
#include "../../csrc/cuda/sparse_mla/plan.h"
// clang-format on

#include <torch/extension.h>

#include "../../csrc/cuda/sparse_mla/host_params.h"

#include <tuple>

namespace {

using namespace glm5::cuda;
using namespace glm5::cuda::sparse_mla_wgmma_bwd;

constexpr size_t kH200SmemOptin = 232448;

size_t smem_of(int D, int dv) { return Layout(D, dv).bytes; }

// The kernel's raw outputs for the queries [t0, t1), as sim_sparse_mla_bwd_tc.cpp: dq_acc [T, H, D] fp32
// (other queries' rows stay NaN) and the chunk's rows [(t1 - t0) * K, D] fp32, NaN where never written.
std::tuple<at::Tensor, at::Tensor> sparse_mla_bwd_wgmma(const at::Tensor& grad_out, const at::Tensor& q,
                                                        const at::Tensor& kv, const at::Tensor& indices,
                                                        const at::Tensor& out, const at::Tensor& lse,
                                                        double sm_scale, int64_t dv, int64_t t0, int64_t t1) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, "bf16 or fp16");
  TORCH_CHECK(kv.scalar_type() == q.scalar_type() && grad_out.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type() && lse.scalar_type() == at::kFloat,
              "dtypes");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), K = indices.size(1);
  const int ncb = sparse_mla_bwd_wgmma_ncb(D, dv, kH200SmemOptin, smem_of);
  TORCH_CHECK(ncb != 0 && K > 0 && 0 <= t0 && t0 < t1 && t1 <= T, "shape outside the wgmma kernel's plan");
  const at::Tensor gc = grad_out.contiguous(), qc = q.contiguous(), kvc = kv.contiguous(), ic = indices.contiguous();
  const at::Tensor oc = out.contiguous(), lc = lse.contiguous();
  at::Tensor dq = at::full({T, H, D}, NAN, q.options().dtype(at::kFloat));
  at::Tensor rows = at::full({(t1 - t0) * K, D}, NAN, q.options().dtype(at::kFloat));
  SparseMlaBwdParams p = sparse_mla_bwd_params(gc, qc, kvc, ic, oc, lc, sm_scale, dq, rows);
  p.t0 = t0, p.t1 = t1;
  const size_t smem = smem_of(p.D, p.dv);
  sparse_mla_with_ncb(ncb, [&](auto n) {
    constexpr int NCB = decltype(n)::value;
    auto go = [&](auto tag) {
      using T = decltype(tag);
      glm5_sim::launch(dim3(unsigned(t1 - t0)), dim3(kThreads), smem, [&] { sparse_mla_bwd_wgmma_kernel<T, NCB>(p); });
    };
    if (q.scalar_type() == at::kBFloat16) go(__nv_bfloat16{});
    else go(__half{});
  });
  return {dq, rows};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("sparse_mla_bwd_wgmma", &sparse_mla_bwd_wgmma); }
