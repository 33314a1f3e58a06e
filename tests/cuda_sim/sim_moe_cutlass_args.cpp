// The device-side argument kernels of the CUTLASS grouped GEMMs (csrc/cuda/moe/grouped_gemm_cutlass_args.cuh)
// on the CPU simulator, bound to Python for test_sim_moe.py. CUTLASS's GEMM itself cannot run here;
// these bindings launch what grouped_gemm_cutlass.h / grouped_gemm_cutlass_wgrad.cu launch before it
// (the same strides, buffer carving, grids and blocks) and read the arrays back for the test: every
// group's (M, N, K), its A / B / D pointers as element offsets from the base pointers, and its
// A / B / D strides over CuTe's modes (A: M, K, L; B: N, K, L; D: M, N, L).
// Needs the CCCL and CUTLASS headers (include paths from the test).
#include "cuda_sim.h"
// clang-format off: the simulator must come first
#include "../../csrc/cuda/moe/grouped_gemm_cutlass_args.cuh"
// clang-format on

#include <torch/extension.h>

#include <cstring>
#include <tuple>
#include <vector>

namespace {

using namespace glm5::moe::cutlass_gemm;

template <class Stride>
void put_stride(int64_t* out, const Stride& s) {
  out[0] = static_cast<int64_t>(cute::get<0>(s));
  out[1] = static_cast<int64_t>(cute::get<1>(s));
  out[2] = static_cast<int64_t>(cute::get<2>(s));
}

using Arrays3 = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<int64_t>>;

// shapes [E, 3], pointer offsets [E, 3] (A, B, D; elements), strides [E, 3, 3] (A, B, D over three modes),
// and the byte offsets of the seven arrays in the buffer followed by the buffer's size.
template <class P>
Arrays3 read_back(const typename P::Arrays& a, const void* buffer, int64_t E, const void* base_a, const void* base_b,
                  const void* base_d) {
  at::Tensor shapes = at::empty({E, 3}, at::kLong), ptrs = at::empty({E, 3}, at::kLong);
  at::Tensor strides = at::empty({E, 3, 3}, at::kLong);
  using El = typename P::Element;
  for (int64_t e = 0; e < E; ++e) {
    int64_t* s = shapes.data_ptr<int64_t>() + 3 * e;
    s[0] = cute::get<0>(a.shapes[e]), s[1] = cute::get<1>(a.shapes[e]), s[2] = cute::get<2>(a.shapes[e]);
    int64_t* p = ptrs.data_ptr<int64_t>() + 3 * e;
    p[0] = a.ptr_a[e] - static_cast<const El*>(base_a);
    p[1] = a.ptr_b[e] - static_cast<const El*>(base_b);
    p[2] = a.ptr_d[e] - static_cast<const El*>(base_d);
    int64_t* st = strides.data_ptr<int64_t>() + 9 * e;
    put_stride(st, a.stride_a[e]);
    put_stride(st + 3, a.stride_b[e]);
    put_stride(st + 6, a.stride_d[e]);
  }
  const auto* b = static_cast<const char*>(buffer);
  const auto off = [&](const void* p) { return static_cast<int64_t>(static_cast<const char*>(p) - b); };
  std::vector<int64_t> layout = {off(a.shapes),   off(a.ptr_a),    off(a.ptr_b),   off(a.ptr_d),
                                 off(a.stride_a), off(a.stride_b), off(a.stride_d)};
  layout.push_back(static_cast<int64_t>(P::arrays_bytes(E)));
  return {shapes, ptrs, strides, layout};
}

at::Tensor garbage_bytes(int64_t n) {
  at::Tensor t = at::empty({n}, at::kByte);
  std::memset(t.data_ptr(), 0xff, n);
  return t;
}

void check_bounds(const at::Tensor& start, const at::Tensor& end, int64_t E) {
  TORCH_CHECK(start.scalar_type() == at::kLong && end.scalar_type() == at::kLong && start.is_contiguous() &&
                  end.is_contiguous() && start.numel() == E && end.numel() == E && E >= 1,
              "start / end: contiguous int64 [E]");
}

// run_grouped_gemm_bf16's arguments: x [M, K] and y [M, N] (only y's base pointer is used), w [E, N, K]
// (or [E, K, N] with trans_w), start / end the experts' row ranges from the group layout.
template <bool TransW>
Arrays3 forward_arrays_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& start, const at::Tensor& end,
                            const at::Tensor& y) {
  using P = ForwardProblem<TransW>;
  using El = typename P::Element;
  const int64_t E = w.size(0), K = x.size(1), N = y.size(1);
  const Strides<P> strides = forward_strides<TransW>(N, K);
  at::Tensor buf = garbage_bytes(static_cast<int64_t>(P::arrays_bytes(E)));
  const typename P::Arrays a = P::carve(buf.data_ptr(), E);
  const auto* xp = reinterpret_cast<const El*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const El*>(w.data_ptr());
  auto* yp = reinterpret_cast<El*>(y.data_ptr());
  const int64_t w_se = w.stride(0);
  const int64_t* sp = start.data_ptr<int64_t>();
  const int64_t* ep = end.data_ptr<int64_t>();
  glm5_sim::launch(dim3(fill_blocks(E)), dim3(kFillThreads), 0, [&] {
    fill_forward_arrays_kernel<P>(a, sp, ep, static_cast<int32_t>(E), xp, wp, w_se, yp, static_cast<int32_t>(N),
                                  static_cast<int32_t>(K), strides);
  });
  return read_back<P>(a, buf.data_ptr(), E, xp, wp, yp);
}

