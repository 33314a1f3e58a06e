// The indexer KL loss CUDA kernels of csrc/cuda/indexer_loss/kernels.cuh on the CPU simulator, bound to
// Python for test_sim_indexer_loss.py. The bindings mirror the host launcher (csrc/cuda/indexer_loss/api.cu):
// same parameter block, input conversions, tiling search (loss_pick_tiling), grids, blocks and sort chunking.
// The one substitution: cub::DeviceRadixSort (a stable sort of the slots by key) is std::stable_sort.
// target_chunk > 0 also mirrors api.cu's wgmma target: with fp32 accumulation and bf16/fp16 q, kv
// (D % 64 == 0) the kernels run per chunk of that many queries, reading P from the simulated
// warpgroup-MMA kernel (probs_wgmma_kernel.cuh).
// smem_limit plays the device's opt-in shared-memory limit (232448 bytes on an H100/H200); a smaller one
// forces smaller tilings (fewer keys per tile, several chunks of q's heads).
#include "cuda_sim.h"
// clang-format off: the simulator must come first
#include "../../csrc/cuda/indexer_loss/kernels.cuh"
#include "../../csrc/cuda/indexer_loss/probs_wgmma_kernel.cuh"
// clang-format on

#include <torch/extension.h>

#include "../../csrc/cuda/indexer_loss/probs_params.h"

#include <algorithm>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using namespace glm5::cuda;

