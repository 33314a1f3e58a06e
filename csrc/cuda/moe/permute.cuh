// moe_permute on the GPU: a deterministic counting sort of the N*k (token, slot) entries by expert.
//
// 1. count:  one warp per chunk of kPermuteChunk entries counts its entries per expert
//            (warp-synchronous: __match_any_sync groups the lanes of one expert, its lowest lane adds).
// 2. scan:   one block scans every expert's chunk counts in chunk order (the chunk's base within
//            the expert) and the aligned segment sizes into offsets.
// 3. place:  each warp walks its chunk again in entry order; an entry's row is
//            offsets[e] + base[chunk, e] + (earlier entries of e in the chunk), so the order inside an
//            expert is the entry (token, slot) order: stable, no atomics, the same every run.
// 4. copy:   one warp per row of x_sorted copies its token's row (or writes zeros for padding),
//            so every output row is written exactly once.
#pragma once
#ifndef GLM5_CUDA_SIM  // the CPU simulator (tests/cuda_sim/cuda_sim.h) supplies cub::BlockScan
#include <cub/block/block_scan.cuh>
#endif

#include "../common/device_utils.cuh"
#include "common.cuh"

namespace glm5::moe {

constexpr int kPermuteScanThreads = 512;

// Counters of one chunk: shared memory when E is small enough, else the chunk's row of chunk_counts.
__device__ __forceinline__ int32_t* chunk_counters(const PermuteParams& p, int64_t chunk, int32_t* smem, bool use_smem) {
  return use_smem ? smem : p.chunk_counts + chunk * p.E;
}

// Per chunk and expert: how many of the chunk's entries chose the expert. Lanes of one round that
// chose the same expert form a __match_any_sync group whose lowest lane adds the group's size, so
// no two lanes update one counter at once; __syncwarp orders the rounds.
__global__ void permute_count_kernel(PermuteParams p, bool use_smem) {
  int32_t* permute_smem = reinterpret_cast<int32_t*>(glm5::cuda::dynamic_smem());
  const int lane = threadIdx.x;
  const int64_t chunk = blockIdx.x;
  int32_t* cnt = chunk_counters(p, chunk, permute_smem, use_smem);
  for (int e = lane; e < p.E; e += 32) cnt[e] = 0;
  __syncwarp();
  const int64_t begin = chunk * kPermuteChunk, end = min(begin + kPermuteChunk, p.L);
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t i = base + lane;
    const int32_t raw = i < end ? p.topk_idx[i] : -1;
    const bool valid = raw >= 0 && raw < p.E;
    const int32_t key = valid ? raw : -1;
    const unsigned mask = __match_any_sync(0xffffffffu, key);
    if (valid && lane == __ffs(mask) - 1) cnt[key] += __popc(mask);
    __syncwarp();
  }
  if (use_smem) {
    for (int e = lane; e < p.E; e += 32) p.chunk_counts[chunk * p.E + e] = cnt[e];
  }
}

// One block: chunk bases per expert (in place), counts, then the aligned offsets.
__global__ void permute_scan_kernel(PermuteParams p) {
  using Scan = cub::BlockScan<int64_t, kPermuteScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int64_t carry;
  for (int e = threadIdx.x; e < p.E; e += blockDim.x) {
    int64_t run = 0;
    for (int64_t c = 0; c < p.n_chunks; ++c) {
      const int32_t v = p.chunk_counts[c * p.E + e];
      p.chunk_counts[c * p.E + e] = static_cast<int32_t>(run);
      run += v;
    }
    p.counts[e] = run;
  }
  if (threadIdx.x == 0) {
    carry = 0;
    p.offsets[0] = 0;
  }
  __syncthreads();
  for (int e0 = 0; e0 < p.E; e0 += kPermuteScanThreads) {
    const int e = e0 + threadIdx.x;
    const int64_t seg = e < p.E ? ceil_div<int64_t>(p.counts[e], p.alignment) * p.alignment : 0;
    int64_t incl, total;
    Scan(tmp).InclusiveSum(seg, incl, total);
    if (e < p.E) p.offsets[e + 1] = carry + incl;
    __syncthreads();  // everyone has read carry (and tmp is free again)
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
}

__global__ void permute_place_kernel(PermuteParams p, bool use_smem) {
  int32_t* permute_smem = reinterpret_cast<int32_t*>(glm5::cuda::dynamic_smem());
  const int lane = threadIdx.x;
  const int64_t chunk = blockIdx.x;
  int32_t* cnt = chunk_counters(p, chunk, permute_smem, use_smem);
  // counters start at the chunk's first row of every expert (rows fit int32: checked on the host)
  for (int e = lane; e < p.E; e += 32) cnt[e] = static_cast<int32_t>(p.offsets[e]) + p.chunk_counts[chunk * p.E + e];
  __syncwarp();
  const int64_t begin = chunk * kPermuteChunk, end = min(begin + kPermuteChunk, p.L);
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t i = base + lane;
    const int32_t raw = i < end ? p.topk_idx[i] : -1;
    const bool valid = raw >= 0 && raw < p.E;
    const int32_t key = valid ? raw : -1;
    const unsigned mask = __match_any_sync(0xffffffffu, key);
    const int32_t first = valid ? cnt[key] : 0;
    __syncwarp();  // every lane has read its counter before the leader moves it
    if (valid) {
      const int32_t row = first + __popc(mask & ((1u << lane) - 1u));
      p.row_map[i] = row;
      p.src_token[row] = static_cast<int32_t>(i / p.k);
      if (lane == __ffs(mask) - 1) cnt[key] = first + __popc(mask);
    } else if (i < end) {
      p.row_map[i] = -1;
    }
    __syncwarp();
  }
}

// One warp per row of x_sorted, vec_t-wide copies (row_bytes and both bases are vec_t aligned).
template <typename vec_t>
__global__ void permute_copy_rows_kernel(RowCopyParams p) {
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int64_t n_vec = p.row_bytes / static_cast<int64_t>(sizeof(vec_t));
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32; r < p.rows;
       r += static_cast<int64_t>(gridDim.x) * warps) {
    const int32_t t = p.src_token[r];
    vec_t* dst = reinterpret_cast<vec_t*>(p.x_sorted + r * p.row_bytes);
    if (t >= 0) {
      const vec_t* src = reinterpret_cast<const vec_t*>(p.x + static_cast<int64_t>(t) * p.row_bytes);
      for (int64_t v = lane; v < n_vec; v += 32) dst[v] = src[v];
    } else {
      vec_t zero;
      memset(&zero, 0, sizeof(zero));
      for (int64_t v = lane; v < n_vec; v += 32) dst[v] = zero;
    }
  }
}

}  // namespace glm5::moe
