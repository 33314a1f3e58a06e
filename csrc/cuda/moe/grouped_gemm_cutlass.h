// Grouped GEMMs with CUTLASS 3's Hopper ptr-array kernel (the setup of CUTLASS example 57 with
// device-side problem shapes), bf16 in and out, fp32 accumulation. Three users, one TU each (one kernel
// instantiation per TU: each takes ~80 s / ~4.5 GB to compile):
//   grouped_gemm_cutlass_{nt,nn}.cu: y[rows of e] = x[rows of e] @ W_e^T (nt) or @ W_e (nn);
//   grouped_gemm_cutlass_wgrad.cu:   dw[e] = dy[rows of e]^T @ x[rows of e] (the reduction runs over rows).
//
// The per-group problem shapes, pointers and strides are written on the device by a small kernel from
// the row ranges start/end (built from the offsets on the device), so the host never learns the rows
// per expert: CUTLASS is given no host problem shapes and its persistent scheduler walks the groups on
// the device. A group with a zero M or N extent has no tiles and is never touched. A group with K = 0
// would NOT be written as zeros (the mainloop leaves its accumulators uncleared), so users must never
// hand CUTLASS such a group.
// -DGLM5_DISABLE_CUTLASS_GROUPED_GEMM leaves every CUTLASS TU out (every dtype then takes the SIMT kernels).
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include <cstdint>
#include <mutex>
#include <unordered_map>

namespace glm5::moe::cutlass_gemm {

using namespace cute;

// The schedule: cooperative warp-specialised ptr-array kernel, 128x128x64 tiles, no cluster.
struct CooperativeConfig {
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
  using TileShape = Shape<_128, _128, _64>;
  using ClusterShape = Shape<_1, _1, _1>;
};

// D_g = A_g @ B_g for every group g, with A_g (M x K), B_g (K x N) and D_g (M x N) in CUTLASS's layout
// tags: LayoutA RowMajor = K contiguous, ColumnMajor = M contiguous; LayoutB ColumnMajor = K
// contiguous, RowMajor = N contiguous; D is always row-major (N contiguous).
template <class LayoutA_, class LayoutB_, class Config = CooperativeConfig>
struct GroupedGemmBf16 {
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K) per group
  using Element = cutlass::bfloat16_t;
  using LayoutA = LayoutA_;
  using LayoutB = LayoutB_;
  using LayoutD = cutlass::layout::RowMajor;
  // TMA: every base address 16-byte aligned, every leading dimension a multiple of 16 bytes.
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;  // 8 elements

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Config::TileShape, typename Config::ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kAlign, Element, LayoutD*, kAlign,
      typename Config::EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element, LayoutB*, kAlign, float,
      typename Config::TileShape, typename Config::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Config::KernelSchedule>::CollectiveOp;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using StrideD = typename GemmKernel::InternalStrideD;
  using Shape3 = typename ProblemShape::UnderlyingProblemShape;

  // Device arrays of the grouped problem (one entry per group), carved out of one byte buffer.
  struct Arrays {
    Shape3* shapes;
    const Element** ptr_a;
    const Element** ptr_b;
    Element** ptr_d;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideD* stride_d;
  };
};

// The forward's two weight layouts: w [E, N, K] (nt: K contiguous, CUTLASS's column-major B) and
// w [E, K, N] (nn, trans_w: N contiguous, row-major B); x is row-major A in both.
template <bool TransW>
using ForwardGemm = GroupedGemmBf16<cutlass::layout::RowMajor,
                                    std::conditional_t<TransW, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor>>;

// A packed stride of one group: the leading dimension `ld` in the dynamic one of the first two modes
// (the other is the static unit stride), a zero batch stride (one matrix per group).
template <typename Stride>
Stride packed_stride(int64_t ld) {
  Stride s{};
  if constexpr (cute::is_integral<cute::remove_cvref_t<decltype(cute::get<0>(s))>>::value &&
                !cute::is_static<cute::remove_cvref_t<decltype(cute::get<0>(s))>>::value) {
    cute::get<0>(s) = ld;
  } else {
    cute::get<1>(s) = ld;
  }
  if constexpr (cute::rank(Stride{}) > 2) {
    if constexpr (!cute::is_static<cute::remove_cvref_t<decltype(cute::get<2>(s))>>::value) cute::get<2>(s) = 0;
  }
  return s;
}

