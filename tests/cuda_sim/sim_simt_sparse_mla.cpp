// The CUDA-core (SIMT) sparse MLA kernels of csrc/cuda/sparse_mla/kernels.cuh on the CPU simulator,
// bound to Python for test_sim_simt_sparse_mla.py. The bindings mirror the SIMT paths of the host
// launcher (csrc/cuda/sparse_mla/api.cu): same parameter blocks, grids and blocks; the tiling search and
// the backward chunking are the launcher's own (csrc/cuda/sparse_mla/plan.h). The one substitution:
// cub::DeviceRadixSort (a stable sort of the slots by key) is a stable torch sort on the CPU. smem_limit
// plays the device's opt-in shared-memory limit (232448 bytes on an H100/H200); a smaller one forces the
// launcher's smaller tilings.
#include "cuda_sim.h"
// clang-format off: the simulator must come first
#include "../../csrc/cuda/sparse_mla/kernels.cuh"
#include "../../csrc/cuda/sparse_mla/plan.h"
// clang-format on

#include <torch/extension.h>

#include "../../csrc/cuda/sparse_mla/host_params.h"

#include <algorithm>
#include <tuple>

namespace {

using namespace glm5::cuda;

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Calls f(T{}, ct{}) with the CUDA storage type of dtype and its compute type (as api.cu).
template <typename F>
void dispatch_float(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}, float{}); break;
    case at::kDouble: f(double{}, double{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}, float{}); break;
    case at::kHalf: f(__half{}, float{}); break;
    default: TORCH_CHECK(false, "unsupported dtype ", dtype);
  }
}

void check_cpu_inputs(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& indices, int64_t dv) {
  TORCH_CHECK(q.device().is_cpu() && kv.device().is_cpu() && indices.device().is_cpu(), "CPU tensors");
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 2 && indices.dim() == 2, "q [T, H, D], kv [S, D], indices [T, K]");
  TORCH_CHECK(kv.scalar_type() == q.scalar_type() && indices.scalar_type() == at::kInt, "dtypes");
  TORCH_CHECK(kv.size(1) == q.size(2) && indices.size(0) == q.size(0), "shapes");
  TORCH_CHECK(dv >= 1 && dv <= q.size(2), "d_v");
}

// out, lse and the tiling (hb, bk, ld) the launch used.
std::tuple<at::Tensor, at::Tensor, std::vector<int64_t>> sparse_mla_fwd(const at::Tensor& q_in, const at::Tensor& kv_in,
                                                                        const at::Tensor& indices_in, double sm_scale,
                                                                        int64_t dv, int64_t smem_limit) {
  check_cpu_inputs(q_in, kv_in, indices_in, dv);
  const at::Tensor q = q_in.contiguous(), kv = kv_in.contiguous(), indices = indices_in.contiguous();
  at::Tensor out = at::empty({q.size(0), q.size(1), dv}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(acc_dtype(q.scalar_type())));
  std::vector<int64_t> tiling;
  if (out.numel() == 0) return {out, lse, tiling};
  dispatch_float(q.scalar_type(), [&](auto t_tag, auto c_tag) {
    using T = decltype(t_tag);
    using ct = decltype(c_tag);
    SparseMlaFwdParams p = sparse_mla_fwd_params(q, kv, indices, sm_scale, out, lse);
    const SparseMlaSimtPlan plan = sparse_mla_fwd_plan(p.H, p.D, p.dv, size_t(smem_limit), sparse_mla_fwd_smem<ct>);
    TORCH_CHECK(plan.smem <= size_t(smem_limit), "sparse_mla_fwd: too much shared memory");
    p.hb = plan.hb, p.bk = plan.bk, p.ld = plan.ld;
    const size_t smem = plan.smem;
    const dim3 grid(unsigned(p.T), unsigned((p.H + p.hb - 1) / p.hb));
    glm5_sim::launch(grid, dim3(kSparseMlaThreads), smem, [&] { sparse_mla_fwd_kernel<T, ct>(p); });
    tiling = {p.hb, p.bk, p.ld};
  });
  return {out, lse, tiling};
}

