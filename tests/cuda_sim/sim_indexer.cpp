// The lightning-indexer CUDA kernels (tensor-core logits and top-k, SIMT logits and top-k) compiled for
// the CPU simulator (cuda_sim.h) and bound to Python for test_sim_indexer.py. Each binding mirrors its
// CUDA host launcher (tc.cu, api.cu): same parameter block, grid, block and shared-memory size, with
// the tile / buffer choices as arguments so the tests can cover every path.
#include "cuda_sim.h"

// clang-format off: the simulator must come first
#include "../../csrc/cuda/lightning_indexer/kernels.cuh"
#include "../../csrc/cuda/lightning_indexer/tc_kernels.cuh"
// clang-format on

#include <torch/extension.h>

#include "../../csrc/cuda/lightning_indexer/host_params.h"

#include <limits>
#include <tuple>

namespace {

using namespace glm5::cuda;

IndexerParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, const at::Tensor& ks,
                          const at::Tensor& ke) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && w.is_contiguous() && ks.is_contiguous() &&
              ke.is_contiguous(), "contiguous inputs");
  return indexer_params(q, k, w, ks, ke);
}

template <typename F>
void dispatch_tc(const at::Tensor& q, F&& f) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, "bf16 or fp16");
  TORCH_CHECK(q.size(1) % 16 == 0 && q.size(2) % 16 == 0 && q.size(2) <= 16 * kTcMaxKSteps, "unsupported shape");
  if (q.scalar_type() == at::kBFloat16) f(__nv_bfloat16{});
  else f(__half{});
}

template <typename F>
void dispatch_simt(const at::Tensor& q, F&& f) {
  switch (q.scalar_type()) {
    case at::kFloat: f(float{}, float{}); break;
    case at::kDouble: f(double{}, double{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}, float{}); break;
    default: TORCH_CHECK(false, "fp32, fp64 or bf16");
  }
}

at::Tensor logits_tc(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, const at::Tensor& ks,
                     const at::Tensor& ke, int64_t qb) {
  IndexerParams p = make_params(q, k, w, ks, ke);
  at::Tensor logits = at::empty({p.T, p.S}, q.options().dtype(at::kFloat));
  p.logits = logits.data_ptr();
  p.qb = int(std::min<int64_t>(qb, p.T));
  const dim3 grid(unsigned((p.T + p.qb - 1) / p.qb), unsigned((p.S + kTcTileKeys - 1) / kTcTileKeys));
  dispatch_tc(q, [&](auto tag) {
    using T = decltype(tag);
    glm5_sim::launch(grid, dim3(kTcThreads), tc_logits_smem(p.HI, p.DI).total,
                     [&] { indexer_logits_tc_kernel<T>(p); });
  });
  return logits;
}

std::tuple<at::Tensor, at::Tensor> topk_tc(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
                                           const at::Tensor& ks, const at::Tensor& ke, int64_t topk, int64_t qb,
                                           int64_t cap) {
  TORCH_CHECK(qb == 1 || qb == 2 || qb == 4, "qb: 1, 2 or 4");
  TORCH_CHECK(cap >= kTcTileKeys && cap <= kSortN, "cap: in [tile, kSortN]");
  IndexerParams p = make_params(q, k, w, ks, ke);
  at::Tensor idx = at::full({p.T, topk}, -7, q.options().dtype(at::kInt));  // every slot must be written
  at::Tensor val = at::full({p.T, topk}, 7.0, q.options().dtype(at::kFloat));
  p.topk = int(topk), p.cap = int(cap);
  p.out_idx = idx.data_ptr<int32_t>();
  p.out_val = val.data_ptr();
  const size_t smem = tc_topk_smem(int(qb), p.HI, p.DI, p.topk).total;
  const dim3 grid(unsigned((p.T + qb - 1) / qb));
  dispatch_tc(q, [&](auto tag) {
    using T = decltype(tag);
    switch (qb) {
      case 1: glm5_sim::launch(grid, dim3(kTcThreads), smem, [&] { indexer_topk_tc_kernel<T, 1>(p); }); break;
      case 2: glm5_sim::launch(grid, dim3(kTcThreads), smem, [&] { indexer_topk_tc_kernel<T, 2>(p); }); break;
      default: glm5_sim::launch(grid, dim3(kTcThreads), smem, [&] { indexer_topk_tc_kernel<T, 4>(p); }); break;
    }
  });
  return {idx, val};
}

at::Tensor logits_simt(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, const at::Tensor& ks,
                       const at::Tensor& ke, int64_t bs) {
  IndexerParams p = make_params(q, k, w, ks, ke);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor logits = at::empty({p.T, p.S}, q.options().dtype(acc));
  p.logits = logits.data_ptr();
  p.bs = int(bs);
  dispatch_simt(q, [&](auto t_tag, auto c_tag) {
    using T = decltype(t_tag);
    using ct = decltype(c_tag);
    const dim3 grid(unsigned(p.T), unsigned((p.S + p.bs - 1) / p.bs));
    glm5_sim::launch(grid, dim3(p.bs), indexer_logits_smem<ct>(p.HI, p.DI, p.bs, p.ldk),
                     [&] { indexer_logits_kernel<T, ct>(p); });
  });
  return logits;
}

std::tuple<at::Tensor, at::Tensor> topk_simt(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
                                             const at::Tensor& ks, const at::Tensor& ke, int64_t topk, int64_t bs,
                                             int64_t cap) {
  TORCH_CHECK(bs >= 1 && bs <= kIndexerThreads && cap >= kIndexerThreads && cap <= kSortN, "bs / cap");
  IndexerParams p = make_params(q, k, w, ks, ke);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor idx = at::full({p.T, topk}, -7, q.options().dtype(at::kInt));
  at::Tensor val = at::full({p.T, topk}, 7.0, q.options().dtype(acc));
  p.topk = int(topk), p.bs = int(bs), p.cap = int(cap);
  p.out_idx = idx.data_ptr<int32_t>();
  p.out_val = val.data_ptr();
  dispatch_simt(q, [&](auto t_tag, auto c_tag) {
    using T = decltype(t_tag);
    using ct = decltype(c_tag);
    glm5_sim::launch(dim3(unsigned(p.T)), dim3(kIndexerThreads),
                     indexer_topk_smem<ct>(p.HI, p.DI, p.bs, p.ldk, p.topk),
                     [&] { indexer_topk_kernel<T, ct>(p); });
  });
  return {idx, val};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("logits_tc", &logits_tc);
  m.def("topk_tc", &topk_tc);
  m.def("logits_simt", &logits_simt);
  m.def("topk_simt", &topk_simt);
}