inline int sm_count(int device) {
  static std::mutex mu;
  static std::unordered_map<int, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  const int n = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  cache[device] = n;
  return n;
}

// The kernels are compiled for sm_90a only: any other GPU takes the SIMT path.
inline bool on_sm90() {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return prop->major == 9 && prop->minor == 0;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline size_t align256(size_t v) { return (v + 255) / 256 * 256; }

// Runs the grouped GEMM G over E groups (the arrays live in a scratch buffer on `like`'s device).
// `fill(arrays, stream)` must launch the kernel that writes every group's shape, pointers and strides
// on the device, on `stream`. Returns false, having launched nothing, when CUTLASS's can_implement
// rejects the problem: the caller then takes the SIMT kernel, which is correct for every input (the
// callers' own alignment checks should make this unreachable, so it warns once). Failures after the
// first launch raise: the outputs would be incomplete.
template <class G, class Fill>
bool run_grouped(const char* op, int64_t E, const at::Tensor& like, const Fill& fill) {
  using Element = typename G::Element;
  TORCH_CHECK(E >= 1 && E <= INT32_MAX, op, ": bad group count for CUTLASS: ", E);
  const size_t sz_shapes = align256(E * sizeof(typename G::Shape3)), sz_ptr = align256(E * sizeof(void*));
  const size_t sz_sa = align256(E * sizeof(typename G::StrideA)), sz_sb = align256(E * sizeof(typename G::StrideB));
  const size_t sz_sd = align256(E * sizeof(typename G::StrideD));
  at::Tensor buf = at::empty({static_cast<int64_t>(sz_shapes + 3 * sz_ptr + sz_sa + sz_sb + sz_sd)},
                             like.options().dtype(at::kByte));
  char* p = static_cast<char*>(buf.data_ptr());
  typename G::Arrays a{};
  a.shapes = reinterpret_cast<typename G::Shape3*>(p);
  p += sz_shapes;
  a.ptr_a = reinterpret_cast<const Element**>(p);
  p += sz_ptr;
  a.ptr_b = reinterpret_cast<const Element**>(p);
  p += sz_ptr;
  a.ptr_d = reinterpret_cast<Element**>(p);
  p += sz_ptr;
  a.stride_a = reinterpret_cast<typename G::StrideA*>(p);
  p += sz_sa;
  a.stride_b = reinterpret_cast<typename G::StrideB*>(p);
  p += sz_sb;
  a.stride_d = reinterpret_cast<typename G::StrideD*>(p);

  cutlass::KernelHardwareInfo hw;
  hw.device_id = like.get_device();
  hw.sm_count = sm_count(hw.device_id);
  typename G::Gemm::Arguments args;
  decltype(args.epilogue.thread) fusion{};
  fusion.alpha = 1.0f;
  fusion.beta = 0.0f;  // no C operand (ElementC is void): D = A @ B
  fusion.alpha_ptr = nullptr;
  fusion.beta_ptr = nullptr;
  args = typename G::Gemm::Arguments{cutlass::gemm::GemmUniversalMode::kGrouped,
                                     {static_cast<int>(E), a.shapes, nullptr},  // no host problem shapes
                                     {a.ptr_a, a.stride_a, a.ptr_b, a.stride_b},
                                     {fusion, nullptr, nullptr, a.ptr_d, a.stride_d},
                                     hw};
  typename G::Gemm gemm;
  // With device-side shapes can_implement reads only the arguments above (not the arrays' contents),
  // so it runs before anything is launched.
  const cutlass::Status ok = gemm.can_implement(args);
  if (ok != cutlass::Status::kSuccess) {
    TORCH_WARN_ONCE(op, ": CUTLASS cannot implement this grouped GEMM (", cutlassGetStatusString(ok),
                    "); using the SIMT kernel");
    return false;
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  fill(a, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const size_t ws_bytes = G::Gemm::get_workspace_size(args);
  at::Tensor ws = at::empty({static_cast<int64_t>(std::max<size_t>(ws_bytes, 1))}, like.options().dtype(at::kByte));
  cutlass::Status st = gemm.initialize(args, ws.data_ptr(), stream);
  TORCH_CHECK(st == cutlass::Status::kSuccess, op, ": CUTLASS initialize failed: ", cutlassGetStatusString(st));
  st = gemm.run(stream);
  TORCH_CHECK(st == cutlass::Status::kSuccess, op, ": CUTLASS run failed: ", cutlassGetStatusString(st));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// ---- forward: y[rows of e] = x[rows of e] @ W_e^T (or @ W_e) -------------------------------------

// One thread per expert: its rows [start, end) of x and y (M = rows; an expert without rows has M = 0,
// so no tiles, and its y rows are empty), its weight matrix, its shape.
template <typename G>
__global__ void fill_forward_arrays_kernel(typename G::Arrays a, const int64_t* start, const int64_t* end, int32_t E,
                                           const typename G::Element* x, const typename G::Element* w, int64_t w_se,
                                           typename G::Element* y, int32_t N, int32_t K, typename G::StrideA sa,
                                           typename G::StrideB sb, typename G::StrideD sd) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  const int64_t s = start[e], rows = end[e] - s;
  a.shapes[e] = typename G::Shape3(static_cast<int>(rows), N, K);
  a.ptr_a[e] = x + s * K;
  a.ptr_b[e] = w + e * w_se;
  a.ptr_d[e] = y + s * N;
  a.stride_a[e] = sa;
  a.stride_b[e] = sb;
  a.stride_d[e] = sd;
}

// Returns false (launching nothing) when the problem does not meet the TMA alignment rules or the GPU
// is not sm_90; the caller then takes the SIMT kernel. x [M, K] contiguous, y [M, N] contiguous,
// start/end [E] int64 on the device (clamped into [0, M], non-decreasing).
template <bool TransW>
bool run_grouped_gemm_bf16(const at::Tensor& x, const at::Tensor& w, const at::Tensor& start, const at::Tensor& end,
                           at::Tensor& y) {
  using G = ForwardGemm<TransW>;
  using Element = typename G::Element;
  const int64_t E = w.size(0), M = x.size(0), K = x.size(1), N = y.size(1);
  // w[e] must be a packed matrix (K contiguous, or N contiguous with trans_w), all bases 16-byte aligned
  const bool packed = TransW ? (w.stride(2) == 1 && w.stride(1) == N) : (w.stride(2) == 1 && w.stride(1) == K);
  if (!on_sm90() || !packed || K % G::kAlign || N % G::kAlign || w.stride(0) % G::kAlign || K == 0 || E == 0 ||
      M > INT32_MAX || K > INT32_MAX || N > INT32_MAX || !aligned16(x.data_ptr()) || !aligned16(w.data_ptr()) ||
      !aligned16(y.data_ptr())) {
    return false;
  }
  const auto sa = packed_stride<typename G::StrideA>(K);              // x: row-major [rows, K]
  const auto sb = packed_stride<typename G::StrideB>(TransW ? N : K);  // w[e]: [N, K] or [K, N]
  const auto sd = packed_stride<typename G::StrideD>(N);              // y: row-major [rows, N]
  const auto* xp = reinterpret_cast<const Element*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const Element*>(w.data_ptr());
  auto* yp = reinterpret_cast<Element*>(y.data_ptr());
  const int64_t w_se = w.stride(0);
  return run_grouped<G>("grouped_gemm", E, x, [&](const typename G::Arrays& a, cudaStream_t stream) {
    fill_forward_arrays_kernel<G><<<static_cast<unsigned>((E + 127) / 128), 128, 0, stream>>>(
        a, start.data_ptr<int64_t>(), end.data_ptr<int64_t>(), static_cast<int32_t>(E), xp, wp, w_se, yp,
        static_cast<int32_t>(N), static_cast<int32_t>(K), sa, sb, sd);
  });
}

}  // namespace glm5::moe::cutlass_gemm
