// The tensor-core sparse MLA backward kernel (csrc/cuda/sparse_mla/bwd_tc_kernel.cuh) on the CPU
// simulator, launched as bwd_tc.cu launches it (one CTA per query of the chunk, kThreads threads, the
// shared-memory layout of pick_mt's head group) and bound to Python for test_sim_sparse_mla_bwd_tc.py.
#include "cuda_sim.h"
// clang-format off: the simulator must come first
#include "../../csrc/cuda/sparse_mla/bwd_tc_kernel.cuh"
// clang-format on

#include <torch/extension.h>

#include "../../csrc/cuda/sparse_mla/host_params.h"

#include <tuple>

namespace {

using namespace glm5::cuda;
using namespace glm5::cuda::sparse_mla_tc_bwd;

// The kernel's raw outputs for the queries [t0, t1): dq_acc [T, H, D] fp32 (rows of other queries stay
// NaN) and the chunk's rows [(t1 - t0) * K, D] fp32, NaN where the kernel wrote nothing. mt = 0 picks
// the head group as the launcher does for smem_limit bytes of shared memory.
std::tuple<at::Tensor, at::Tensor, int64_t> sparse_mla_bwd_tc(const at::Tensor& grad_out, const at::Tensor& q,
                                                              const at::Tensor& kv, const at::Tensor& indices,
                                                              const at::Tensor& out, const at::Tensor& lse,
                                                              double sm_scale, int64_t dv, int64_t t0, int64_t t1,
                                                              int64_t smem_limit, int64_t mt) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, "bf16 or fp16");
  TORCH_CHECK(kv.scalar_type() == q.scalar_type() && grad_out.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type() && lse.scalar_type() == at::kFloat,
              "dtypes");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), K = indices.size(1);
  TORCH_CHECK(D % 16 == 0 && dv % 16 == 0 && dv <= D && K > 0 && 0 <= t0 && t0 < t1 && t1 <= T, "unsupported");
  if (mt == 0) mt = pick_mt(int(H), int(D), int(dv), size_t(smem_limit));
  TORCH_CHECK(mt >= 1 && mt <= kMaxMt, "no head group fits");
  const int ncg = kWarps / int(mt);
  TORCH_CHECK((D / 16 + ncg - 1) / ncg <= kMaxPairsPerWarp, "dq of this head group does not fit the registers");
  const at::Tensor gc = grad_out.contiguous(), qc = q.contiguous(), kvc = kv.contiguous(), ic = indices.contiguous();
  const at::Tensor oc = out.contiguous(), lc = lse.contiguous();
  at::Tensor dq = at::full({T, H, D}, NAN, q.options().dtype(at::kFloat));
  at::Tensor rows = at::full({(t1 - t0) * K, D}, NAN, q.options().dtype(at::kFloat));
  SparseMlaBwdParams p = sparse_mla_bwd_params(gc, qc, kvc, ic, oc, lc, sm_scale, dq, rows);
  p.t0 = t0, p.t1 = t1;
  const size_t smem = SmemLayout(16 * int(mt), p.D, p.dv).total;
  const int m = int(mt);
  auto go = [&](auto tag) {
    using T = decltype(tag);
    glm5_sim::launch(dim3(unsigned(t1 - t0)), dim3(kThreads), smem, [&] { sparse_mla_bwd_tc_kernel<T>(p, m); });
  };
  if (q.scalar_type() == at::kBFloat16) go(__nv_bfloat16{});
  else go(__half{});
  return {dq, rows, mt};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("sparse_mla_bwd_tc", &sparse_mla_bwd_tc); }
