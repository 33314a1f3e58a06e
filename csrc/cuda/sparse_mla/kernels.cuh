// Sparse MLA (MQA / absorbed form) CUDA kernels: forward, backward and the deterministic per-key
// reduction of the backward's key-gradient rows. Semantics: glm5/ops/reference.py (sparse_mla).
//
// Simple, clearly correct kernels first (CUDA cores, fp32 accumulation, fp64 for fp64 inputs); no
// tensor cores yet. Shared-memory tiles use an odd row stride, so a warp whose lanes read the same
// column of different rows hits 32 different banks.
//
// Forward: one CTA per (query, group of hb heads). The query's heads are staged in shared memory,
// then the K selected keys stream through shared memory bk at a time: scores (one thread per
// (head, key) pair), an online softmax per head (one warp per head, running max m and sum l),
// and acc[h, :] = acc * alpha + P V (each thread owns fixed (head, column) elements). Slots with
// index -1 (or outside [0, S)) are skipped; a query with no valid slot gets out = 0, lse = +inf.
//
// Backward: one CTA per query, all heads (in groups of hb), per block of bk keys:
//   P = exp(scale s - lse), dP = dO V^T, dS = P (dP - Delta) scale, Delta = rowsum(dO * O)
//   dq[h] += dS[h, :] K          (a compute-dtype buffer the CTA owns: no atomics)
//   dk[j] += dS[:, j]^T q + P[:, j]^T dO   (summed over every head in shared memory)
// and writes each valid slot's dk row to a per-(t, slot) buffer. The rows of one key are then
// summed in increasing (t, slot) order after a stable radix sort by key (sparse_mla_reduce_kernel):
// deterministic and independent of the launch configuration and of the query chunking.
#pragma once
#include <cuda_runtime.h>

#include "../common/device_utils.cuh"
#include "params.h"

