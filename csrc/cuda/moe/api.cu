// MoE ops on CUDA: host wrappers (checks -> device guard -> allocate -> params -> launch) for
// moe_route, moe_permute, moe_unpermute(_bwd), grouped_gemm and grouped_gemm_wgrad.
//
// Semantics and error messages are the CPU kernels' (csrc/cpu/moe.cpp). Shape, dtype and device
// checks run on the host as there. The checks that read tensor *values* (expert indices in range,
// row_map in range and without repeats, offsets in range and non-decreasing, NaN router logits)
// would need a device-to-host copy, i.e. a host synchronisation, so by default they do not run: the
// kernels are memory-safe for any values (out-of-range experts and rows count as dropped slots,
// offsets are clamped into [0, M] and made non-decreasing on the device, a NaN router row gets
// expert 0 with weight 0, as the CPU kernel writes before it raises). With GLM5_CUDA_VALIDATE=1 the
// wrappers copy those tensors to the host first and raise exactly the CPU kernels' errors (debug
// runs and the tests). Nothing else syncs with the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <glm5/checks.h>
#include <glm5/moe_checks.h>

#include <cstdlib>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/host_utils.h"
#include "grouped_gemm.cuh"
#include "permute.cuh"
#include "plan.h"
#include "route.cuh"
#include "unpermute.cuh"


#ifndef GLM5_DISABLE_CUTLASS_GROUPED_GEMM
namespace glm5::moe {
// grouped_gemm_cutlass_{nt,nn,wgrad}.cu: bf16 with CUTLASS 3's Hopper ptr-array grouped GEMM. They
// return false, having launched nothing, for problems outside their alignment rules, on a non-sm_90
// GPU, or if CUTLASS's can_implement refuses (then with a one-time warning); the caller then takes the
// SIMT kernel, which handles every input.
bool grouped_gemm_bf16_cutlass_nt(const at::Tensor& x, const at::Tensor& w, const at::Tensor& start,
                                  const at::Tensor& end, at::Tensor& y);
bool grouped_gemm_bf16_cutlass_nn(const at::Tensor& x, const at::Tensor& w, const at::Tensor& start,
                                  const at::Tensor& end, at::Tensor& y);
// dw[e] = dy[rows of e]^T @ x[rows of e] for every e, zeros for experts without rows.
bool grouped_gemm_wgrad_bf16_cutlass(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& start,
                                     const at::Tensor& end, at::Tensor& dw);
}  // namespace glm5::moe
#endif

