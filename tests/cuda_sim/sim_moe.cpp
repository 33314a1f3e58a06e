// The MoE CUDA kernels of csrc/cuda/moe (route.cuh, permute.cuh, unpermute.cuh, grouped_gemm.cuh) on
// the CPU simulator, bound to Python for test_sim_moe.py. Each binding mirrors its host launcher in
// csrc/cuda/moe/api.cu: the same parameter blocks, allocations, launch order, grids, blocks and shared
// memory; the router's warps, permute's counter placement and row-copy width and the grid-stride block
// counts come from the launcher's own plan (csrc/cuda/moe/plan.h). Two knobs reach paths the small test
// shapes would not: smem_limit (the router's 48 KiB bound, which picks 4 warps or 1 per block) and
// counter_smem_limit (moe_permute's 32 KiB bound for per-chunk counters in shared memory, else in global
// memory). No cub device-wide call is replaced:
// the kernels' cub::BlockScan runs in the simulator (cuda_sim.h). The CUTLASS path of the
// bf16 GEMMs is not simulated (its argument kernels are: sim_moe_cutlass_args.cpp); every dtype here
// takes the SIMT kernels, as bf16 does on a GPU for shapes CUTLASS does not take.
//
// Outputs that api.cu allocates with at::empty start as 0xff bytes here (NaN, or -1 as an integer),
// so an element a kernel never writes cannot pass for a zero.
#include "cuda_sim.h"
// clang-format off: the simulator must come first
#include "../../csrc/cuda/moe/grouped_gemm.cuh"
#include "../../csrc/cuda/moe/permute.cuh"
#include "../../csrc/cuda/moe/plan.h"
#include "../../csrc/cuda/moe/route.cuh"
#include "../../csrc/cuda/moe/unpermute.cuh"
// clang-format on

#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <tuple>