namespace glm5::cuda {

constexpr int kSparseMlaThreads = 256;

// Shared-memory bytes of the forward for a given tiling (the host picks hb/bk that fit).
template <typename ct>
__host__ __device__ inline size_t sparse_mla_fwd_smem(int hb, int bk, int ld, int dv) {
  return sizeof(ct) * (size_t(hb) * ld + size_t(bk) * ld + size_t(hb) * dv + size_t(hb) * bk + 3 * size_t(hb)) +
         sizeof(int) * (size_t(bk) + 1);
}

template <typename T, typename ct>
__global__ void __launch_bounds__(kSparseMlaThreads) sparse_mla_fwd_kernel(const SparseMlaFwdParams p) {
  unsigned char* smem_raw = dynamic_smem();
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;
  const int64_t t = blockIdx.x;
  const int h0 = blockIdx.y * p.hb;
  const int hb = min(p.hb, p.H - h0);
  const int BK = p.bk, D = p.D, dv = p.dv, ld = p.ld, K = p.K, S = p.S;
  const ct scale = static_cast<ct>(p.scale);

  ct* qs = reinterpret_cast<ct*>(smem_raw);  // [hb][ld]
  ct* ks = qs + size_t(p.hb) * ld;           // [BK][ld]
  ct* acc = ks + size_t(BK) * ld;            // [hb][dv]
  ct* ps = acc + size_t(p.hb) * dv;          // [hb][BK] scores, then probabilities
  ct* m = ps + size_t(p.hb) * BK;            // [hb] running max of the scaled scores
  ct* l = m + p.hb;                          // [hb] running sum
  ct* alpha = l + p.hb;                      // [hb] rescale factor of the current block
  int* key = reinterpret_cast<int*>(alpha + p.hb);  // [BK] key of each slot, -1 = skip
  int* any_valid = key + BK;

  const T* qg = static_cast<const T*>(p.q) + (t * p.H + h0) * D;
  const T* kv = static_cast<const T*>(p.kv);
  for (int i = tid; i < hb * D; i += nthreads) qs[(i / D) * ld + i % D] = to_ct<ct>(qg[i]);
  for (int i = tid; i < hb * dv; i += nthreads) acc[i] = ct(0);
  for (int i = tid; i < hb; i += nthreads) {
    m[i] = neg_inf<ct>();
    l[i] = ct(0);
  }
  if (tid == 0) *any_valid = 0;
  const int32_t* idx_row = p.indices + t * K;

  for (int k0 = 0; k0 < K; k0 += BK) {
    const int nb = min(BK, K - k0);
    __syncthreads();  // the previous block's tiles are no longer read
    for (int j = tid; j < BK; j += nthreads) {
      const int s = j < nb ? idx_row[k0 + j] : -1;
      const bool ok = s >= 0 && s < S;
      key[j] = ok ? s : -1;
      if (ok) *any_valid = 1;
    }
    __syncthreads();
    for (int i = tid; i < nb * D; i += nthreads) {
      const int j = i / D, d = i % D;
      const int s = key[j];
      ks[j * ld + d] = s >= 0 ? to_ct<ct>(kv[int64_t(s) * D + d]) : ct(0);
    }
    __syncthreads();
    // Scaled scores, -inf on skipped slots and on the padding of a partial block.
    for (int i = tid; i < hb * BK; i += nthreads) {
      const int h = i / BK, j = i % BK;
      ct v = neg_inf<ct>();
      if (j < nb && key[j] >= 0) {
        const ct* a = qs + h * ld;
        const ct* b = ks + j * ld;
        ct dot = 0;
        for (int d = 0; d < D; ++d) dot += a[d] * b[d];
        v = dot * scale;
      }
      ps[h * BK + j] = v;
    }
    __syncthreads();
    // Online softmax: one warp per head.
    for (int h = warp; h < hb; h += nwarps) {
      ct mx = neg_inf<ct>();
      for (int j = lane; j < BK; j += 32) mx = fmax(mx, ps[h * BK + j]);
      mx = warp_max(mx);
      const ct m_old = m[h];
      const ct m_new = fmax(m_old, mx);
      ct sum = 0;
      for (int j = lane; j < BK; j += 32) {
        const ct s = ps[h * BK + j];
        const ct e = s == neg_inf<ct>() ? ct(0) : dev_exp(s - m_new);
        ps[h * BK + j] = e;
        sum += e;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const ct a = m_old == neg_inf<ct>() ? ct(0) : dev_exp(m_old - m_new);
        alpha[h] = a;
        l[h] = l[h] * a + sum;
        m[h] = m_new;
      }
    }
    __syncthreads();
    // acc = acc * alpha + P V: each thread owns the same (head, column) elements in every block.
    for (int i = tid; i < hb * dv; i += nthreads) {
      const int h = i / dv, d = i % dv;
      const ct* pr = ps + h * BK;
      ct v = acc[i] * alpha[h];
      for (int j = 0; j < nb; ++j) v += pr[j] * ks[j * ld + d];
      acc[i] = v;
    }
  }
  __syncthreads();
  const bool empty = *any_valid == 0;
  T* og = static_cast<T*>(p.out) + (t * p.H + h0) * dv;
  for (int i = tid; i < hb * dv; i += nthreads) {
    const int h = i / dv;
    og[i] = from_ct<T>(empty ? ct(0) : acc[i] / l[h]);
  }
  ct* lse = static_cast<ct*>(p.lse) + t * p.H + h0;
  for (int h = tid; h < hb; h += nthreads) lse[h] = empty ? static_cast<ct>(INFINITY) : m[h] + dev_log(l[h]);
}

// Shared-memory bytes of the backward for a given tiling.
template <typename ct>
__host__ __device__ inline size_t sparse_mla_bwd_smem(int H, int hb, int bk, int ld, int ldv, int D) {
  return sizeof(ct) * (size_t(bk) * ld + size_t(bk) * D + size_t(hb) * ld + size_t(hb) * ldv + 2 * size_t(hb) * bk +
                       size_t(H)) +
         sizeof(int) * size_t(bk);
}

template <typename T, typename ct>
__global__ void __launch_bounds__(kSparseMlaThreads) sparse_mla_bwd_kernel(const SparseMlaBwdParams p) {
  unsigned char* smem_raw = dynamic_smem();
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;
  const int64_t t = p.t0 + blockIdx.x;
  const int H = p.H, BK = p.bk, HB = p.hb, D = p.D, dv = p.dv, ld = p.ld, ldv = p.ldv, K = p.K, S = p.S;
  const ct scale = static_cast<ct>(p.scale);

  ct* ks = reinterpret_cast<ct*>(smem_raw);  // [BK][ld] gathered keys
  ct* dk = ks + size_t(BK) * ld;             // [BK][D] key-gradient rows of the block
  ct* qs = dk + size_t(BK) * D;              // [HB][ld] q of the head group
  ct* dos = qs + size_t(HB) * ld;            // [HB][ldv] dO of the head group
  ct* ps = dos + size_t(HB) * ldv;           // [HB][BK] P
  ct* dss = ps + size_t(HB) * BK;            // [HB][BK] scale * dS
  ct* delta = dss + size_t(HB) * BK;         // [H] rowsum(dO * O)
  int* key = reinterpret_cast<int*>(delta + H);  // [BK]

  const T* q = static_cast<const T*>(p.q) + t * H * D;
  const T* kv = static_cast<const T*>(p.kv);
  const T* dout = static_cast<const T*>(p.dout) + t * H * dv;
  const T* out = static_cast<const T*>(p.out) + t * H * dv;
  const ct* lse = static_cast<const ct*>(p.lse) + t * H;
  ct* dq = static_cast<ct*>(p.dq_acc) + t * H * D;
  ct* rows = static_cast<ct*>(p.rows) + (t - p.t0) * int64_t(K) * D;
  const int32_t* idx_row = p.indices + t * K;

  for (int h = warp; h < H; h += nwarps) {
    ct v = 0;
    for (int d = lane; d < dv; d += 32) v += to_ct<ct>(dout[h * dv + d]) * to_ct<ct>(out[h * dv + d]);
    v = warp_sum(v);
    if (lane == 0) delta[h] = v;
  }

  for (int k0 = 0; k0 < K; k0 += BK) {
    const int nb = min(BK, K - k0);
    __syncthreads();
    for (int j = tid; j < BK; j += nthreads) {
      const int s = j < nb ? idx_row[k0 + j] : -1;
      key[j] = (s >= 0 && s < S) ? s : -1;
    }
    __syncthreads();
    for (int i = tid; i < nb * D; i += nthreads) {
      const int j = i / D, d = i % D;
      const int s = key[j];
      ks[j * ld + d] = s >= 0 ? to_ct<ct>(kv[int64_t(s) * D + d]) : ct(0);
      dk[i] = ct(0);
    }
    for (int hg = 0; hg < H; hg += HB) {
      const int hb = min(HB, H - hg);
      __syncthreads();  // previous group's tiles are no longer read
      for (int i = tid; i < hb * D; i += nthreads) qs[(i / D) * ld + i % D] = to_ct<ct>(q[hg * D + i]);
      for (int i = tid; i < hb * dv; i += nthreads) dos[(i / dv) * ldv + i % dv] = to_ct<ct>(dout[hg * dv + i]);
      __syncthreads();
      for (int i = tid; i < hb * BK; i += nthreads) {
        const int h = i / BK, j = i % BK;
        ct pr = 0, g = 0;
        if (j < nb && key[j] >= 0) {
          const ct* kj = ks + j * ld;
          const ct* qh = qs + h * ld;
          const ct* oh = dos + h * ldv;
          ct s = 0, dp = 0;
          for (int d = 0; d < D; ++d) s += qh[d] * kj[d];
          for (int d = 0; d < dv; ++d) dp += oh[d] * kj[d];
          pr = dev_exp(s * scale - lse[hg + h]);  // lse = +inf (no key) gives 0
          g = pr * (dp - delta[hg + h]) * scale;
        }
        ps[h * BK + j] = pr;
        dss[h * BK + j] = g;
      }
      __syncthreads();
      // dq[h] += scale dS[h, :] K: each thread owns fixed (head, column) elements of dq.
      for (int i = tid; i < hb * D; i += nthreads) {
        const int h = i / D, d = i % D;
        const ct* g = dss + h * BK;
        ct v = dq[hg * D + i];
        for (int j = 0; j < nb; ++j) v += g[j] * ks[j * ld + d];
        dq[hg * D + i] = v;
      }
      // dk[j] += scale dS[:, j]^T q + P[:, j]^T dO, heads in increasing order.
      for (int i = tid; i < nb * D; i += nthreads) {
        const int j = i / D, d = i % D;
        ct v = dk[i];
        for (int h = 0; h < hb; ++h) {
          v += dss[h * BK + j] * qs[h * ld + d];
          if (d < dv) v += ps[h * BK + j] * dos[h * ldv + d];
        }
        dk[i] = v;
      }
    }
    __syncthreads();
    for (int i = tid; i < nb * D; i += nthreads) {
      const int j = i / D;
      if (key[j] >= 0) rows[int64_t(k0) * D + i] = dk[i];
    }
  }
}

// Sort keys of the chunk's slots: the key, or S for a skipped slot; values: the slot's row.
__global__ void sparse_mla_sort_keys_kernel(const int32_t* indices, int64_t n, int S, uint32_t* keys,
                                            int32_t* rows) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int32_t s = indices[i];
    keys[i] = (s >= 0 && s < S) ? uint32_t(s) : uint32_t(S);
    rows[i] = int32_t(i);
  }
}

// dkv[s] += the rows of key s in (t, slot) order: one CTA per key, threads over columns.
template <typename ct>
__global__ void sparse_mla_reduce_kernel(const SparseMlaReduceParams p) {
  const int s = blockIdx.x;
  __shared__ int64_t range[2];
  if (threadIdx.x == 0) {
    range[0] = lower_bound_u32(p.sorted_keys, p.n, uint32_t(s));
    range[1] = lower_bound_u32(p.sorted_keys, p.n, uint32_t(s) + 1u);
  }
  __syncthreads();
  const int64_t lo = range[0], hi = range[1];
  if (lo == hi) return;
  const ct* rows = static_cast<const ct*>(p.rows);
  ct* acc = static_cast<ct*>(p.dkv_acc) + int64_t(s) * p.D;
  for (int d = threadIdx.x; d < p.D; d += blockDim.x) {
    ct v = acc[d];
    for (int64_t i = lo; i < hi; ++i) v += rows[int64_t(p.sorted_rows[i]) * p.D + d];
    acc[d] = v;
  }
}

}  // namespace glm5::cuda