namespace {

using namespace glm5::moe;
namespace moe_checks = glm5::moe_checks;

constexpr double kRouteNormEps = 1e-20;  // reference.ROUTE_NORM_EPS


// ATen element types -> CUDA's.
template <typename T>
struct Native {
  using type = T;
};
template <>
struct Native<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct Native<at::Half> {
  using type = __half;
};

template <typename T>
auto native_ptr(const at::Tensor& t) {
  return reinterpret_cast<typename Native<T>::type*>(t.data_ptr<T>());
}

// GLM5_CUDA_VALIDATE=1: check tensor values on the host (a synchronisation) with the CPU's errors.
bool validate_values() { return glm5::cuda::env_flag("GLM5_CUDA_VALIDATE"); }

// ---- checks: glm5/moe_checks.h, shared with csrc/cpu/moe.cpp ---------------------------------------
// Tensor values are checked (on the host, a synchronisation) only with GLM5_CUDA_VALIDATE.

void check_offsets(const at::Tensor& offsets, const at::Tensor& like, int64_t E, int64_t M) {
  moe_checks::offsets_shape(offsets, like, E);
  if (!validate_values()) return;
  const at::Tensor oc = offsets.cpu();
  moe_checks::offsets_values(oc.data_ptr<int64_t>(), E, M);
}

// ---- moe_route ------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> moe_route_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                                  int64_t topk, int64_t n_group, int64_t topk_group,
                                                  bool norm_topk_prob, double routed_scaling_factor) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  GLM5_CHECK_DEVICE_TYPE(logits, at::kCUDA);
  moe_checks::route_args(logits, bias, topk, n_group, topk_group);
  const int64_t N = logits.size(0), E = logits.size(1);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::ScalarType acc = glm5::cuda::acc_dtype(logits.scalar_type());
  const at::Tensor lc = logits.contiguous();
  const at::Tensor b = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  if (validate_values()) {
    const bool nan = at::isnan(lc).any().item<bool>() || (b.defined() && at::isnan(b).any().item<bool>());
    TORCH_CHECK_VALUE(!nan, "moe_route: NaN in logits or bias");
  }
  at::Tensor topk_idx = at::empty({N, topk}, logits.options().dtype(at::kInt));
  at::Tensor topk_w = at::empty({N, topk}, logits.options().dtype(acc));
  if (N == 0) return {topk_idx, topk_w};

  const int64_t acc_bytes = acc == at::kDouble ? 8 : 4;
  const MoeRoutePlan plan = moe_route_plan(n_group, acc_bytes, kMoeRouteSmemLimit);
  const int warps = plan.warps;
  const int64_t smem = plan.smem;
  TORCH_CHECK_VALUE(smem <= kMoeRouteSmemLimit, "n_group=", n_group, " is too large for the CUDA router (at most ",
                    kMoeRouteSmemLimit / acc_bytes, ")");
  const int64_t blocks = ceil_div<int64_t>(N, warps);
  TORCH_CHECK(blocks < (int64_t{1} << 31), "moe_route: too many tokens for one launch: ", N);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lc.scalar_type(), "moe_route_cuda", [&] {
    using in_t = typename Native<scalar_t>::type;
    using acc_t = typename AccOf<in_t>::type;
    RouteParams<in_t, acc_t> p{};
    p.logits = native_ptr<scalar_t>(lc);
    p.bias = b.defined() ? b.data_ptr<acc_t>() : nullptr;
    p.topk_idx = topk_idx.data_ptr<int32_t>();
    p.topk_w = topk_w.data_ptr<acc_t>();
    p.N = N;
    p.E = glm5::checked_int32(E, "num_experts");
    p.topk = static_cast<int32_t>(topk);
    p.n_group = static_cast<int32_t>(n_group);
    p.topk_group = static_cast<int32_t>(topk_group);
    p.norm = norm_topk_prob;
    p.scale = static_cast<acc_t>(routed_scaling_factor);
    p.norm_eps = static_cast<acc_t>(kRouteNormEps);
    moe_route_kernel<in_t, acc_t><<<static_cast<unsigned>(blocks), warps * 32, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {topk_idx, topk_w};
}

// ---- moe_permute ----------------------------------------------------------------------------------

