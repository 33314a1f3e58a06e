// The device side of the CUTLASS grouped GEMMs (grouped_gemm_cutlass.h): the per-group problem arrays
// that CUTLASS 3's ptr-array kernel reads (shapes, pointers, strides), the kernels that write them on
// the device from the experts' row ranges, and the kernel that zeroes dW of the experts without rows.
// No ATen and no CUTLASS kernel templates (only CuTe types), so tests/cuda_sim runs these kernels on
// the CPU; grouped_gemm_cutlass.h checks at compile time that its GEMM kernels read these types.
#pragma once
#include <cute/layout.hpp>
#include <cutlass/bfloat16.h>
#include <cutlass/detail/layout.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/layout/matrix.h>
#include <vector_types.h>  // dim3, uint4

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace glm5::moe::cutlass_gemm {

// D_g = A_g @ B_g for every group g, with A_g (M x K), B_g (K x N) and D_g (M x N) in CUTLASS's layout
// tags: LayoutA RowMajor = K contiguous, ColumnMajor = M contiguous; LayoutB ColumnMajor = K
// contiguous, RowMajor = N contiguous; D is always row-major (N contiguous). The strides are CuTe's
// per-group strides of the ptr-array kernels: A over modes (M, K, L), B over (N, K, L), D over (M, N, L).
template <class LayoutA_, class LayoutB_>
struct GroupedProblem {
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M, N, K) per group
  using Shape3 = typename ProblemShape::UnderlyingProblemShape;
  using Element = cutlass::bfloat16_t;
  using LayoutA = LayoutA_;
  using LayoutB = LayoutB_;
  using LayoutD = cutlass::layout::RowMajor;
  using StrideA = cute::remove_pointer_t<cutlass::detail::TagToStrideA_t<LayoutA*>>;
  using StrideB = cute::remove_pointer_t<cutlass::detail::TagToStrideB_t<LayoutB*>>;
  using StrideD = cute::remove_pointer_t<cutlass::detail::TagToStrideC_t<LayoutD*>>;
  // TMA: every base address 16-byte aligned, every leading dimension a multiple of 16 bytes.
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;  // 8 elements

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

  static size_t align256(size_t v) { return (v + 255) / 256 * 256; }
  // Bytes of the buffer that carve() splits, for E groups (every array 256-byte aligned).
  static size_t arrays_bytes(int64_t E) {
    const size_t n = static_cast<size_t>(E);
    return align256(n * sizeof(Shape3)) + 3 * align256(n * sizeof(void*)) + align256(n * sizeof(StrideA)) +
           align256(n * sizeof(StrideB)) + align256(n * sizeof(StrideD));
  }
  static Arrays carve(void* buffer, int64_t E) {
    const size_t n = static_cast<size_t>(E);
    char* p = static_cast<char*>(buffer);
    Arrays a{};
    a.shapes = reinterpret_cast<Shape3*>(p);
    p += align256(n * sizeof(Shape3));
    a.ptr_a = reinterpret_cast<const Element**>(p);
    p += align256(n * sizeof(void*));
    a.ptr_b = reinterpret_cast<const Element**>(p);
    p += align256(n * sizeof(void*));
    a.ptr_d = reinterpret_cast<Element**>(p);
    p += align256(n * sizeof(void*));
    a.stride_a = reinterpret_cast<StrideA*>(p);
    p += align256(n * sizeof(StrideA));
    a.stride_b = reinterpret_cast<StrideB*>(p);
    p += align256(n * sizeof(StrideB));
    a.stride_d = reinterpret_cast<StrideD*>(p);
    return a;
  }
};

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

template <class P>
struct Strides {
  typename P::StrideA a;
  typename P::StrideB b;
  typename P::StrideD d;
};

constexpr int kFillThreads = 128;  // the fill kernels: one thread per group
inline unsigned fill_blocks(int64_t E) { return static_cast<unsigned>((E + kFillThreads - 1) / kFillThreads); }

// ---- forward: y[rows of e] = x[rows of e] @ W_e^T (nt) or @ W_e (nn, trans_w) ---------------------

// The forward's two weight layouts: w [E, N, K] (nt: K contiguous, CUTLASS's column-major B) and
// w [E, K, N] (nn, trans_w: N contiguous, row-major B); x is row-major A in both.
template <bool TransW>
using ForwardProblem =
    GroupedProblem<cutlass::layout::RowMajor,
                   std::conditional_t<TransW, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor>>;

// x [M, K] and y [M, N] row-major, w[e] a packed [N, K] (nt) or [K, N] (nn) matrix.
template <bool TransW>
Strides<ForwardProblem<TransW>> forward_strides(int64_t N, int64_t K) {
  using P = ForwardProblem<TransW>;
  return {packed_stride<typename P::StrideA>(K), packed_stride<typename P::StrideB>(TransW ? N : K),
          packed_stride<typename P::StrideD>(N)};
}