// dq, dkv (storage dtype, as the op returns them) and the tiling (hb, bk, ld, ldv, queries per chunk).
std::tuple<at::Tensor, at::Tensor, std::vector<int64_t>> sparse_mla_bwd(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& kv_in, const at::Tensor& indices_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, double sm_scale, int64_t dv, int64_t chunk_bytes,
    int64_t smem_limit) {
  check_cpu_inputs(q_in, kv_in, indices_in, dv);
  const at::Tensor grad_out = grad_out_in.contiguous(), q = q_in.contiguous(), kv = kv_in.contiguous();
  const at::Tensor indices = indices_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  const auto acc = acc_dtype(q.scalar_type());
  TORCH_CHECK(lse.scalar_type() == acc && out.scalar_type() == q.scalar_type() &&
                  grad_out.scalar_type() == q.scalar_type(), "out / grad_out / lse dtypes");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), S = kv.size(0), K = indices.size(1);
  at::Tensor dq_acc = at::zeros(q.sizes(), q.options().dtype(acc));
  at::Tensor dkv_acc = at::zeros(kv.sizes(), kv.options().dtype(acc));
  std::vector<int64_t> tiling;
  auto finish = [&] { return std::make_tuple(dq_acc.to(q.scalar_type()), dkv_acc.to(kv.scalar_type()), tiling); };
  if (T == 0 || H == 0 || D == 0 || K == 0 || S == 0) return finish();
  const int64_t esize = int64_t(c10::elementSize(acc));
  const int64_t chunk = sparse_mla_bwd_chunk(chunk_bytes, T, K, D, esize);
  const int64_t n_max = chunk * K;
  TORCH_CHECK(n_max < (int64_t(1) << 31), "chunk does not fit in int32");
  at::Tensor rows = at::empty({n_max, D}, q.options().dtype(acc));
  at::Tensor keys_in = at::empty({n_max}, q.options().dtype(at::kInt));
  at::Tensor vals_in = at::empty({n_max}, q.options().dtype(at::kInt));

  dispatch_float(q.scalar_type(), [&](auto t_tag, auto c_tag) {
    using T_ = decltype(t_tag);
    using ct = decltype(c_tag);
    SparseMlaBwdParams p = sparse_mla_bwd_params(grad_out, q, kv, indices, out, lse, sm_scale, dq_acc, rows);
    const SparseMlaSimtPlan plan = sparse_mla_bwd_plan(p.H, p.D, p.dv, size_t(smem_limit), sparse_mla_bwd_smem<ct>);
    TORCH_CHECK(plan.smem <= size_t(smem_limit), "sparse_mla_bwd: too much shared memory");
    p.hb = plan.hb, p.bk = plan.bk, p.ld = plan.ld, p.ldv = plan.ldv;
    const size_t smem = plan.smem;
    tiling = {p.hb, p.bk, p.ld, p.ldv, chunk};

    SparseMlaReduceParams r{};
    r.rows = rows.data_ptr();
    r.dkv_acc = dkv_acc.data_ptr();
    r.S = p.S, r.D = p.D;
    for (int64_t c0 = 0; c0 < T; c0 += chunk) {
      const int64_t c1 = std::min(T, c0 + chunk), n = (c1 - c0) * K;
      p.t0 = c0, p.t1 = c1;
      glm5_sim::launch(dim3(unsigned(c1 - c0)), dim3(kSparseMlaThreads), smem,
                       [&] { sparse_mla_bwd_kernel<T_, ct>(p); });
      auto* kin = reinterpret_cast<uint32_t*>(keys_in.data_ptr<int32_t>());
      int32_t* vin = vals_in.data_ptr<int32_t>();
      const int blocks = int(std::min<int64_t>((n + 255) / 256, 4096));
      glm5_sim::launch(dim3(unsigned(blocks)), dim3(256), 0,
                       [&] { sparse_mla_sort_keys_kernel(p.indices + c0 * K, n, p.S, kin, vin); });
      // cub::DeviceRadixSort::SortPairs on keys in [0, S]: a stable ascending sort of (key, row).
      // Keys fit in int31 (S < 2^31), so their int32 view sorts the same as uint32.
      const auto [keys_out, perm] = at::sort(keys_in.narrow(0, 0, n), /*stable=*/true, /*dim=*/0, /*descending=*/false);
      const at::Tensor vals_out = vals_in.narrow(0, 0, n).index_select(0, perm).contiguous();
      const at::Tensor keys_sorted = keys_out.contiguous();
      r.sorted_keys = reinterpret_cast<const uint32_t*>(keys_sorted.data_ptr<int32_t>());
      r.sorted_rows = vals_out.data_ptr<int32_t>();
      r.n = n;
      glm5_sim::launch(dim3(unsigned(p.S)), dim3(128), 0, [&] { sparse_mla_reduce_kernel<ct>(r); });
    }
  });
  return finish();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_mla_fwd", &sparse_mla_fwd, "the SIMT forward: (out, lse, [hb, bk, ld])");
  m.def("sparse_mla_bwd", &sparse_mla_bwd,
        "the SIMT backward, key sort and reduction: (dq, dkv, [hb, bk, ld, ldv, queries per chunk])");
  m.attr("kBwdChunkBytes") = kSparseMlaBwdChunkBytes;
}
