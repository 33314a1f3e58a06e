// Grouped GEMMs on the GPU, the portable path (any dtype, any weight strides): shared-memory tiled
// SIMT kernels with fp32 accumulation (fp64 for fp64). Every expert's row range and the prefix of its
// M tiles are built on the device from the offsets (group_layout_kernel), so nothing syncs with the
// host: the grid is launched for the worst case (ceil(M / tile) + E tiles) and the tiles past the last
// expert's exit at once. Each output element is summed by one thread in a fixed order (per k slice,
// then across slices: add_tile_product): deterministic.
#pragma once
#ifndef GLM5_CUDA_SIM  // the CPU simulator (tests/cuda_sim/cuda_sim.h) supplies cub::BlockScan
#include <cub/block/block_scan.cuh>
#endif

#include "common.cuh"

namespace glm5::moe {

constexpr int kLayoutThreads = 1024;
constexpr int kTileM = 64, kTileN = 64, kTileK = 16, kGemmThreads = 256;  // 4x4 outputs per thread

// acc[i][j] += sum_kk As[kk][ty + 16 i] * Bs[kk][tx + 16 j]: the thread's 4x4 outputs (rows ty + 16 i,
// columns tx + 16 j of the 64 x 64 tile) over one kTileK slice of the reduction. The slice is summed on
// its own and then added: a two-level sum whose rounding error grows like kTileK + K / kTileK rather
// than K (one running sum over the 1500-row expert of test_cuda_moe's largest wgrad case missed the
// fp32 tolerance on the CPU simulator, with or without FMA).
static_assert(kTileM == kTileN, "one tile shape for both operands");
template <typename acc_t>
__device__ __forceinline__ void add_tile_product(const acc_t (&As)[kTileK][kTileM + 1],
                                                 const acc_t (&Bs)[kTileK][kTileN + 1], int tx, int ty,
                                                 acc_t (&acc)[4][4]) {
  acc_t part[4][4] = {};
#pragma unroll
  for (int kk = 0; kk < kTileK; ++kk) {
    acc_t a[4], b[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) part[i][j] += a[i] * b[j];
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] += part[i][j];
}

struct MaxOp {
  __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return a < b ? b : a; }
};

// start/end from the running maximum of the offsets clamped into [0, M]: bound[i] = max over j <= i of
// clamp(offsets[j]), start[e] = bound[e], end[e] = bound[e+1]. Exact for valid offsets; for any others
// (api.cu reads no values unless GLM5_CUDA_VALIDATE) the experts' rows stay inside [0, M], ordered and
// disjoint, so no two CTAs write one output row. tile_start: exclusive prefix of the experts' M tiles.
__global__ void group_layout_kernel(GroupLayout p) {
  using BoundScan = cub::BlockScan<int64_t, kLayoutThreads>;
  using TileScan = cub::BlockScan<int32_t, kLayoutThreads>;
  __shared__ typename BoundScan::TempStorage bound_tmp;
  __shared__ typename TileScan::TempStorage tile_tmp;
  __shared__ int64_t bound_carry;  // the running maximum before this round's experts
  __shared__ int32_t tile_carry;
  const auto clamp = [&](int64_t o) { return min(max(o, int64_t{0}), p.M); };
  if (threadIdx.x == 0) {
    bound_carry = clamp(p.offsets[0]);
    tile_carry = 0;
  }
  __syncthreads();
  // 1. end[e] = bound[e+1], a max-scan of clamp(offsets[1..E]) carried across rounds of kLayoutThreads.
  for (int e0 = 0; e0 < p.E; e0 += kLayoutThreads) {
    const int e = e0 + threadIdx.x;
    const int64_t c = e < p.E ? clamp(p.offsets[e + 1]) : int64_t{0};  // 0 never raises a maximum
    int64_t run, round_max;
    BoundScan(bound_tmp).InclusiveScan(c, run, MaxOp{}, round_max);
    if (e < p.E) p.end[e] = max(bound_carry, run);
    __syncthreads();  // everyone has read bound_carry (and bound_tmp is free again)
    if (threadIdx.x == 0) bound_carry = max(bound_carry, round_max);
    __syncthreads();
  }
  // 2. start[e] = bound[e] (end[e-1], written above by another thread: visible after __syncthreads) and
  //    the tile prefix.
  for (int e0 = 0; e0 < p.E; e0 += kLayoutThreads) {
    const int e = e0 + threadIdx.x;
    int32_t tiles = 0;
    if (e < p.E) {
      const int64_t s = e == 0 ? clamp(p.offsets[0]) : p.end[e - 1];
      p.start[e] = s;
      tiles = static_cast<int32_t>(ceil_div<int64_t>(p.end[e] - s, p.tile_m));
    }
    int32_t excl, total;
    TileScan(tile_tmp).ExclusiveSum(tiles, excl, total);
    if (e < p.E) p.tile_start[e] = tile_carry + excl;
    __syncthreads();
    if (threadIdx.x == 0) tile_carry += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) p.tile_start[p.E] = tile_carry;
}