// One thread per expert: its rows [start, end) of x and y (M = rows; an expert without rows has M = 0,
// so no tiles, and its y rows are empty), its weight matrix, its shape.
template <class P>
__global__ void fill_forward_arrays_kernel(typename P::Arrays a, const int64_t* start, const int64_t* end, int32_t E,
                                           const typename P::Element* x, const typename P::Element* w, int64_t w_se,
                                           typename P::Element* y, int32_t N, int32_t K, Strides<P> s) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  const int64_t r0 = start[e], rows = end[e] - r0;  // 0 <= rows <= M <= INT32_MAX (checked on the host)
  a.shapes[e] = typename P::Shape3(static_cast<int>(rows), N, K);
  a.ptr_a[e] = x + r0 * K;
  a.ptr_b[e] = w + e * w_se;
  a.ptr_d[e] = y + r0 * N;
  a.stride_a[e] = s.a;
  a.stride_b[e] = s.b;
  a.stride_d[e] = s.d;
}

// ---- weight gradient: dw[e] = dy[rows of e]^T @ x[rows of e] ------------------------------------

// Group e as CUTLASS's (M, N, K) = (N, K, rows_e), with s = start[e]:
//   A (M x K = N x rows): dy rows seen column-major, element (n, r) at dy[(s + r) * N + n] (M contiguous, ld N);
//   B (K x N = rows x K): x rows seen N-major,       element (r, k) at x[(s + r) * K + k]  (N contiguous, ld K);
//   D (M x N = N x K):    dw[e] row-major,           element (n, k) at dw[e * N * K + n * K + k] (ld K).
using WgradProblem = GroupedProblem<cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;

inline Strides<WgradProblem> wgrad_strides(int64_t N, int64_t K) {
  return {packed_stride<WgradProblem::StrideA>(N),   // (1, N): dy^T, M (= n) contiguous
          packed_stride<WgradProblem::StrideB>(K),   // (1, K): x, N (= k) contiguous
          packed_stride<WgradProblem::StrideD>(K)};  // (K, 1): dw[e] row-major
}

// One thread per expert. An expert without rows gets the shape (0, 0, 0): no tiles, so CUTLASS never
// writes its dw[e] (given K = 0 it would store uncleared accumulators); zero_empty_experts_kernel
// writes those zeros instead.
// (A template, P = WgradProblem, as every kernel of this header: it is included by several TUs.)
template <class P = WgradProblem>
__global__ void fill_wgrad_arrays_kernel(typename P::Arrays a, const int64_t* start, const int64_t* end, int32_t E,
                                         const typename P::Element* dy, const typename P::Element* x,
                                         typename P::Element* dw, int32_t N, int32_t K, Strides<P> s) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  const int64_t r0 = start[e], rows = end[e] - r0;  // 0 <= rows <= M <= INT32_MAX (checked on the host)
  a.shapes[e] = rows > 0 ? typename P::Shape3(N, K, static_cast<int>(rows)) : typename P::Shape3(0, 0, 0);
  a.ptr_a[e] = dy + r0 * N;
  a.ptr_b[e] = x + r0 * K;
  a.ptr_d[e] = dw + static_cast<int64_t>(e) * N * K;
  a.stride_a[e] = s.a;
  a.stride_b[e] = s.b;
  a.stride_d[e] = s.d;
}

// dw[e] = 0 for every expert e without rows: grid.y walks the experts, grid.x * blockDim.x threads walk
// the 16-byte words of one expert's [N, K] matrix (N * K * 2 bytes, a multiple of 16 since K % 8 == 0).
// Blocks on an expert with rows return after two loads. bf16 +0.0 is the all-zero bit pattern.
constexpr int kZeroThreads = 256;
inline dim3 zero_empty_grid(int64_t words_per_expert, int64_t E) {
  const int64_t x = (words_per_expert + 2047) / 2048, y = E;
  return dim3(static_cast<unsigned>(x < 128 ? x : 128), static_cast<unsigned>(y < 65535 ? y : 65535));
}

template <typename Word = uint4>
__global__ void zero_empty_experts_kernel(Word* dw, int64_t words_per_expert, const int64_t* start, const int64_t* end,
                                          int32_t E) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = blockIdx.y; e < E; e += gridDim.y) {
    if (end[e] != start[e]) continue;
    Word* d = dw + e * words_per_expert;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < words_per_expert; i += stride) {
      d[i] = Word{};  // all-zero bits
    }
  }
}

}  // namespace glm5::moe::cutlass_gemm
