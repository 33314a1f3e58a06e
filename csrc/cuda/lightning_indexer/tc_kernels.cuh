// Tensor-core lightning-indexer kernels (bf16 / fp16 inputs, fp32 scores): indexer_logits and the
// fused indexer_topk. Both score with tc_score.cuh on 16-aligned key tiles, so a (query, key) score is
// bit-identical in the two kernels. Host side: tc.cu.
//
// Each warp owns 32 keys of a kTcTileKeys-key tile: it gathers them into its own shared-memory slice
// with cp.async, loads their A fragments into registers (DI <= 128: 64 registers), and scores them
// against every query of the CTA. Only warp-level synchronisation guards a slice, so a warp prefetches
// its next slice as soon as its fragments are in registers.
// - logits: grid (ceil(T / qb), ceil(S / kTcTileKeys)). A CTA holds one key tile in registers and walks
//   its qb queries; q[t] (and w[t]) is double-buffered in shared memory (cp.async for the next query while
//   this one is scored). A lane writes the score of its own key: a warp's stores cover 32 consecutive
//   floats.
// - top-k: grid ceil(T / QB), QB queries per CTA (sharing every key tile: 1/QB of the key traffic). The
//   CTA walks the union of its queries' visible ranges in tiles starting at a multiple of 16; a query
//   whose range misses a tile skips it (no scoring, no selection). Per tile: score into shared memory,
//   then topk_select.cuh for each query (threshold filter, compaction, sorted merges).
#pragma once
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>

#include "../common/device_utils.cuh"
#include "params.h"
#include "tc_score.cuh"
#include "topk_select.cuh"