namespace {

using namespace glm5::moe;

constexpr double kRouteNormEps = 1e-20;  // reference.ROUTE_NORM_EPS

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Calls f(T{}) with the CUDA element type of dtype (as api.cu's AT_DISPATCH + Native).
template <typename F>
void dispatch(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    case at::kHalf: f(__half{}); break;
    default: TORCH_CHECK(false, "unsupported dtype ", dtype);
  }
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

at::Tensor garbage(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  at::Tensor t = at::empty(sizes, opt);
  if (t.numel() > 0) std::memset(t.data_ptr(), 0xff, t.nbytes());
  return t;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

// ---- moe_route ------------------------------------------------------------------------------------

// (topk_idx, topk_w, warps per block). smem_limit plays api.cu's 48 KiB bound.
std::tuple<at::Tensor, at::Tensor, int64_t> moe_route(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                                      int64_t topk, int64_t n_group, int64_t topk_group, bool norm,
                                                      double scale, int64_t smem_limit) {
  check_cpu(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && topk >= 1 && topk <= logits.size(1) && n_group >= 1 &&
                  logits.size(1) % n_group == 0 && topk_group >= 1 && topk_group <= n_group,
              "bad routing arguments");
  const int64_t N = logits.size(0), E = logits.size(1);
  const at::ScalarType acc = acc_type(logits.scalar_type());
  const at::Tensor lc = logits.contiguous();
  const at::Tensor b = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  at::Tensor topk_idx = garbage({N, topk}, logits.options().dtype(at::kInt));
  at::Tensor topk_w = garbage({N, topk}, logits.options().dtype(acc));
  const int64_t acc_bytes = acc == at::kDouble ? 8 : 4;
  const MoeRoutePlan plan = moe_route_plan(n_group, acc_bytes, smem_limit);
  const int warps = plan.warps;
  const int64_t smem = plan.smem;
  TORCH_CHECK_VALUE(smem <= smem_limit, "n_group=", n_group, " is too large for the CUDA router");
  if (N == 0) return {topk_idx, topk_w, warps};
  const int64_t blocks = ceil_div<int64_t>(N, warps);
  dispatch(lc.scalar_type(), [&](auto tag) {
    using in_t = decltype(tag);
    using acc_t = typename AccOf<in_t>::type;
    RouteParams<in_t, acc_t> p{};
    p.logits = ptr<in_t>(lc);
    p.bias = b.defined() ? b.data_ptr<acc_t>() : nullptr;
    p.topk_idx = topk_idx.data_ptr<int32_t>();
    p.topk_w = topk_w.data_ptr<acc_t>();
    p.N = N;
    p.E = static_cast<int32_t>(E);
    p.topk = static_cast<int32_t>(topk);
    p.n_group = static_cast<int32_t>(n_group);
    p.topk_group = static_cast<int32_t>(topk_group);
    p.norm = norm;
    p.scale = static_cast<acc_t>(scale);
    p.norm_eps = static_cast<acc_t>(kRouteNormEps);
    glm5_sim::launch(dim3(unsigned(blocks)), dim3(warps * 32), size_t(smem), [&] { moe_route_kernel<in_t, acc_t>(p); });
  });
  return {topk_idx, topk_w, warps};
}

// The router's scores sigmoid_acc(to_acc(logit)) as the kernel computes them (in the accumulator type).
at::Tensor route_scores(const at::Tensor& logits) {
  check_cpu(logits, "logits");
  const at::Tensor lc = logits.contiguous();
  at::Tensor out = at::empty(lc.sizes(), lc.options().dtype(acc_type(lc.scalar_type())));
  dispatch(lc.scalar_type(), [&](auto tag) {
    using in_t = decltype(tag);
    using acc_t = typename AccOf<in_t>::type;
    const in_t* x = ptr<in_t>(lc);
    acc_t* y = out.data_ptr<acc_t>();
    for (int64_t i = 0; i < lc.numel(); ++i) y[i] = sigmoid_acc(to_acc(x[i]));
  });
  return out;
}

// ---- moe_permute ----------------------------------------------------------------------------------

template <typename vec_t>
void launch_copy_rows(const RowCopyParams& p) {
  glm5_sim::launch(dim3(moe_launch_blocks(p.rows, 8)), dim3(256), 0, [&] { permute_copy_rows_kernel<vec_t>(p); });
}

// (x_sorted, row_map, offsets, counts, bytes per copy of the row copy kernel (0: no copy)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t> moe_permute(const at::Tensor& x,
                                                                                 const at::Tensor& topk_idx,
                                                                                 int64_t num_experts, int64_t alignment,
                                                                                 int64_t counter_smem_limit) {
  check_cpu(x, "x");
  check_cpu(topk_idx, "topk_idx");
  TORCH_CHECK(x.dim() == 2 && topk_idx.dim() == 2 && topk_idx.scalar_type() == at::kInt &&
                  topk_idx.size(0) == x.size(0) && num_experts >= 1 && alignment >= 1,
              "bad moe_permute arguments");
  const int64_t N = x.size(0), D = x.size(1), k = topk_idx.size(1), E = num_experts, A = alignment;
  const at::Tensor xc = x.contiguous(), idx = topk_idx.contiguous();
  const int64_t capacity = N * k + E * (A - 1);
  TORCH_CHECK(capacity <= INT32_MAX && E <= INT32_MAX, "sizes");

  const auto opt_i32 = idx.options();
  at::Tensor x_sorted = garbage({capacity, D}, x.options());
  at::Tensor row_map = garbage({N, k}, opt_i32);
  at::Tensor offsets = garbage({E + 1}, opt_i32.dtype(at::kLong));
  at::Tensor counts = garbage({E}, opt_i32.dtype(at::kLong));
  at::Tensor src_token = at::full({capacity}, -1, opt_i32);
  const int64_t L = N * k, n_chunks = ceil_div<int64_t>(L, kPermuteChunk);
  at::Tensor chunk_counts = garbage({std::max<int64_t>(n_chunks, 1) * E}, opt_i32);

  PermuteParams p{};
  p.topk_idx = idx.data_ptr<int32_t>();
  p.L = L;
  p.k = static_cast<int32_t>(std::max<int64_t>(k, 1));
  p.E = static_cast<int32_t>(E);
  p.alignment = A;
  p.n_chunks = n_chunks;
  p.chunk_counts = chunk_counts.data_ptr<int32_t>();
  p.counts = counts.data_ptr<int64_t>();
  p.offsets = offsets.data_ptr<int64_t>();
  p.row_map = row_map.data_ptr<int32_t>();
  p.src_token = src_token.data_ptr<int32_t>();
  const MoePermutePlan plan = moe_permute_plan(E, counter_smem_limit);
  const bool use_smem = plan.use_smem;
  const size_t smem = plan.smem;
  if (n_chunks > 0)
    glm5_sim::launch(dim3(unsigned(n_chunks)), dim3(32), smem, [&] { permute_count_kernel(p, use_smem); });
  glm5_sim::launch(dim3(1), dim3(kPermuteScanThreads), 0, [&] { permute_scan_kernel(p); });
  if (n_chunks > 0)
    glm5_sim::launch(dim3(unsigned(n_chunks)), dim3(32), smem, [&] { permute_place_kernel(p, use_smem); });
  RowCopyParams c{};
  c.x = static_cast<const char*>(xc.data_ptr());
  c.x_sorted = static_cast<char*>(x_sorted.data_ptr());
  c.src_token = p.src_token;
  c.rows = capacity;
  c.row_bytes = D * x.element_size();
  int64_t vec = 0;
  if (capacity > 0 && c.row_bytes > 0) {
    const auto src = reinterpret_cast<uintptr_t>(c.x), dst = reinterpret_cast<uintptr_t>(c.x_sorted);
    vec = moe_row_copy_width(c.row_bytes, src, dst);
    switch (vec) {
      case 16: launch_copy_rows<uint4>(c); break;
      case 8: launch_copy_rows<uint2>(c); break;
      case 4: launch_copy_rows<uint32_t>(c); break;
      case 2: launch_copy_rows<uint16_t>(c); break;
      default: launch_copy_rows<uint8_t>(c); break;
    }
  }
  return {x_sorted, row_map, offsets, counts, vec};
}

// ---- moe_unpermute and its backward ---------------------------------------------------------------

void check_unpermute(const at::Tensor& y, const at::Tensor& row_map, const at::Tensor& w) {
  check_cpu(y, "y_sorted");
  TORCH_CHECK(y.dim() == 2 && row_map.dim() == 2 && row_map.scalar_type() == at::kInt && w.sizes() == row_map.sizes(),
              "bad moe_unpermute arguments");
}

at::Tensor moe_unpermute(const at::Tensor& y_sorted, const at::Tensor& row_map, const at::Tensor& topk_w) {
  check_unpermute(y_sorted, row_map, topk_w);
  const int64_t M = y_sorted.size(0), D = y_sorted.size(1), N = row_map.size(0), k = row_map.size(1);
  const at::Tensor yc = y_sorted.contiguous(), rmc = row_map.contiguous();
  const at::Tensor wc = topk_w.to(acc_type(y_sorted.scalar_type())).contiguous();
  at::Tensor out = garbage({N, D}, y_sorted.options());
  if (N == 0 || D == 0) return out;
  const int threads = static_cast<int>(std::min<int64_t>(kUnpermuteThreads, ceil_div<int64_t>(D, 32) * 32));
  dispatch(y_sorted.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using acc_t = typename AccOf<T>::type;
    UnpermuteParams<T, acc_t> p{};
    p.y = ptr<T>(yc);
    p.row_map = rmc.data_ptr<int32_t>();
    p.w = wc.data_ptr<acc_t>();
    p.out = ptr<T>(out);
    p.N = N, p.M = M, p.D = D;
    p.k = static_cast<int32_t>(k);
    glm5_sim::launch(dim3(unsigned(N)), dim3(threads), 0, [&] { moe_unpermute_kernel<T, acc_t>(p); });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_bwd(const at::Tensor& grad, const at::Tensor& y_sorted,
                                                     const at::Tensor& row_map, const at::Tensor& topk_w) {
  check_unpermute(y_sorted, row_map, topk_w);
  TORCH_CHECK(grad.dim() == 2 && grad.scalar_type() == y_sorted.scalar_type() && grad.size(0) == row_map.size(0) &&
                  grad.size(1) == y_sorted.size(1), "bad grad");
  const int64_t M = y_sorted.size(0), D = y_sorted.size(1), N = row_map.size(0), k = row_map.size(1);
  const at::Tensor gc = grad.contiguous(), yc = y_sorted.contiguous(), rmc = row_map.contiguous();
  const at::Tensor wc = topk_w.to(acc_type(y_sorted.scalar_type())).contiguous();
  at::Tensor dy = at::zeros({M, D}, y_sorted.options());  // as api.cu: rows no slot points at stay zero
  at::Tensor dw = garbage({N, k}, wc.options());
  if (N > 0 && k > 0) {
    dispatch(y_sorted.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using acc_t = typename AccOf<T>::type;
      UnpermuteParams<T, acc_t> p{};
      p.y = ptr<T>(yc);
      p.row_map = rmc.data_ptr<int32_t>();
      p.w = wc.data_ptr<acc_t>();
      p.grad = ptr<T>(gc);
      p.out = ptr<T>(dy);
      p.dw = dw.data_ptr<acc_t>();
      p.N = N, p.M = M, p.D = D;
      p.k = static_cast<int32_t>(k);
      glm5_sim::launch(dim3(unsigned(N)), dim3(kUnpermuteThreads), 0, [&] { moe_unpermute_bwd_kernel<T, acc_t>(p); });
    });
  }
  return {dy, dw.to(topk_w.scalar_type())};
}

// ---- grouped GEMMs --------------------------------------------------------------------------------

// (bounds [2, E]: start, end; tile_start [E+1]), as api.cu's group_layout.
std::tuple<at::Tensor, at::Tensor> group_layout(const at::Tensor& offsets, int64_t E, int64_t M) {
  check_cpu(offsets, "offsets");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.size(0) == E + 1 && E >= 1,
              "offsets must be int64 [E+1]");
  const at::Tensor oc = offsets.contiguous();
  at::Tensor bounds = garbage({2, E}, oc.options());
  at::Tensor tile_start = garbage({E + 1}, oc.options().dtype(at::kInt));
  GroupLayout p{};
  p.offsets = oc.data_ptr<int64_t>();
  p.start = bounds.data_ptr<int64_t>();
  p.end = p.start + E;
  p.tile_start = tile_start.data_ptr<int32_t>();
  p.E = static_cast<int32_t>(E);
  p.M = M;
  p.tile_m = kTileM;
  glm5_sim::launch(dim3(1), dim3(kLayoutThreads), 0, [&] { group_layout_kernel(p); });
  return {bounds, tile_start};
}

at::Tensor grouped_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets, bool trans_w) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && w.scalar_type() == x.scalar_type(), "x [M, K], w [E, ., .]");
  const int64_t M = x.size(0), K = x.size(1), E = w.size(0);
  const int64_t wK = trans_w ? w.size(1) : w.size(2), Nout = trans_w ? w.size(2) : w.size(1);
  TORCH_CHECK(wK == K && offsets.numel() == E + 1, "shapes");
  at::Tensor y = garbage({M, Nout}, x.options());
  if (M == 0 || Nout == 0) return y;
  if (E == 0) return y.zero_();
  const at::Tensor xc = x.contiguous();
  const auto [bounds, tile_start] = group_layout(offsets, E, M);
  const int64_t* start = bounds.data_ptr<int64_t>();
  const int64_t* end = start + E;
  const int64_t m_tiles = ceil_div<int64_t>(M, kTileM) + E, n_tiles = ceil_div<int64_t>(Nout, kTileN);
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    glm5_sim::launch(dim3(moe_launch_blocks(M, 8)), dim3(256), 0,
                     [&] { zero_outside_groups_kernel<T>(ptr<T>(y), M, Nout, start, end, static_cast<int32_t>(E)); });
    GroupedGemmParams<T> p{};
    p.x = ptr<T>(xc);
    p.w = ptr<T>(w);  // any strides, as api.cu
    p.y = ptr<T>(y);
    p.w_se = w.stride(0);
    p.w_sn = trans_w ? w.stride(2) : w.stride(1);
    p.w_sk = trans_w ? w.stride(1) : w.stride(2);
    p.M = M, p.N = Nout, p.K = K;
    p.start = start;
    p.end = end;
    p.tile_start = tile_start.data_ptr<int32_t>();
    p.E = static_cast<int32_t>(E);
    glm5_sim::launch(dim3(unsigned(m_tiles), unsigned(n_tiles)), dim3(kGemmThreads), 0,
                     [&] { grouped_gemm_simt_kernel<T>(p); });
  });
  return y;
}