template <typename vec_t>
void launch_copy_rows(const RowCopyParams& p, cudaStream_t stream) {
  permute_copy_rows_kernel<vec_t><<<moe_launch_blocks(p.rows, 8), 256, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_cuda(const at::Tensor& x, const at::Tensor& topk_idx,
                                                                int64_t num_experts, int64_t alignment) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  GLM5_CHECK_DEVICE_TYPE(x, at::kCUDA);
  GLM5_CHECK_NDIM(x, 2);
  GLM5_CHECK_FLOAT(x);
  GLM5_CHECK_SAME_DEVICE(topk_idx, x);
  GLM5_CHECK_NDIM(topk_idx, 2);
  GLM5_CHECK_DTYPE(topk_idx, at::kInt);
  GLM5_CHECK_SIZE(topk_idx, 0, x.size(0));
  TORCH_CHECK_VALUE(num_experts >= 1, "num_experts must be positive, got ", num_experts);
  TORCH_CHECK_VALUE(alignment >= 1, "alignment must be positive, got ", alignment);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), D = x.size(1), k = topk_idx.size(1), E = num_experts, A = alignment;
  const at::Tensor xc = x.contiguous(), idx = topk_idx.contiguous();
  if (validate_values()) moe_checks::expert_idx_values(idx.cpu(), E);
  const int64_t capacity = N * k + E * (A - 1);
  glm5::checked_int32(capacity, "moe_permute row");  // rows are int32 (row_map)
  glm5::checked_int32(E, "num_experts");

  const auto opt_i32 = idx.options();
  at::Tensor x_sorted = at::empty({capacity, D}, x.options());
  at::Tensor row_map = at::empty({N, k}, opt_i32);
  at::Tensor offsets = at::empty({E + 1}, opt_i32.dtype(at::kLong));
  at::Tensor counts = at::empty({E}, opt_i32.dtype(at::kLong));
  at::Tensor src_token = at::full({capacity}, -1, opt_i32);
  const int64_t L = N * k, n_chunks = ceil_div<int64_t>(L, kPermuteChunk);
  at::Tensor chunk_counts = at::empty({std::max<int64_t>(n_chunks, 1) * E}, opt_i32);

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
  const MoePermutePlan plan = moe_permute_plan(E, kMoePermuteCounterSmemLimit);
  const bool use_smem = plan.use_smem;  // else the counters live in chunk_counts
  const size_t smem = plan.smem;
  TORCH_CHECK(n_chunks < (int64_t{1} << 31), "moe_permute: too many slots for one launch: ", L);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (n_chunks > 0) {
    permute_count_kernel<<<static_cast<unsigned>(n_chunks), 32, smem, stream>>>(p, use_smem);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  permute_scan_kernel<<<1, kPermuteScanThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (n_chunks > 0) {
    permute_place_kernel<<<static_cast<unsigned>(n_chunks), 32, smem, stream>>>(p, use_smem);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  RowCopyParams c{};
  c.x = static_cast<const char*>(xc.data_ptr());
  c.x_sorted = static_cast<char*>(x_sorted.data_ptr());
  c.src_token = p.src_token;
  c.rows = capacity;
  c.row_bytes = D * x.element_size();
  if (capacity > 0 && c.row_bytes > 0) {
    const auto src = reinterpret_cast<uintptr_t>(c.x), dst = reinterpret_cast<uintptr_t>(c.x_sorted);
    switch (moe_row_copy_width(c.row_bytes, src, dst)) {
      case 16: launch_copy_rows<uint4>(c, stream); break;
      case 8: launch_copy_rows<uint2>(c, stream); break;
      case 4: launch_copy_rows<uint32_t>(c, stream); break;
      case 2: launch_copy_rows<uint16_t>(c, stream); break;
      default: launch_copy_rows<uint8_t>(c, stream); break;
    }
  }
  return {x_sorted, row_map, offsets};
}

// ---- moe_unpermute and its backward ---------------------------------------------------------------

at::Tensor moe_unpermute_cuda(const at::Tensor& y_sorted, const at::Tensor& row_map, const at::Tensor& topk_w) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  moe_checks::unpermute_args(y_sorted, row_map, topk_w, at::kCUDA);
  const c10::cuda::CUDAGuard guard(y_sorted.device());
  const int64_t M = y_sorted.size(0), D = y_sorted.size(1), N = row_map.size(0), k = row_map.size(1);
  const at::Tensor yc = y_sorted.contiguous(), rmc = row_map.contiguous();
  if (validate_values()) moe_checks::row_map_values(rmc.cpu(), M);
  const at::ScalarType acc = glm5::cuda::acc_dtype(y_sorted.scalar_type());
  const at::Tensor wc = topk_w.to(acc).contiguous();
  at::Tensor out = at::empty({N, D}, y_sorted.options());
  if (N == 0 || D == 0) return out;
  TORCH_CHECK(N < (int64_t{1} << 31), "moe_unpermute: too many tokens for one launch: ", N);
  const int threads = static_cast<int>(std::min<int64_t>(kUnpermuteThreads, ceil_div<int64_t>(D, 32) * 32));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y_sorted.scalar_type(), "moe_unpermute_cuda", [&] {
    using T = typename Native<scalar_t>::type;
    using acc_t = typename AccOf<T>::type;
    UnpermuteParams<T, acc_t> p{};
    p.y = native_ptr<scalar_t>(yc);
    p.row_map = rmc.data_ptr<int32_t>();
    p.w = wc.data_ptr<acc_t>();
    p.out = native_ptr<scalar_t>(out);
    p.N = N;
    p.M = M;
    p.D = D;
    p.k = static_cast<int32_t>(k);
    moe_unpermute_kernel<T, acc_t><<<static_cast<unsigned>(N), threads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_bwd_cuda(const at::Tensor& grad, const at::Tensor& y_sorted,
                                                          const at::Tensor& row_map, const at::Tensor& topk_w) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  moe_checks::unpermute_args(y_sorted, row_map, topk_w, at::kCUDA);
  GLM5_CHECK_SAME_DEVICE(grad, y_sorted);
  GLM5_CHECK_NDIM(grad, 2);
  GLM5_CHECK_SAME_DTYPE(grad, y_sorted);
  GLM5_CHECK_SIZE(grad, 0, row_map.size(0));
  GLM5_CHECK_SIZE(grad, 1, y_sorted.size(1));
  const c10::cuda::CUDAGuard guard(y_sorted.device());
  const int64_t M = y_sorted.size(0), D = y_sorted.size(1), N = row_map.size(0), k = row_map.size(1);
  const at::Tensor gc = grad.contiguous(), yc = y_sorted.contiguous(), rmc = row_map.contiguous();
  if (validate_values()) moe_checks::row_map_values(rmc.cpu(), M);
  const at::ScalarType acc = glm5::cuda::acc_dtype(y_sorted.scalar_type());
  const at::Tensor wc = topk_w.to(acc).contiguous();
  at::Tensor dy = at::zeros({M, D}, y_sorted.options());  // rows no slot points at get no gradient
  at::Tensor dw = at::empty({N, k}, wc.options());
  if (N > 0 && k > 0) {
    TORCH_CHECK(N < (int64_t{1} << 31), "moe_unpermute_bwd: too many tokens for one launch: ", N);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y_sorted.scalar_type(), "moe_unpermute_bwd_cuda", [&] {
      using T = typename Native<scalar_t>::type;
      using acc_t = typename AccOf<T>::type;
      UnpermuteParams<T, acc_t> p{};
      p.y = native_ptr<scalar_t>(yc);
      p.row_map = rmc.data_ptr<int32_t>();
      p.w = wc.data_ptr<acc_t>();
      p.grad = native_ptr<scalar_t>(gc);
      p.out = native_ptr<scalar_t>(dy);
      p.dw = dw.data_ptr<acc_t>();
      p.N = N;
      p.M = M;
      p.D = D;
      p.k = static_cast<int32_t>(k);
      moe_unpermute_bwd_kernel<T, acc_t><<<static_cast<unsigned>(N), kUnpermuteThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {dy, dw.to(topk_w.scalar_type())};
}

// ---- grouped GEMMs --------------------------------------------------------------------------------

struct Layout {
  at::Tensor bounds;      // int64 [2, E]: start, end
  at::Tensor tile_start;  // int32 [E+1]
  const int64_t* start() const { return bounds.data_ptr<int64_t>(); }
  const int64_t* end() const { return bounds.data_ptr<int64_t>() + bounds.size(1); }
};

Layout group_layout(const at::Tensor& offsets, int64_t E, int64_t M, cudaStream_t stream) {
  Layout l;
  const at::Tensor oc = offsets.contiguous();
  l.bounds = at::empty({2, E}, oc.options());
  l.tile_start = at::empty({E + 1}, oc.options().dtype(at::kInt));
  GroupLayout p{};
  p.offsets = oc.data_ptr<int64_t>();
  p.start = l.bounds.data_ptr<int64_t>();
  p.end = p.start + E;
  p.tile_start = l.tile_start.data_ptr<int32_t>();
  p.E = glm5::checked_int32(E, "num_experts");
  p.M = M;
  p.tile_m = kTileM;
  group_layout_kernel<<<1, kLayoutThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return l;
}

at::Tensor grouped_gemm_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets, bool trans_w) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  GLM5_CHECK_DEVICE_TYPE(x, at::kCUDA);
  GLM5_CHECK_NDIM(x, 2);
  GLM5_CHECK_FLOAT(x);
  GLM5_CHECK_SAME_DEVICE(w, x);
  GLM5_CHECK_NDIM(w, 3);
  GLM5_CHECK_SAME_DTYPE(w, x);
  const int64_t M = x.size(0), K = x.size(1), E = w.size(0);
  const int64_t wK = trans_w ? w.size(1) : w.size(2), Nout = trans_w ? w.size(2) : w.size(1);
  TORCH_CHECK(wK == K, "x.size(1)=", K, " must equal w's K=", wK, " (w shape ", w.sizes(), ", trans_w=", trans_w, ")");
  check_offsets(offsets, x, E, M);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({M, Nout}, x.options());
  if (M == 0 || Nout == 0) return y;
  if (E == 0) return y.zero_();  // no experts: every row is outside the groups
  const at::Tensor xc = x.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Layout l = group_layout(offsets, E, M, stream);

  const auto zero_outside = [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grouped_gemm_zero", [&] {
      using T = typename Native<scalar_t>::type;
      zero_outside_groups_kernel<T><<<moe_launch_blocks(M, 8), 256, 0, stream>>>(native_ptr<scalar_t>(y), M, Nout,
                                                                             l.start(), l.end(), static_cast<int32_t>(E));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  };
#ifndef GLM5_DISABLE_CUTLASS_GROUPED_GEMM
  if (x.scalar_type() == at::kBFloat16) {
    const at::Tensor start = l.bounds[0], end = l.bounds[1];
    if (trans_w ? grouped_gemm_bf16_cutlass_nn(xc, w, start, end, y) : grouped_gemm_bf16_cutlass_nt(xc, w, start, end, y)) {
      zero_outside();
      return y;
    }
  }
#endif
  zero_outside();
  const int64_t m_tiles = ceil_div<int64_t>(M, kTileM) + E, n_tiles = ceil_div<int64_t>(Nout, kTileN);
  TORCH_CHECK(m_tiles < (int64_t{1} << 31) && n_tiles <= 65535, "grouped_gemm: problem too large for one launch: M=",
              M, ", N=", Nout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grouped_gemm_cuda", [&] {
    using T = typename Native<scalar_t>::type;
    GroupedGemmParams<T> p{};
    p.x = native_ptr<scalar_t>(xc);
    p.w = native_ptr<scalar_t>(w);  // any strides: views of the weights are used as they are
    p.y = native_ptr<scalar_t>(y);
    p.w_se = w.stride(0);
    p.w_sn = trans_w ? w.stride(2) : w.stride(1);
    p.w_sk = trans_w ? w.stride(1) : w.stride(2);
    p.M = M;
    p.N = Nout;
    p.K = K;
    p.start = l.start();
    p.end = l.end();
    p.tile_start = l.tile_start.data_ptr<int32_t>();
    p.E = static_cast<int32_t>(E);
    const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles));
    grouped_gemm_simt_kernel<T><<<grid, kGemmThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor grouped_gemm_wgrad_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& offsets) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  GLM5_CHECK_DEVICE_TYPE(dy, at::kCUDA);
  GLM5_CHECK_NDIM(dy, 2);
  GLM5_CHECK_FLOAT(dy);
  GLM5_CHECK_SAME_DEVICE(x, dy);
  GLM5_CHECK_NDIM(x, 2);
  GLM5_CHECK_SAME_DTYPE(x, dy);
  GLM5_CHECK_SIZE(x, 0, dy.size(0));
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) >= 2, "offsets must be 1-D [E+1] with E >= 1, got shape ",
                    offsets.sizes());
  const int64_t M = dy.size(0), N = dy.size(1), K = x.size(1), E = offsets.size(0) - 1;
  check_offsets(offsets, dy, E, M);
  const c10::cuda::CUDAGuard guard(dy.device());
  at::Tensor dw = at::empty({E, N, K}, dy.options());
  if (N == 0 || K == 0) return dw;
  if (M == 0) return dw.zero_();  // every expert is empty
  const at::Tensor dyc = dy.contiguous(), xc = x.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Layout l = group_layout(offsets, E, M, stream);