namespace glm5::cuda {

// The visible key range of query t, clamped to [0, S] (as visible_range in kernels.cuh).
__device__ __forceinline__ void tc_visible_range(const IndexerParams& p, int64_t t, int& lo, int& hi) {
  lo = max(0, min(p.ks[t], p.S));
  hi = max(lo, min(p.ke[t], p.S));
}

// Stages q[t] (HI rows, cp.async, zero rows when t >= T) and w[t] (fp32, plain stores) with all threads
// of the CTA. The caller commits the cp.async group.
template <typename T>
__device__ __forceinline__ void tc_stage_query(const IndexerParams& p, int64_t t, T* qs, float* ws) {
  const T* q = static_cast<const T*>(p.q);
  const T* w = static_cast<const T*>(p.w);
  const bool real = t < p.T;
  tc_copy_rows(qs, tc_ld(p.DI), real ? q + t * p.HI * p.DI : q, q, p.HI, real ? p.HI : 0, p.DI, int(threadIdx.x),
               int(blockDim.x));
  for (int h = int(threadIdx.x); h < p.HI; h += int(blockDim.x)) ws[h] = real ? to_ct<float>(w[t * p.HI + h]) : 0.f;
}

// Issues (and commits) this warp's cp.async of keys [s0, s0 + 32) into its slice; keys >= send are zeros.
template <typename T>
__device__ __forceinline__ void tc_stage_keys(const IndexerParams& p, int s0, int send, T* slice) {
  const T* k = static_cast<const T*>(p.k);
  const int nvalid = max(0, min(kTcWarpKeys, send - s0));
  tc_copy_rows(slice, tc_ld(p.DI), nvalid > 0 ? k + int64_t(s0) * p.DI : k, k, kTcWarpKeys, nvalid, p.DI,
               int(threadIdx.x) & 31, 32);
  cp_async_commit();
}

// ---------------------------------------------------------------------------------------------
// indexer_logits
// ---------------------------------------------------------------------------------------------

struct TcLogitsSmem {
  size_t qs, ks, ws, total;
};

// Byte offsets: q[2][HI][ld] (two buffers), key slices [kTcTileKeys][ld], w[2][HI] fp32.
__host__ __device__ inline TcLogitsSmem tc_logits_smem(int HI, int DI) {
  const size_t row = size_t(tc_ld(DI)) * 2;  // bytes; a multiple of 16
  TcLogitsSmem L{};
  L.qs = 0;
  L.ks = L.qs + 2 * size_t(HI) * row;
  L.ws = L.ks + size_t(kTcTileKeys) * row;
  L.total = L.ws + 2 * size_t(HI) * sizeof(float);
  return L;
}

// grid (ceil(T / p.qb), ceil(S / kTcTileKeys)), kTcThreads threads.
template <typename T>
__global__ void __launch_bounds__(kTcThreads) indexer_logits_tc_kernel(const IndexerParams p) {
  unsigned char* smem_raw = dynamic_smem();
  const TcLogitsSmem L = tc_logits_smem(p.HI, p.DI);
  T* qs = reinterpret_cast<T*>(smem_raw + L.qs);
  T* ks = reinterpret_cast<T*>(smem_raw + L.ks);
  float* ws = reinterpret_cast<float*>(smem_raw + L.ws);
  const int HI = p.HI, ld = tc_ld(p.DI), nk = p.DI / 16;
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
  const int base = int(blockIdx.y) * kTcTileKeys;
  const int64_t t0 = int64_t(blockIdx.x) * p.qb;
  const int tn = int(min(int64_t(p.qb), p.T - t0));
  const int s0w = base + kTcWarpKeys * warp;  // this warp's keys
  T* slice = ks + kTcWarpKeys * warp * ld;
  tc_stage_keys<T>(p, s0w, p.S, slice);
  tc_stage_query<T>(p, t0, qs, ws);
  cp_async_commit();
  uint32_t a[2][kTcMaxKSteps][4];
  const int s = s0w + tc_key_of_lane(lane);
  float* out = static_cast<float*>(p.logits);
  for (int i = 0; i < tn; ++i) {
    const int cur = i & 1;
    // q[t0 + i] has landed and is visible to all; every warp is done with the other buffer.
    cp_async_wait<0>();
    __syncthreads();
    if (i == 0) tc_load_afrag(a, slice, ld, nk);
    if (i + 1 < tn) {
      tc_stage_query<T>(p, t0 + i + 1, qs + (cur ^ 1) * HI * ld, ws + (cur ^ 1) * HI);
      cp_async_commit();
    }
    const int64_t t = t0 + i;
    int lo, hi;
    tc_visible_range(p, t, lo, hi);
    float v = neg_inf<float>();
    if (lo < hi && base < hi && base + kTcTileKeys > lo)  // the tile holds visible keys (uniform)
      v = tc_score_query<T>(a, qs + cur * HI * ld, ld, ws + cur * HI, HI, nk);
    if (s < p.S) out[t * p.S + s] = (s >= lo && s < hi) ? v : neg_inf<float>();
  }
}

// ---------------------------------------------------------------------------------------------
// indexer_topk
// ---------------------------------------------------------------------------------------------

struct TcTopkSmem {
  size_t qs, ks, ws, ts, sel, total;
};

// Byte offsets: q[QB][HI][ld], key slices [kTcTileKeys][ld], w[QB][HI] fp32, tile scores
// [QB][kTcTileKeys] fp32, then the selection state (topk_select.cuh), 16-byte aligned.
__host__ __device__ inline TcTopkSmem tc_topk_smem(int QB, int HI, int DI, int topk) {
  const size_t row = size_t(tc_ld(DI)) * 2;
  TcTopkSmem L{};
  L.qs = 0;
  L.ks = L.qs + size_t(QB) * HI * row;
  L.ws = L.ks + size_t(kTcTileKeys) * row;
  L.ts = L.ws + size_t(QB) * HI * sizeof(float);
  L.sel = (L.ts + size_t(QB) * kTcTileKeys * sizeof(float) + 15) / 16 * 16;
  L.total = L.sel + topk_select_smem<float>(QB, topk);
  return L;
}

static_assert(kTcThreads == kSelThreads && kTcTileKeys <= kSelThreads, "TopkSelect's block and tile sizes");

// grid ceil(T / QB), kTcThreads threads; p.cap (C's flush threshold) in [kTcTileKeys, kSortN].
template <typename T, int QB>
__global__ void __launch_bounds__(kTcThreads) indexer_topk_tc_kernel(const IndexerParams p) {
  unsigned char* smem_raw = dynamic_smem();
  const TcTopkSmem L = tc_topk_smem(QB, p.HI, p.DI, p.topk);
  T* qs = reinterpret_cast<T*>(smem_raw + L.qs);
  T* ks = reinterpret_cast<T*>(smem_raw + L.ks);
  float* ws = reinterpret_cast<float*>(smem_raw + L.ws);
  float* ts = reinterpret_cast<float*>(smem_raw + L.ts);
  TopkSelect<float, QB> sel(smem_raw + L.sel, p.topk, p.cap);
  const int HI = p.HI, ld = tc_ld(p.DI), nk = p.DI / 16;
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
  const int64_t t0 = int64_t(blockIdx.x) * QB;

  // Visible ranges (empty for t >= T) and their union over the queries that see any key.
  int lo[QB], hi[QB];
  int ulo = INT_MAX, uhi = 0;
#pragma unroll
  for (int q = 0; q < QB; ++q) {
    lo[q] = hi[q] = 0;
    if (t0 + q < p.T) tc_visible_range(p, t0 + q, lo[q], hi[q]);
    if (lo[q] < hi[q]) {
      ulo = min(ulo, lo[q]);
      uhi = max(uhi, hi[q]);
    }
  }
  if (ulo >= uhi) ulo = uhi = 0;  // nobody sees a key: every output is padding
  const int a0 = ulo & ~15;       // tiles start at multiples of 16 (tc_score.cuh)

#pragma unroll
  for (int q = 0; q < QB; ++q) tc_stage_query<T>(p, t0 + q, qs + q * HI * ld, ws + q * HI);
  cp_async_commit();
  T* slice = ks + kTcWarpKeys * warp * ld;
  if (a0 < uhi) tc_stage_keys<T>(p, a0 + kTcWarpKeys * warp, uhi, slice);
  cp_async_wait<0>();
  __syncthreads();  // q and w visible to all

  uint32_t a[2][kTcMaxKSteps][4];
  for (int base = a0; base < uhi; base += kTcTileKeys) {
    cp_async_wait<0>();
    __syncwarp();  // this warp's slice has landed, for all of its lanes
    tc_load_afrag(a, slice, ld, nk);
    __syncwarp();  // every lane has read the slice before it is overwritten
    const int next = base + kTcTileKeys;
    if (next < uhi) tc_stage_keys<T>(p, next + kTcWarpKeys * warp, uhi, slice);
#pragma unroll
    for (int q = 0; q < QB; ++q) {
      if (lo[q] < hi[q] && base < hi[q] && next > lo[q])  // uniform: the tile holds keys q sees
        ts[q * kTcTileKeys + kTcWarpKeys * warp + tc_key_of_lane(lane)] =
            tc_score_query<T>(a, qs + q * HI * ld, ld, ws + q * HI, HI, nk);
    }
    __syncthreads();  // tile scores visible to all
#pragma unroll
    for (int q = 0; q < QB; ++q) {
      if (lo[q] < hi[q] && base < hi[q] && next > lo[q])  // ends with a barrier
        sel.add_tile(q, ts + q * kTcTileKeys, kTcTileKeys, base, lo[q], hi[q]);
    }
  }
#pragma unroll
  for (int q = 0; q < QB; ++q) {
    sel.flush(q);
    const int64_t t = t0 + q;
    if (t < p.T) sel.store(q, static_cast<float*>(p.out_val) + t * p.topk, p.out_idx + t * p.topk);
  }
}

}  // namespace glm5::cuda