at::Tensor grouped_gemm_wgrad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& offsets) {
  check_cpu(dy, "dy");
  TORCH_CHECK(dy.dim() == 2 && x.dim() == 2 && x.size(0) == dy.size(0) && x.scalar_type() == dy.scalar_type() &&
                  offsets.dim() == 1 && offsets.size(0) >= 2, "shapes");
  const int64_t M = dy.size(0), N = dy.size(1), K = x.size(1), E = offsets.size(0) - 1;
  at::Tensor dw = garbage({E, N, K}, dy.options());
  if (N == 0 || K == 0) return dw;
  if (M == 0) return dw.zero_();
  const at::Tensor dyc = dy.contiguous(), xc = x.contiguous();
  const auto [bounds, tile_start] = group_layout(offsets, E, M);
  const int64_t k_tiles = ceil_div<int64_t>(K, kTileM), n_tiles = ceil_div<int64_t>(N, kTileN);
  dispatch(dy.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    GroupedWgradParams<T> p{};
    p.dy = ptr<T>(dyc);
    p.x = ptr<T>(xc);
    p.dw = ptr<T>(dw);
    p.M = M, p.N = N, p.K = K;
    p.start = bounds.data_ptr<int64_t>();
    p.end = p.start + E;
    p.E = static_cast<int32_t>(E);
    glm5_sim::launch(dim3(unsigned(E * k_tiles), unsigned(n_tiles)), dim3(kGemmThreads), 0,
                     [&] { grouped_wgrad_simt_kernel<T>(p); });
  });
  return dw;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("moe_route", &moe_route, "moe_route_kernel as api.cu launches it: (topk_idx, topk_w, warps per block)");
  m.def("route_scores", &route_scores, "the router kernel's sigmoid of every logit, in the accumulator type");
  m.def("moe_permute", &moe_permute,
        "count, scan, place and row-copy kernels: (x_sorted, row_map, offsets, counts, copy width in bytes)");
  m.def("moe_unpermute", &moe_unpermute);
  m.def("moe_unpermute_bwd", &moe_unpermute_bwd, "(dy, dtopk_w)");
  m.def("group_layout", &group_layout, "group_layout_kernel: (bounds [2, E] = start, end; tile_start [E+1])");
  m.def("grouped_gemm", &grouped_gemm,
        "the SIMT path: group layout, zero outside the groups, grouped_gemm_simt_kernel");
  m.def("grouped_gemm_wgrad", &grouped_gemm_wgrad, "the SIMT path: group layout, grouped_wgrad_simt_kernel");
  m.attr("kPermuteChunk") = kPermuteChunk;
  m.attr("kTileM") = kTileM;
}
