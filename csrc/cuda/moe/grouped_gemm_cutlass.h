// Grouped GEMMs with CUTLASS 3's Hopper ptr-array kernel (the setup of CUTLASS example 57 with
// device-side problem shapes), bf16 in and out, fp32 accumulation. Three users, one TU each (one kernel
// instantiation per TU: each takes ~80 s / ~4.5 GB to compile):
//   grouped_gemm_cutlass_{nt,nn}.cu: y[rows of e] = x[rows of e] @ W_e^T (nt) or @ W_e (nn);
//   grouped_gemm_cutlass_wgrad.cu:   dw[e] = dy[rows of e]^T @ x[rows of e] (the reduction runs over rows).
//
// The per-group problem shapes, pointers and strides are written on the device by a small kernel
// (grouped_gemm_cutlass_args.cuh, which tests/cuda_sim runs on the CPU) from the row ranges start/end
// (built from the offsets on the device), so the host never learns the rows
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

#include "grouped_gemm_cutlass_args.cuh"

namespace glm5::moe::cutlass_gemm {

using namespace cute;

// The schedule: cooperative warp-specialised ptr-array kernel, 128x128x64 tiles, no cluster.
struct CooperativeConfig {
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
  using TileShape = Shape<_128, _128, _64>;
  using ClusterShape = Shape<_1, _1, _1>;
};

// The CUTLASS kernel of a GroupedProblem (grouped_gemm_cutlass_args.cuh: shapes, strides, arrays).
template <class LayoutA_, class LayoutB_, class Config = CooperativeConfig>
struct GroupedGemmBf16 : GroupedProblem<LayoutA_, LayoutB_> {
  using Problem = GroupedProblem<LayoutA_, LayoutB_>;
  using ProblemShape = typename Problem::ProblemShape;
  using Element = typename Problem::Element;
  using LayoutA = typename Problem::LayoutA;
  using LayoutB = typename Problem::LayoutB;
  using LayoutD = typename Problem::LayoutD;
  static constexpr int kAlign = Problem::kAlign;

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

  // The arrays the fill kernels write are the ones this kernel reads.
  static_assert(std::is_same_v<typename GemmKernel::InternalStrideA, typename Problem::StrideA>);
  static_assert(std::is_same_v<typename GemmKernel::InternalStrideB, typename Problem::StrideB>);
  static_assert(std::is_same_v<typename GemmKernel::InternalStrideD, typename Problem::StrideD>);
  static_assert(std::is_same_v<typename ProblemShape::UnderlyingProblemShape, typename Problem::Shape3>);
};

template <bool TransW>
using ForwardGemm = GroupedGemmBf16<typename ForwardProblem<TransW>::LayoutA, typename ForwardProblem<TransW>::LayoutB>;

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

// Runs the grouped GEMM G over E groups (the arrays live in a scratch buffer on `like`'s device).
// `fill(arrays, stream)` must launch the kernel that writes every group's shape, pointers and strides
// on the device, on `stream`. Returns false, having launched nothing, when CUTLASS's can_implement
// rejects the problem: the caller then takes the SIMT kernel, which is correct for every input (the
// callers' own alignment checks should make this unreachable, so it warns once). Failures after the
// first launch raise: the outputs would be incomplete.
template <class G, class Fill>
bool run_grouped(const char* op, int64_t E, const at::Tensor& like, const Fill& fill) {
  TORCH_CHECK(E >= 1 && E <= INT32_MAX, op, ": bad group count for CUTLASS: ", E);
  at::Tensor buf = at::empty({static_cast<int64_t>(G::arrays_bytes(E))}, like.options().dtype(at::kByte));
  const typename G::Arrays a = G::carve(buf.data_ptr(), E);

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
  const Strides<typename G::Problem> strides = forward_strides<TransW>(N, K);
  const auto* xp = reinterpret_cast<const Element*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const Element*>(w.data_ptr());
  auto* yp = reinterpret_cast<Element*>(y.data_ptr());
  const int64_t w_se = w.stride(0);
  return run_grouped<G>("grouped_gemm", E, x, [&](const typename G::Arrays& a, cudaStream_t stream) {
    fill_forward_arrays_kernel<typename G::Problem><<<fill_blocks(E), kFillThreads, 0, stream>>>(
        a, start.data_ptr<int64_t>(), end.data_ptr<int64_t>(), static_cast<int32_t>(E), xp, wp, w_se, yp,
        static_cast<int32_t>(N), static_cast<int32_t>(K), strides);
  });
}

}  // namespace glm5::moe::cutlass_gemm