at::ScalarType acc_type(const at::Tensor& q_idx) {
  return q_idx.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// api.cu's dispatch_types: f(Ti{}, Tm{}, ct{}).
template <typename F>
void dispatch_types(at::ScalarType indexer_dtype, bool main_same, F&& f) {
  switch (indexer_dtype) {
    case at::kFloat: f(float{}, float{}, float{}); break;
    case at::kDouble: f(double{}, double{}, double{}); break;
    case at::kBFloat16:
      if (main_same) f(__nv_bfloat16{}, __nv_bfloat16{}, float{}); else f(__nv_bfloat16{}, float{}, float{});
      break;
    case at::kHalf:
      if (main_same) f(__half{}, __half{}, float{}); else f(__half{}, float{}, float{});
      break;
    default: TORCH_CHECK(false, "unsupported dtype ", indexer_dtype);
  }
}

struct Inputs {
  at::Tensor q_idx, k_idx, w, q, kv, lse, ks, ke, indices;
  bool main_same = true;
  int64_t T = 0, S = 0, K = 0;
};

// api.cu's prepare + make_params (the tests pass well-formed CPU tensors; the op's checks are tested elsewhere).
Inputs prepare(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w, const at::Tensor& q,
               const at::Tensor& kv, const at::Tensor& lse, const at::Tensor& ks, const at::Tensor& ke,
               const std::optional<at::Tensor>& indices) {
  const auto acc = acc_type(q_idx);
  Inputs in;
  in.main_same = q.scalar_type() == q_idx.scalar_type();
  in.q_idx = q_idx.contiguous();
  in.k_idx = k_idx.contiguous();
  in.w = w.contiguous();
  in.q = in.main_same ? q.contiguous() : q.to(acc).contiguous();
  in.kv = in.main_same ? kv.contiguous() : kv.to(acc).contiguous();
  in.lse = lse.to(acc).contiguous();
  in.ks = ks.contiguous();
  in.ke = ke.contiguous();
  if (indices.has_value()) in.indices = indices->contiguous();
  in.T = q_idx.size(0), in.S = k_idx.size(0), in.K = indices.has_value() ? indices->size(1) : 0;
  return in;
}

IndexerLossParams make_params(const Inputs& in, double sm_scale) {
  IndexerLossParams p{};
  p.q_idx = in.q_idx.data_ptr();
  p.k_idx = in.k_idx.data_ptr();
  p.w = in.w.data_ptr();
  p.q = in.q.data_ptr();
  p.kv = in.kv.data_ptr();
  p.lse = in.lse.data_ptr();
  p.ks = in.ks.data_ptr<int32_t>();
  p.ke = in.ke.data_ptr<int32_t>();
  p.indices = in.indices.defined() ? in.indices.data_ptr<int32_t>() : nullptr;
  p.T = in.T;
  p.q0 = 0, p.q1 = in.T;
  p.S = int(in.S), p.HI = int(in.q_idx.size(1)), p.DI = int(in.q_idx.size(2)), p.H = int(in.q.size(1));
  p.D = int(in.q.size(2)), p.K = int(in.K);
  p.sm_scale = sm_scale;
  p.ldm = odd_stride(p.D);
  p.ldi = odd_stride(p.DI);
  return p;
}

// The target P of queries [q0, q1) from the warpgroup-MMA kernel into P [q1 - q0, ld], launched as
// probs_wgmma.cu launches it (indices undefined: dense sets).
void probs_into(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& lse, const at::Tensor& indices,
                const at::Tensor& ks, const at::Tensor& ke, double sm_scale, int64_t q0, int64_t q1, at::Tensor& P) {
  namespace pw = glm5::cuda::indexer_probs_wgmma;
  const pw::Params p = pw::make_params(q, kv, lse, indices, ks, ke, sm_scale, q0, P);
  auto go = [&](auto tag) {
    using T = decltype(tag);
    glm5_sim::launch(dim3(unsigned(q1 - q0)), dim3(pw::kThreads), pw::smem_bytes(p.D),
                     [&] { pw::head_summed_probs_wgmma_kernel<T>(p); });
  };
  if (q.scalar_type() == at::kBFloat16) go(__nv_bfloat16{});
  else go(__half{});
}

// P [T, width] of every query's set (sparse: width K; dense: S), NaN past each set's positions.
at::Tensor probs(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& lse,
                 const std::optional<at::Tensor>& indices, const at::Tensor& ks, const at::Tensor& ke,
                 double sm_scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, "bf16 or fp16 q");
  TORCH_CHECK(q.size(2) % 64 == 0 && q.size(1) > 0, "shape outside the kernel's plan");
  const at::Tensor qc = q.contiguous(), kvc = kv.contiguous(), lc = lse.to(at::kFloat).contiguous();
  const at::Tensor ic = indices.has_value() ? indices->contiguous() : at::Tensor();
  const int64_t width = ic.defined() ? ic.size(1) : kv.size(0);
  at::Tensor P = at::full({q.size(0), width}, NAN, q.options().dtype(at::kFloat));
  probs_into(qc, kvc, lc, ic, ks.contiguous(), ke.contiguous(), sm_scale, 0, q.size(0), P);
  return P;
}

// api.cu's plan_target + for_query_chunks: with target_chunk > 0 and inputs the wgmma target takes, calls
// launch() per chunk of that many queries after filling p.P_pre; otherwise once over every query.
template <typename F>
void for_query_chunks(IndexerLossParams& p, const Inputs& in, const at::Tensor& q, const at::Tensor& kv,
                      double sm_scale, int64_t target_chunk, F&& launch) {
  const auto dt = q.scalar_type();
  const bool wgmma = target_chunk > 0 && in.lse.scalar_type() == at::kFloat &&
                     (dt == at::kBFloat16 || dt == at::kHalf) && kv.scalar_type() == dt && q.size(1) > 0 &&
                     q.size(2) % 64 == 0;
  if (!wgmma) {
    p.q0 = 0, p.q1 = in.T;
    launch();
    return;
  }
  const at::Tensor qc = q.contiguous(), kvc = kv.contiguous();
  const int64_t chunk = std::min(target_chunk, in.T), width = in.indices.defined() ? in.K : in.S;
  at::Tensor P = at::full({chunk, width}, NAN, qc.options().dtype(at::kFloat));
  p.P_pre = P.data_ptr<float>();
  p.P_ld = width;
  for (int64_t q0 = 0; q0 < in.T; q0 += chunk) {
    p.q0 = q0, p.q1 = std::min(in.T, q0 + chunk);
    probs_into(qc, kvc, in.lse, in.indices, in.ks, in.ke, sm_scale, p.q0, p.q1, P);
    launch();
  }
}