// Zeroes the rows of y outside [start[0], end[E-1]) (one warp per row; the others return at once).
template <typename scalar_t>
__global__ void zero_outside_groups_kernel(scalar_t* y, int64_t M, int64_t N, const int64_t* start,
                                           const int64_t* end, int32_t E) {
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int64_t lo = start[0], hi = end[E - 1];
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32; r < M;
       r += static_cast<int64_t>(gridDim.x) * warps) {
    if (r >= lo && r < hi) continue;
    for (int64_t c = lane; c < N; c += 32) y[r * N + c] = from_acc<scalar_t>(typename AccOf<scalar_t>::type(0));
  }
}

// One CTA per (M tile of one expert, N tile): y[rows, n0:n0+64] = x[rows, :] @ w[e, n0:n0+64, :]^T.
template <typename scalar_t>
__global__ void __launch_bounds__(kGemmThreads) grouped_gemm_simt_kernel(GroupedGemmParams<scalar_t> p) {
  using acc_t = typename AccOf<scalar_t>::type;
  __shared__ acc_t As[kTileK][kTileM + 1];
  __shared__ acc_t Bs[kTileK][kTileN + 1];
  const int32_t t = blockIdx.x;
  if (t >= p.tile_start[p.E]) return;
  int lo = 0, hi = p.E - 1;  // the largest e with tile_start[e] <= t
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.tile_start[mid] <= t) lo = mid; else hi = mid - 1;
  }
  const int e = lo;
  const int64_t row0 = p.start[e] + static_cast<int64_t>(t - p.tile_start[e]) * kTileM, row_end = p.end[e];
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const scalar_t* we = p.w + e * p.w_se;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const bool w_k_fast = p.w_sk == 1;

  acc_t acc[4][4] = {};
  for (int64_t k0 = 0; k0 < p.K; k0 += kTileK) {
    for (int q = threadIdx.x; q < kTileM * kTileK; q += kGemmThreads) {
      const int m = q / kTileK, kk = q % kTileK;
      const int64_t r = row0 + m, k = k0 + kk;
      As[kk][m] = (r < row_end && k < p.K) ? to_acc(p.x[r * p.K + k]) : acc_t(0);
    }
    for (int q = threadIdx.x; q < kTileN * kTileK; q += kGemmThreads) {
      const int n = w_k_fast ? q / kTileK : q % kTileN, kk = w_k_fast ? q % kTileK : q / kTileN;
      const int64_t nn = n0 + n, k = k0 + kk;
      Bs[kk][n] = (nn < p.N && k < p.K) ? to_acc(we[nn * p.w_sn + k * p.w_sk]) : acc_t(0);
    }
    __syncthreads();
    add_tile_product(As, Bs, tx, ty, acc);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = row0 + ty + 16 * i;
    if (r >= row_end) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n < p.N) p.y[r * p.N + n] = from_acc<scalar_t>(acc[i][j]);
    }
  }
}

// One CTA per (expert, N tile, K tile): dw[e, n0:n0+64, k0:k0+64] = dy[rows, n-tile]^T @ x[rows, k-tile],
// the rows of the expert in order (zero for an expert with no rows). grid.x = E * K tiles.
template <typename scalar_t>
__global__ void __launch_bounds__(kGemmThreads) grouped_wgrad_simt_kernel(GroupedWgradParams<scalar_t> p) {
  using acc_t = typename AccOf<scalar_t>::type;
  __shared__ acc_t As[kTileK][kTileN + 1];  // dy rows x n
  __shared__ acc_t Bs[kTileK][kTileM + 1];  // x rows x k
  const int64_t k_tiles = ceil_div<int64_t>(p.K, kTileM);
  const int e = static_cast<int>(blockIdx.x / k_tiles);
  const int64_t c0 = static_cast<int64_t>(blockIdx.x % k_tiles) * kTileM;  // k (column of dw) tile
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int64_t r_begin = p.start[e], r_end = p.end[e];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

  acc_t acc[4][4] = {};
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kTileK) {
    for (int q = threadIdx.x; q < kTileN * kTileK; q += kGemmThreads) {
      const int n = q % kTileN, kk = q / kTileN;
      const int64_t r = r0 + kk, nn = n0 + n;
      As[kk][n] = (r < r_end && nn < p.N) ? to_acc(p.dy[r * p.N + nn]) : acc_t(0);
    }
    for (int q = threadIdx.x; q < kTileM * kTileK; q += kGemmThreads) {
      const int c = q % kTileM, kk = q / kTileM;
      const int64_t r = r0 + kk, cc = c0 + c;
      Bs[kk][c] = (r < r_end && cc < p.K) ? to_acc(p.x[r * p.K + cc]) : acc_t(0);
    }
    __syncthreads();
    add_tile_product(As, Bs, tx, ty, acc);
    __syncthreads();
  }
  scalar_t* dwe = p.dw + static_cast<int64_t>(e) * p.N * p.K;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t n = n0 + ty + 16 * i;
    if (n >= p.N) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = c0 + tx + 16 * j;
      if (c < p.K) dwe[n * p.K + c] = from_acc<scalar_t>(acc[i][j]);
    }
  }
}

}  // namespace glm5::moe
