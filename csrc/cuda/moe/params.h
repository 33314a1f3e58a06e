// Plain-old-data parameters of the MoE CUDA kernels (no ATen: the .cuh kernels include only this).
// Layouts and semantics: glm5/ops/reference.py (moe_route, moe_permute, moe_unpermute, grouped_gemm,
// grouped_gemm_wgrad). Sizes are int64 where a product of them indexes memory.
#pragma once
#include <cstdint>

namespace glm5::moe {

// moe_route: one warp per token.
template <typename in_t, typename acc_t>
struct RouteParams {
  const in_t* logits;   // [N, E] contiguous
  const acc_t* bias;    // [E] or nullptr (already in acc_t)
  int32_t* topk_idx;    // [N, topk]
  acc_t* topk_w;        // [N, topk]
  int64_t N;
  int32_t E, topk, n_group, topk_group;
  bool norm;
  acc_t scale;
  acc_t norm_eps;       // reference.ROUTE_NORM_EPS
};

// moe_permute: a counting sort of the N*k (token, slot) entries by expert, stable in entry order.
// The entries are cut into chunks of kPermuteChunk; each chunk is owned by one warp.
constexpr int kPermuteChunk = 1024;

struct PermuteParams {
  const int32_t* topk_idx;  // [L = N*k]; values outside [0, E) are dropped slots (row -1)
  int64_t L;
  int32_t k;
  int32_t E;
  int64_t alignment;
  int64_t n_chunks;         // ceil(L / kPermuteChunk)
  int32_t* chunk_counts;    // [n_chunks, E]: counts of every chunk, then (in place) the chunk's
                            //   exclusive base within the expert
  int64_t* counts;          // [E] rows of every expert
  int64_t* offsets;         // [E+1] output: aligned segment starts
  int32_t* row_map;         // [L] output
  int32_t* src_token;       // [capacity] token of every row of x_sorted, -1 for padding rows
};

struct RowCopyParams {      // x_sorted[r] = src_token[r] >= 0 ? x[src_token[r]] : 0
  const char* x;
  char* x_sorted;
  const int32_t* src_token;
  int64_t rows;             // capacity
  int64_t row_bytes;
};

// moe_unpermute (out[n] = sum_j w[n,j] * y[row_map[n,j]]) and its backward.
template <typename scalar_t, typename acc_t>
struct UnpermuteParams {
  const scalar_t* y;        // [M, D]
  const int32_t* row_map;   // [N, k]; rows outside [0, M) are skipped
  const acc_t* w;           // [N, k]
  const scalar_t* grad;     // [N, D] (backward only)
  scalar_t* out;            // [N, D] forward output; [M, D] dy in the backward (zero-filled)
  acc_t* dw;                // [N, k] (backward only)
  int64_t N, M, D;
  int32_t k;
};

// Grouped GEMMs. Expert e owns rows [start[e], end[e]) of x / y (sanitised from the offsets on the
// device: clamped into [0, M] and made non-decreasing, so for any offsets tensor the experts' rows are
// in bounds and disjoint).
struct GroupLayout {
  const int64_t* offsets;   // [E+1] as given by the caller
  int64_t* start;           // [E]
  int64_t* end;             // [E]
  int32_t* tile_start;      // [E+1] exclusive prefix of the M tiles of every expert
  int32_t E;
  int64_t M;
  int32_t tile_m;
};

template <typename scalar_t>
struct GroupedGemmParams {  // y[r, n] = sum_k x[r, k] * w[e, n, k] for r in expert e's rows
  const scalar_t* x;        // [M, K] contiguous
  const scalar_t* w;        // element (e, n, k) at w[e*w_se + n*w_sn + k*w_sk]
  scalar_t* y;              // [M, N] contiguous
  int64_t w_se, w_sn, w_sk;
  int64_t M, N, K;
  const int64_t* start;
  const int64_t* end;
  const int32_t* tile_start;
  int32_t E;
};

template <typename scalar_t>
struct GroupedWgradParams {  // dw[e, n, k] = sum_{r in expert e} dy[r, n] * x[r, k]
  const scalar_t* dy;        // [M, N] contiguous
  const scalar_t* x;         // [M, K] contiguous
  scalar_t* dw;              // [E, N, K] contiguous
  int64_t M, N, K;
  const int64_t* start;
  const int64_t* end;
  int32_t E;
};

}  // namespace glm5::moe