bool nothing_to_do(const Inputs& in) { return in.T == 0 || in.S == 0 || (in.indices.defined() && in.K == 0); }

template <typename SmemFn>
size_t pick(IndexerLossParams& p, size_t limit, const SmemFn& smem) {
  const size_t bytes = loss_pick_tiling(p, limit, smem);
  TORCH_CHECK(bytes <= limit, "too much shared memory");
  return bytes;
}

// The per-query losses and the tiling (bs, hb) the launch used.
std::tuple<at::Tensor, std::vector<int64_t>> fwd(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w,
                                                 const at::Tensor& q, const at::Tensor& kv, const at::Tensor& lse,
                                                 const at::Tensor& ks, const at::Tensor& ke, double sm_scale,
                                                 const std::optional<at::Tensor>& indices, int64_t smem_limit,
                                                 int64_t target_chunk) {
  const Inputs in = prepare(q_idx, k_idx, w, q, kv, lse, ks, ke, indices);
  std::vector<int64_t> tiling;
  if (nothing_to_do(in)) return {at::zeros({in.T}, q_idx.options().dtype(acc_type(q_idx))), tiling};
  at::Tensor loss = at::empty({in.T}, q_idx.options().dtype(acc_type(q_idx)));
  IndexerLossParams p = make_params(in, sm_scale);
  p.loss = loss.data_ptr();
  dispatch_types(q_idx.scalar_type(), in.main_same, [&](auto ti, auto tm, auto tc) {
    using Ti = decltype(ti);
    using Tm = decltype(tm);
    using ct = decltype(tc);
    const size_t smem = pick(p, size_t(smem_limit), loss_fwd_smem<ct>);
    for_query_chunks(p, in, q, kv, sm_scale, target_chunk, [&] {
      glm5_sim::launch(dim3(unsigned(p.q1 - p.q0)), dim3(kLossThreads), smem,
                       [&] { indexer_loss_fwd_kernel<Ti, Tm, ct>(p); });
    });
    tiling = {p.bs, p.hb};
  });
  return {loss, tiling};
}

// api.cu's sparse_dk with a CPU stable sort in place of cub's.
template <typename Ti, typename ct>
void sparse_dk(IndexerLossParams p, const Inputs& in, int64_t sort_entries) {
  const int64_t chunk = std::clamp<int64_t>(std::max<int64_t>(sort_entries, 1) / in.K, 1, in.T);
  const int64_t n_max = chunk * in.K;
  std::vector<uint32_t> keys(n_max), keys_sorted(n_max);
  std::vector<int32_t> slots(n_max), slots_sorted(n_max), order(n_max);
  const size_t smem = loss_dk_sparse_smem<ct>(p);
  p.sorted_keys = keys_sorted.data();
  p.sorted_slots = slots_sorted.data();
  for (int64_t c0 = 0; c0 < in.T; c0 += chunk) {
    p.t0 = c0;
    p.n = (std::min(in.T, c0 + chunk) - c0) * in.K;
    const unsigned blocks = unsigned(std::min<int64_t>((p.n + 255) / 256, 4096));
    glm5_sim::launch(dim3(blocks), dim3(256), 0,
                     [&] { indexer_loss_slot_keys_kernel(p, keys.data(), slots.data()); });
    std::iota(order.begin(), order.begin() + p.n, 0);
    std::stable_sort(order.begin(), order.begin() + p.n, [&](int32_t a, int32_t b) { return keys[a] < keys[b]; });
    for (int64_t i = 0; i < p.n; ++i) {
      keys_sorted[i] = keys[order[i]];
      slots_sorted[i] = slots[order[i]];
    }
    glm5_sim::launch(dim3(unsigned(in.S)), dim3(kLossReduceThreads), smem,
                     [&] { indexer_loss_bwd_dk_sparse_kernel<Ti, ct>(p); });
  }
}