#ifndef GLM5_DISABLE_CUTLASS_GROUPED_GEMM
  if (dy.scalar_type() == at::kBFloat16 && grouped_gemm_wgrad_bf16_cutlass(dyc, xc, l.bounds[0], l.bounds[1], dw)) {
    return dw;
  }
#endif
  const int64_t k_tiles = ceil_div<int64_t>(K, kTileM), n_tiles = ceil_div<int64_t>(N, kTileN);
  TORCH_CHECK(E * k_tiles < (int64_t{1} << 31) && n_tiles <= 65535,
              "grouped_gemm_wgrad: problem too large for one launch: E=", E, ", N=", N, ", K=", K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "grouped_gemm_wgrad_cuda", [&] {
    using T = typename Native<scalar_t>::type;
    GroupedWgradParams<T> p{};
    p.dy = native_ptr<scalar_t>(dyc);
    p.x = native_ptr<scalar_t>(xc);
    p.dw = native_ptr<scalar_t>(dw);
    p.M = M;
    p.N = N;
    p.K = K;
    p.start = l.start();
    p.end = l.end();
    p.E = static_cast<int32_t>(E);
    const dim3 grid(static_cast<unsigned>(E * k_tiles), static_cast<unsigned>(n_tiles));
    grouped_wgrad_simt_kernel<T><<<grid, kGemmThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dw;
}

}  // namespace

TORCH_LIBRARY_IMPL(glm5, CUDA, m) {
  m.impl("moe_route", &moe_route_cuda);
  m.impl("moe_permute", &moe_permute_cuda);
  m.impl("moe_unpermute", &moe_unpermute_cuda);
  m.impl("moe_unpermute_bwd", &moe_unpermute_bwd_cuda);
  m.impl("grouped_gemm", &grouped_gemm_cuda);
  m.impl("grouped_gemm_wgrad", &grouped_gemm_wgrad_cuda);
}