Arrays3 forward_arrays(const at::Tensor& x, const at::Tensor& w, const at::Tensor& start, const at::Tensor& end,
                       const at::Tensor& y, bool trans_w) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && y.scalar_type() == at::kBFloat16,
              "bf16 (the CUTLASS path's dtype)");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && y.dim() == 2 && y.size(0) == x.size(0) &&
                  x.size(1) == (trans_w ? w.size(1) : w.size(2)) && y.size(1) == (trans_w ? w.size(2) : w.size(1)),
              "x [M, K], w [E, N, K] / [E, K, N], y [M, N]");
  check_bounds(start, end, w.size(0));
  return trans_w ? forward_arrays_impl<true>(x, w, start, end, y) : forward_arrays_impl<false>(x, w, start, end, y);
}

// grouped_gemm_wgrad_bf16_cutlass's arguments, and its zero_empty_experts_kernel run on dw (in place).
Arrays3 wgrad_arrays(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& start, const at::Tensor& end,
                     at::Tensor& dw) {
  using P = WgradProblem;
  using El = P::Element;
  TORCH_CHECK(dy.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 &&
                  dw.scalar_type() == at::kBFloat16,
              "bf16 (the CUTLASS path's dtype)");
  const int64_t E = dw.size(0), N = dy.size(1), K = x.size(1);
  TORCH_CHECK(dw.is_contiguous() && dw.dim() == 3 && dw.size(1) == N && dw.size(2) == K && x.size(0) == dy.size(0),
              "dy [M, N], x [M, K], dw [E, N, K] contiguous");
  TORCH_CHECK(K % P::kAlign == 0 && N % P::kAlign == 0, "N and K multiples of 8 (the host's condition for CUTLASS)");
  check_bounds(start, end, E);
  const Strides<P> strides = wgrad_strides(N, K);
  at::Tensor buf = garbage_bytes(static_cast<int64_t>(P::arrays_bytes(E)));
  const P::Arrays a = P::carve(buf.data_ptr(), E);
  const auto* dyp = reinterpret_cast<const El*>(dy.data_ptr());
  const auto* xp = reinterpret_cast<const El*>(x.data_ptr());
  auto* dwp = reinterpret_cast<El*>(dw.data_ptr());
  const int64_t* sp = start.data_ptr<int64_t>();
  const int64_t* ep = end.data_ptr<int64_t>();
  const int32_t e32 = static_cast<int32_t>(E), n32 = static_cast<int32_t>(N), k32 = static_cast<int32_t>(K);
  glm5_sim::launch(dim3(fill_blocks(E)), dim3(kFillThreads), 0,
                   [&] { fill_wgrad_arrays_kernel<P>(a, sp, ep, e32, dyp, xp, dwp, n32, k32, strides); });
  const int64_t words = N * K * static_cast<int64_t>(sizeof(El)) / 16;
  glm5_sim::launch(zero_empty_grid(words, E), dim3(kZeroThreads), 0,
                   [&] { zero_empty_experts_kernel<uint4>(reinterpret_cast<uint4*>(dwp), words, sp, ep, e32); });
  return read_back<P>(a, buf.data_ptr(), E, dyp, xp, dwp);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward_arrays", &forward_arrays,
        "fill_forward_arrays_kernel: (shapes [E,3], A/B/D element offsets [E,3], strides [E,3,3], buffer layout)");
  m.def("wgrad_arrays", &wgrad_arrays,
        "fill_wgrad_arrays_kernel, then zero_empty_experts_kernel on dw: (shapes, offsets, strides, buffer layout)");
}