// dq_idx, dk_idx, dw (the indexer's dtype, as the op returns them) and the tilings (query bs, hb; dk bs, hb).
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<int64_t>> bwd(
    const at::Tensor& grad, const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w, const at::Tensor& q,
    const at::Tensor& kv, const at::Tensor& lse, const at::Tensor& ks, const at::Tensor& ke, double sm_scale,
    const std::optional<at::Tensor>& indices, int64_t smem_limit, int64_t sort_entries, int64_t target_chunk) {
  const Inputs in = prepare(q_idx, k_idx, w, q, kv, lse, ks, ke, indices);
  const auto acc = acc_type(q_idx);
  const auto opts = q_idx.options().dtype(acc);
  at::Tensor dq = at::zeros(q_idx.sizes(), opts);
  at::Tensor dk = at::zeros(k_idx.sizes(), opts);
  at::Tensor dw = at::zeros(w.sizes(), opts);
  std::vector<int64_t> tiling;
  if (!nothing_to_do(in)) {
    const bool sparse = in.indices.defined();
    const at::Tensor g = grad.to(acc).contiguous();
    at::Tensor stats = at::empty({in.T, 4}, opts);
    at::Tensor dI = sparse ? at::zeros({in.T, in.K}, opts) : at::Tensor();
    IndexerLossParams p = make_params(in, sm_scale);
    p.grad = g.data_ptr();
    p.dq = dq.data_ptr();
    p.dw = dw.data_ptr();
    p.dk = dk.data_ptr();
    p.stats = stats.data_ptr();
    p.dI = sparse ? dI.data_ptr() : nullptr;
    dispatch_types(q_idx.scalar_type(), in.main_same, [&](auto ti, auto tm, auto tc) {
      using Ti = decltype(ti);
      using Tm = decltype(tm);
      using ct = decltype(tc);
      IndexerLossParams pk = p;
      const size_t smem_k = sparse ? 0 : pick(pk, size_t(smem_limit), loss_dk_dense_smem<ct>);
      const size_t smem = pick(p, size_t(smem_limit), loss_bwd_query_smem<ct>);
      tiling = {p.bs, p.hb};
      if (!sparse) tiling.insert(tiling.end(), {pk.bs, pk.hb});
      for_query_chunks(p, in, q, kv, sm_scale, target_chunk, [&] {
        glm5_sim::launch(dim3(unsigned(p.q1 - p.q0)), dim3(kLossThreads), smem,
                         [&] { indexer_loss_bwd_query_kernel<Ti, Tm, ct>(p); });
        if (!sparse) {
          pk.q0 = p.q0, pk.q1 = p.q1, pk.P_pre = p.P_pre, pk.P_ld = p.P_ld;
          glm5_sim::launch(dim3(unsigned((in.S + pk.bs - 1) / pk.bs)), dim3(kLossThreads), smem_k,
                           [&] { indexer_loss_bwd_dk_dense_kernel<Ti, Tm, ct>(pk); });
        }
      });
      if (sparse) sparse_dk<Ti, ct>(p, in, sort_entries);
    });
  }
  return {dq.to(q_idx.scalar_type()), dk.to(k_idx.scalar_type()), dw.to(w.scalar_type()), tiling};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("fwd", &fwd, py::arg("q_idx"), py::arg("k_idx"), py::arg("w"), py::arg("q"), py::arg("kv"), py::arg("lse"),
        py::arg("ks"), py::arg("ke"), py::arg("sm_scale"), py::arg("indices"), py::arg("smem_limit"),
        py::arg("target_chunk") = 0);
  m.def("bwd", &bwd, py::arg("grad"), py::arg("q_idx"), py::arg("k_idx"), py::arg("w"), py::arg("q"), py::arg("kv"),
        py::arg("lse"), py::arg("ks"), py::arg("ke"), py::arg("sm_scale"), py::arg("indices"), py::arg("smem_limit"),
        py::arg("sort_entries"), py::arg("target_chunk") = 0);
  m.def("probs", &probs);
}
