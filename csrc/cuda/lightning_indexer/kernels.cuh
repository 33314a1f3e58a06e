// Lightning-indexer CUDA kernels on CUDA cores: logits, their backward, and the fused top-k that never
// writes the [T, S] logits to global memory. Semantics: glm5/ops/reference.py (indexer_logits/_topk).
// bf16/fp16 inputs of supported shapes take the tensor-core kernels instead (tc_kernels.cuh); these
// serve fp32/fp64, the other shapes, and GLM5_INDEXER_SIMT=1.
//
// Simple, clearly correct kernels (fp32 accumulation, fp64 for fp64 inputs):
//   score(t, s) = sum_j w[t, j] * relu(q[t, j, :] . k[s, :]), heads j in increasing order, every
//   dot product in increasing d order, in the same code (indexer_score) for logits and top-k, so the
//   top-k's scores are bit-identical to the logits kernel's.
// - logits: one CTA per (key tile, query); q[t] and the key tile in shared memory, one thread per key.
// - backward: dq and dw by one CTA per query (its visible keys in tiles), dk by one CTA per key tile
//   (every query in increasing t): each output element is summed by one thread in a fixed order, so
//   the result is deterministic without atomics.
// - top-k: one CTA per query. Each tile of visible keys is scored into shared memory and offered to
//   the exact selection of topk_select.cuh (threshold filter, compaction, sorted merges; order: score
//   descending, then key ascending). NaN scores are treated as -inf (never selected; a slot whose score
//   is -inf is reported as -1), since raising would need a host sync.
// ks/ke are clamped to [0, S] in the kernels (the host does not read them: no sync).
#pragma once
#include <cuda_runtime.h>

#include <climits>

#include "../common/device_utils.cuh"
#include "params.h"
#include "topk_select.cuh"

namespace glm5::cuda {

constexpr int kIndexerThreads = 256;

// The visible key range of query t, clamped to [0, S].
__device__ __forceinline__ void visible_range(const IndexerParams& p, int64_t t, int& lo, int& hi) {
  lo = max(0, min(p.ks[t], p.S));
  hi = max(lo, min(p.ke[t], p.S));
}

// Stages q[t] ([HI][DI], row stride DI) and w[t] in shared memory as the compute type.
template <typename T, typename ct>
__device__ __forceinline__ void load_query(const IndexerParams& p, int64_t t, ct* qs, ct* ws) {
  const T* q = static_cast<const T*>(p.q) + t * p.HI * p.DI;
  const T* w = static_cast<const T*>(p.w) + t * p.HI;
  for (int i = threadIdx.x; i < p.HI * p.DI; i += blockDim.x) qs[i] = to_ct<ct>(q[i]);
  for (int i = threadIdx.x; i < p.HI; i += blockDim.x) ws[i] = to_ct<ct>(w[i]);
}

// Stages keys [s0, s0 + n) in shared memory, row stride ldk.
template <typename T, typename ct>
__device__ __forceinline__ void load_keys(const IndexerParams& p, int s0, int n, ct* kt) {
  const T* k = static_cast<const T*>(p.k) + int64_t(s0) * p.DI;
  for (int i = threadIdx.x; i < n * p.DI; i += blockDim.x) kt[(i / p.DI) * p.ldk + i % p.DI] = to_ct<ct>(k[i]);
}

// sum_j w[j] * relu(q[j] . key) (relu keeps NaN, as torch's).
template <typename ct>
__device__ __forceinline__ ct indexer_score(const ct* qs, const ct* ws, const ct* key, int HI, int DI) {
  ct total = 0;
  for (int j = 0; j < HI; ++j) {
    const ct* qj = qs + j * DI;
    ct dot = 0;
    for (int d = 0; d < DI; ++d) dot += qj[d] * key[d];
    total += ws[j] * (dot < ct(0) ? ct(0) : dot);
  }
  return total;
}

template <typename ct>
__host__ __device__ inline size_t indexer_logits_smem(int HI, int DI, int bs, int ldk) {
  return sizeof(ct) * (size_t(HI) * DI + HI + size_t(bs) * ldk);
}

// grid (T, ceil(S / bs)), bs threads: one key per thread.
template <typename T, typename ct>
__global__ void indexer_logits_kernel(const IndexerParams p) {
  unsigned char* smem_raw = dynamic_smem();
  ct* qs = reinterpret_cast<ct*>(smem_raw);  // [HI][DI]
  ct* ws = qs + p.HI * p.DI;                  // [HI]
  ct* kt = ws + p.HI;                         // [bs][ldk]
  const int64_t t = blockIdx.x;
  const int s0 = blockIdx.y * p.bs, n = min(p.bs, p.S - s0);
  int lo, hi;
  visible_range(p, t, lo, hi);
  ct* out = static_cast<ct*>(p.logits) + t * p.S + s0;
  if (s0 + n <= lo || s0 >= hi) {  // the whole tile is masked (uniform over the CTA)
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = neg_inf<ct>();
    return;
  }
  load_query<T, ct>(p, t, qs, ws);
  load_keys<T, ct>(p, s0, n, kt);
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int s = s0 + i;
    out[i] = (s >= lo && s < hi) ? indexer_score(qs, ws, kt + i * p.ldk, p.HI, p.DI) : neg_inf<ct>();
  }
}

template <typename ct>
__host__ __device__ inline size_t indexer_bwd_q_smem(int HI, int DI, int bs, int ldk) {
  return sizeof(ct) * (size_t(HI) * DI * 2 + 2 * size_t(HI) + size_t(bs) * ldk + 2 * size_t(HI) * bs + bs);
}

// dq[t] and dw[t]: one CTA per query over its visible keys, bs keys at a time.
//   P[j, s] = grad[t, s] w[j] [q_j . k_s > 0]: dq[j] += sum_s P[j, s] k_s; dw[j] += sum_s grad relu(q_j . k_s)
template <typename T, typename ct>
__global__ void __launch_bounds__(kIndexerThreads) indexer_bwd_q_kernel(const IndexerParams p) {
  unsigned char* smem_raw = dynamic_smem();
  const int HI = p.HI, DI = p.DI, bs = p.bs, ldk = p.ldk;
  ct* qs = reinterpret_cast<ct*>(smem_raw);  // [HI][DI]
  ct* ws = qs + HI * DI;                      // [HI]
  ct* dq = ws + HI;                           // [HI][DI] accumulator
  ct* dw = dq + HI * DI;                      // [HI]
  ct* kt = dw + HI;                           // [bs][ldk]
  ct* P = kt + bs * ldk;                      // [HI][bs]
  ct* R = P + HI * bs;                        // [HI][bs] grad * relu(dot)
  ct* g = R + HI * bs;                        // [bs] grad of the tile
  const int64_t t = blockIdx.x;
  int lo, hi;
  visible_range(p, t, lo, hi);
  load_query<T, ct>(p, t, qs, ws);
  for (int i = threadIdx.x; i < HI * DI; i += blockDim.x) dq[i] = ct(0);
  for (int i = threadIdx.x; i < HI; i += blockDim.x) dw[i] = ct(0);
  const ct* grad = static_cast<const ct*>(p.grad) + t * p.S;
  for (int s0 = lo; s0 < hi; s0 += bs) {
    const int n = min(bs, hi - s0);
    __syncthreads();
    load_keys<T, ct>(p, s0, n, kt);
    for (int i = threadIdx.x; i < n; i += blockDim.x) g[i] = grad[s0 + i];
    __syncthreads();
    for (int i = threadIdx.x; i < HI * bs; i += blockDim.x) {
      const int j = i / bs, s = i % bs;
      ct pv = 0, rv = 0;
      if (s < n) {
        const ct* qj = qs + j * DI;
        const ct* ks = kt + s * ldk;
        ct dot = 0;
        for (int d = 0; d < DI; ++d) dot += qj[d] * ks[d];
        if (dot > ct(0)) {
          pv = g[s] * ws[j];
          rv = g[s] * dot;
        }
      }
      P[i] = pv;
      R[i] = rv;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < HI * DI; i += blockDim.x) {
      const int j = i / DI, d = i % DI;
      ct v = dq[i];
      for (int s = 0; s < n; ++s) v += P[j * bs + s] * kt[s * ldk + d];
      dq[i] = v;
    }
    for (int j = threadIdx.x; j < HI; j += blockDim.x) {
      ct v = dw[j];
      for (int s = 0; s < n; ++s) v += R[j * bs + s];
      dw[j] = v;
    }
  }
  __syncthreads();
  ct* dq_out = static_cast<ct*>(p.dq) + t * HI * DI;
  ct* dw_out = static_cast<ct*>(p.dw) + t * HI;
  for (int i = threadIdx.x; i < HI * DI; i += blockDim.x) dq_out[i] = dq[i];
  for (int j = threadIdx.x; j < HI; j += blockDim.x) dw_out[j] = dw[j];
}

template <typename ct>
__host__ __device__ inline size_t indexer_bwd_k_smem(int HI, int DI, int bs, int ldk) {
  return sizeof(ct) * (size_t(HI) * DI + HI + size_t(bs) * ldk + size_t(bs) * DI + size_t(HI) * bs + bs);
}

// dk for a tile of bs keys: one CTA, every query in increasing t order.
//   dk[s] += sum_j P[j, s] q_j with P[j, s] = grad[t, s] w[t, j] [q_j . k_s > 0] (visible s only)
template <typename T, typename ct>
__global__ void __launch_bounds__(kIndexerThreads) indexer_bwd_k_kernel(const IndexerParams p) {
  unsigned char* smem_raw = dynamic_smem();
  const int HI = p.HI, DI = p.DI, bs = p.bs, ldk = p.ldk;
  ct* qs = reinterpret_cast<ct*>(smem_raw);  // [HI][DI]
  ct* ws = qs + HI * DI;                      // [HI]
  ct* kt = ws + HI;                           // [bs][ldk]
  ct* dk = kt + bs * ldk;                     // [bs][DI] accumulator
  ct* P = dk + bs * DI;                       // [HI][bs]
  ct* g = P + HI * bs;                        // [bs]
  const int s0 = blockIdx.x * bs, n = min(bs, p.S - s0);
  load_keys<T, ct>(p, s0, n, kt);
  for (int i = threadIdx.x; i < n * DI; i += blockDim.x) dk[i] = ct(0);
  for (int64_t t = 0; t < p.T; ++t) {
    int lo, hi;
    visible_range(p, t, lo, hi);
    if (s0 + n <= lo || s0 >= hi) continue;  // uniform over the CTA
    __syncthreads();
    load_query<T, ct>(p, t, qs, ws);
    const ct* grad = static_cast<const ct*>(p.grad) + t * p.S + s0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) g[i] = grad[i];
    __syncthreads();
    for (int i = threadIdx.x; i < HI * bs; i += blockDim.x) {
      const int j = i / bs, s = i % bs;
      ct pv = 0;
      if (s < n && s0 + s >= lo && s0 + s < hi) {
        const ct* qj = qs + j * DI;
        const ct* ks = kt + s * ldk;
        ct dot = 0;
        for (int d = 0; d < DI; ++d) dot += qj[d] * ks[d];
        if (dot > ct(0)) pv = g[s] * ws[j];
      }
      P[i] = pv;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n * DI; i += blockDim.x) {
      const int s = i / DI, d = i % DI;
      ct v = dk[i];
      for (int j = 0; j < HI; ++j) v += P[j * bs + s] * qs[j * DI + d];
      dk[i] = v;
    }
  }
  __syncthreads();
  ct* dk_out = static_cast<ct*>(p.dk) + int64_t(s0) * DI;
  for (int i = threadIdx.x; i < n * DI; i += blockDim.x) dk_out[i] = dk[i];
}

// ---------------------------------------------------------------------------------------------
// Top-k
// ---------------------------------------------------------------------------------------------

// Byte offset of the selection state (after q, w, the key tile and the tile scores) and the total.
template <typename ct>
__host__ __device__ inline size_t indexer_topk_sel_offset(int HI, int DI, int bs, int ldk) {
  return (sizeof(ct) * (size_t(HI) * DI + HI + size_t(bs) * ldk + size_t(bs)) + 15) / 16 * 16;
}
template <typename ct>
__host__ __device__ inline size_t indexer_topk_smem(int HI, int DI, int bs, int ldk, int topk) {
  return indexer_topk_sel_offset<ct>(HI, DI, bs, ldk) + topk_select_smem<ct>(1, topk);
}

static_assert(kIndexerThreads == kSelThreads, "indexer_topk_kernel runs TopkSelect's block size");

// One CTA per query; bs <= kIndexerThreads keys per tile, p.cap in [kIndexerThreads, kSortN].
template <typename T, typename ct>
__global__ void __launch_bounds__(kIndexerThreads) indexer_topk_kernel(const IndexerParams p) {
  unsigned char* smem_raw = dynamic_smem();
  const int HI = p.HI, DI = p.DI, bs = p.bs, ldk = p.ldk;
  ct* qs = reinterpret_cast<ct*>(smem_raw);  // [HI][DI]
  ct* ws = qs + HI * DI;                      // [HI]
  ct* kt = ws + HI;                           // [bs][ldk]
  ct* ts = kt + bs * ldk;                     // [bs] tile scores
  TopkSelect<ct, 1> sel(smem_raw + indexer_topk_sel_offset<ct>(HI, DI, bs, ldk), p.topk, p.cap);
  const int64_t t = blockIdx.x;
  int lo, hi;
  visible_range(p, t, lo, hi);
  load_query<T, ct>(p, t, qs, ws);
  for (int s0 = lo; s0 < hi; s0 += bs) {
    const int n = min(bs, hi - s0);
    __syncthreads();  // the previous tile's keys are no longer read
    load_keys<T, ct>(p, s0, n, kt);
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) ts[i] = indexer_score(qs, ws, kt + i * ldk, HI, DI);
    __syncthreads();
    sel.add_tile(0, ts, n, s0, lo, hi);
  }
  sel.flush(0);
  sel.store(0, static_cast<ct*>(p.out_val) + t * p.topk, p.out_idx + t * p.topk);
}

}  // namespace glm5::cuda
