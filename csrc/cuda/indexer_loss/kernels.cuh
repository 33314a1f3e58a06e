// CUDA kernels of the indexer KL loss (glm5::indexer_kl_loss_fwd / _bwd). Semantics: glm5/ops/reference.py
// (indexer_kl_loss) and csrc/cpu/indexer_loss.cpp; same formulas, per query t over its key set:
//   P[s]  = sum_h exp(sm * q[t,h] . kv[s] - lse[t,h])   (heads with lse = +inf skipped: they saw nothing)
//   I[s]  = sum_j w[t,j] * relu(q_idx[t,j] . k_idx[s])
//   norm  = max(sum P, tiny), p = P / norm, mass = sum p, lse_i = logsumexp(I)
//   KL    = sum_{p > 0} p (log p - I + lse_i)                    (empty set: 0)
//   dI[s] = grad[t] * mass * exp(I[s] - lse_i) - grad[t] * p[s]
//   dw[t,j] = sum_s dI relu(q_idx[t,j] . k_idx[s]); G[j,s] = dI w[t,j] [q_idx[t,j] . k_idx[s] > 0]
//   dq_idx[t,j] = sum_s G[j,s] k_idx[s];  dk_idx[s] = sum over (t, slot) of sum_j G[j,s] q_idx[t,j]
// The key set: dense (indices null) every visible key lo <= s < hi; sparse the slots k of indices[t] whose
// key is visible (a repeated key counts once per slot). lo/hi are ks/ke clamped to [0, S] (the host does
// not read them), so a slot value outside [0, S) is never in the set.
//
// Simple CUDA-core kernels, clearly correct first (fp32 accumulation, fp64 for fp64 inputs):
// - One CTA per query (forward, and backward dq_idx/dw) streams its set through shared memory in tiles of
//   bs positions (dense: keys lo + k0 ..; sparse: slots k0 ..), recomputing P and I per tile. Pass 1 folds
//   sum P and an online logsumexp of I; pass 2 recomputes the tile and forms the KL terms, or dI and the
//   query's gradients. No [T, S] tensor ever exists.
// - dk_idx, a reduction over queries, without atomics. Dense: one CTA per key tile loops over every query
//   in increasing t, recomputing dI from the per-query statistics pass 1 saved. Sparse: pass 2 saves dI
//   per slot ([T, K]); the slots are stable-radix-sorted by key and one CTA per key sums its slots in
//   (t, slot) order. Each output element is a sequential sum in a fixed order: deterministic run to run,
//   and (sparse) bitwise independent of the query chunking of the sort. (The per-query sums over tiles
//   follow the tile size, which the host picks from the shapes and the GPU's shared memory.)
// - Every per-key quantity (dot products in increasing d, P over heads in increasing h, I over indexer
//   heads in increasing j) is computed by the same code in every kernel, so the ReLU masks and dI agree
//   bit for bit between the dq_idx/dw and the dk_idx kernels.
// - bf16/fp16 main attention inputs on Hopper: P is computed once per op call and chunk of queries
//   [q0, q1) by a warpgroup-MMA kernel (probs_wgmma_kernel.cuh) into p.P_pre, which score_tile then reads
//   (the kv rows and the head loop are skipped): the tile kernels keep only the indexer's dot products.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "../common/device_utils.cuh"
#include "params.h"

namespace glm5::cuda {

constexpr int kLossThreads = 256;        // per-query and key-tile kernels
constexpr int kLossReduceThreads = 128;  // sparse dk: one CTA per key

template <typename ct>
__host__ __device__ constexpr ct loss_tiny() {
  return std::numeric_limits<ct>::min();  // torch.finfo(dtype).tiny: the reference's normaliser floor
}

// ---- shared memory ------------------------------------------------------------------------------

// Offsets (in compute-type elements) of the arrays of the tile kernels; the int array `key` follows.
struct LossSmemOffsets {
  size_t qi, wi, lse, qh, kvt, kt, sidx, e, P, I, dI, red, acc, n_ct;
};

__host__ __device__ inline LossSmemOffsets loss_smem_offsets(const IndexerLossParams& p, size_t acc_elems) {
  LossSmemOffsets o{};
  size_t c = 0;
  o.qi = c, c += size_t(p.HI) * p.ldi;  // [HI][ldi] q_idx[t]
  o.wi = c, c += size_t(p.HI);          // [HI] w[t]
  o.lse = c, c += size_t(p.H);          // [H] lse[t]
  o.qh = c, c += size_t(p.hb) * p.ldm;  // [hb][ldm] one chunk of q[t]'s heads
  o.kvt = c, c += size_t(p.bs) * p.ldm;  // [bs][ldm] kv rows of the tile (0 off the set)
  o.kt = c, c += size_t(p.bs) * p.ldi;   // [bs][ldi] k_idx rows of the tile (0 off the set)
  o.sidx = c, c += size_t(p.HI) * p.bs;  // [HI][bs] q_idx . k_idx, then (backward) G
  o.e = c, c += size_t(p.hb) * p.bs;     // [hb][bs] exp(sm q.kv - lse) of the head chunk
  o.P = c, c += size_t(p.bs);            // [bs] head-summed target, unnormalised (0 off the set)
  o.I = c, c += size_t(p.bs);            // [bs] indexer logits (-inf off the set)
  o.dI = c, c += size_t(p.bs);           // [bs] backward: dLoss/dI (0 off the set)
  o.red = c, c += 8;                     // per-query scalars (see kStat*)
  o.acc = c, c += acc_elems;             // backward accumulators (kernel specific)
  o.n_ct = c;
  return o;
}

template <typename ct>
__host__ __device__ inline size_t loss_smem_bytes(const IndexerLossParams& p, size_t acc_elems) {
  return sizeof(ct) * loss_smem_offsets(p, acc_elems).n_ct + sizeof(int) * (size_t(p.bs) + 1);
}

// Host: the largest tiling (bs keys x hb heads, from 32 x 16; bs shrinks to 8 first, then hb) whose shared
// memory smem(p) fits in limit. Sets p.bs / p.hb and returns smem(p) (above limit when nothing fits).
template <typename SmemFn>
inline size_t loss_pick_tiling(IndexerLossParams& p, size_t limit, const SmemFn& smem) {
  p.bs = 32;
  p.hb = p.H < 1 ? 1 : (p.H < 16 ? p.H : 16);
  while (smem(p) > limit && (p.bs > 8 || p.hb > 1)) {
    if (p.bs > 8) p.bs /= 2; else p.hb = p.hb / 2 < 1 ? 1 : p.hb / 2;
  }
  return smem(p);
}

// Accumulator sizes: the per-query backward keeps dq_idx[t] and dw[t], the dense dk kernel its tile's rows.
__host__ __device__ inline size_t bwd_query_acc_elems(const IndexerLossParams& p) {
  return size_t(p.HI) * p.DI + size_t(p.HI);
}
__host__ __device__ inline size_t dk_dense_acc_elems(const IndexerLossParams& p) { return size_t(p.bs) * p.DI; }

// Per-query scalars in LossSmem::red and in the global stats rows [T, 4].
constexpr int kStatLse = 0;   // lse_i: logsumexp of I over the set
constexpr int kStatNorm = 1;  // max(sum P, tiny)
constexpr int kStatGm = 2;    // grad[t] * mass (forward: mass)
constexpr int kStatG = 3;     // grad[t]

template <typename ct>
struct LossSmem {
  ct *qi, *wi, *lse, *qh, *kvt, *kt, *sidx, *e, *P, *I, *dI, *red, *acc;
  int* key;    // [bs] key of each tile position, -1 = not in the set
  int* count;  // [1] number of positions in the set (pass 1)
};

template <typename ct>
__device__ inline LossSmem<ct> loss_smem(const IndexerLossParams& p, unsigned char* raw, size_t acc_elems) {
  const LossSmemOffsets o = loss_smem_offsets(p, acc_elems);
  ct* c = reinterpret_cast<ct*>(raw);
  LossSmem<ct> s;
  s.qi = c + o.qi, s.wi = c + o.wi, s.lse = c + o.lse, s.qh = c + o.qh, s.kvt = c + o.kvt, s.kt = c + o.kt;
  s.sidx = c + o.sidx, s.e = c + o.e, s.P = c + o.P, s.I = c + o.I, s.dI = c + o.dI, s.red = c + o.red;
  s.acc = c + o.acc;
  s.key = reinterpret_cast<int*>(c + o.n_ct);  // ct is 4 or 8 bytes: int-aligned
  s.count = s.key + p.bs;
  return s;
}

// ---- per-key arithmetic ---------------------------------------------------------------------------

// a . b over n elements, increasing index, one fma chain (the one dot product of every kernel here).
template <typename ct>
__device__ __forceinline__ ct dot_seq(const ct* a, const ct* b, int n) {
  ct v = 0;
  for (int d = 0; d < n; ++d) v = fma(a[d], b[d], v);
  return v;
}

template <typename ct>
__device__ __forceinline__ ct relu_keep_nan(ct x) {
  return x < ct(0) ? ct(0) : x;  // NaN stays NaN, like torch.relu
}

// dLoss/dI of one key in the set (the CPU's grad_row).
template <typename ct>
__device__ __forceinline__ ct loss_dI(ct P, ct I, const ct* stat) {
  return stat[kStatGm] * dev_exp(I - stat[kStatLse]) - stat[kStatG] * (P / stat[kStatNorm]);
}

// Clamped visible range of query t: 0 <= lo <= hi <= S.
__device__ __forceinline__ void loss_range(const IndexerLossParams& p, int64_t t, int& lo, int& hi) {
  lo = max(0, min(p.ks[t], p.S));
  hi = max(lo, min(p.ke[t], p.S));
}

// Number of set positions of query t: dense hi - lo keys, sparse K slots (some may be off the set).
__device__ __forceinline__ int loss_positions(const IndexerLossParams& p, int lo, int hi) {
  return p.indices != nullptr ? p.K : hi - lo;
}

// The key at position pos of query t's set, or -1 when that slot is not in the set.
__device__ __forceinline__ int loss_key(const IndexerLossParams& p, int64_t t, int lo, int hi, int pos) {
  if (p.indices == nullptr) return lo + pos;
  const int s = p.indices[t * p.K + pos];
  return (s >= lo && s < hi) ? s : -1;
}

// ---- staging --------------------------------------------------------------------------------------

// q_idx[t], w[t] and lse[t] into shared memory (the caller syncs before use).
template <typename Ti, typename ct>
__device__ inline void load_query(const IndexerLossParams& p, const LossSmem<ct>& s, int64_t t) {
  const Ti* qi = static_cast<const Ti*>(p.q_idx) + t * p.HI * p.DI;
  const Ti* w = static_cast<const Ti*>(p.w) + t * p.HI;
  const ct* lse = static_cast<const ct*>(p.lse) + t * p.H;
  for (int i = threadIdx.x; i < p.HI * p.DI; i += blockDim.x) s.qi[(i / p.DI) * p.ldi + i % p.DI] = to_ct<ct>(qi[i]);
  for (int j = threadIdx.x; j < p.HI; j += blockDim.x) s.wi[j] = to_ct<ct>(w[j]);
  for (int h = threadIdx.x; h < p.H; h += blockDim.x) s.lse[h] = lse[h];
}

// The kv (unless P is precomputed) and k_idx rows of the tile's keys (zeros where key = -1; the caller
// synced after writing key).
template <typename Ti, typename Tm, typename ct>
__device__ inline void load_rows(const IndexerLossParams& p, const LossSmem<ct>& s) {
  const Tm* kv = static_cast<const Tm*>(p.kv);
  const Ti* k_idx = static_cast<const Ti*>(p.k_idx);
  for (int i = threadIdx.x; p.P_pre == nullptr && i < p.bs * p.D; i += blockDim.x) {
    const int k = i / p.D, d = i % p.D, key = s.key[k];
    s.kvt[k * p.ldm + d] = key >= 0 ? to_ct<ct>(kv[int64_t(key) * p.D + d]) : ct(0);
  }
  for (int i = threadIdx.x; i < p.bs * p.DI; i += blockDim.x) {
    const int k = i / p.DI, d = i % p.DI, key = s.key[k];
    s.kt[k * p.ldi + d] = key >= 0 ? to_ct<ct>(k_idx[int64_t(key) * p.DI + d]) : ct(0);
  }
}

// Scores the tile whose key[] the caller wrote (then synced): kvt/kt rows, sidx[j][k] = q_idx_j . k_idx_k,
// P[k] and I[k] (0 and -inf where key = -1). Needs qi/wi/lse of query t loaded. Starts by loading rows, so
// the caller must have synced after the previous tile's last reader of kvt/kt/sidx/P/I; ends synced.
// With p.P_pre, P[k] is read from it at position k0 + k of query t's set instead (k0 may be negative in
// the dense dk kernel; positions of keys in the set are not).
template <typename Ti, typename Tm, typename ct>
__device__ inline void score_tile(const IndexerLossParams& p, const LossSmem<ct>& s, int64_t t, int k0) {
  const int bs = p.bs, HI = p.HI, DI = p.DI, D = p.D, H = p.H, ldi = p.ldi, ldm = p.ldm;
  const ct sm = static_cast<ct>(p.sm_scale);
  const ct inf = static_cast<ct>(INFINITY);
  load_rows<Ti, Tm, ct>(p, s);
  __syncthreads();
  for (int i = threadIdx.x; i < HI * bs; i += blockDim.x) {  // indexer dots, k fastest: odd ldi, no conflicts
    const int j = i / bs, k = i % bs;
    s.sidx[i] = s.key[k] >= 0 ? dot_seq(s.qi + j * ldi, s.kt + k * ldi, DI) : ct(0);
  }
  for (int k = threadIdx.x; k < bs; k += blockDim.x)
    s.P[k] = p.P_pre != nullptr && s.key[k] >= 0 ? static_cast<ct>(p.P_pre[(t - p.q0) * p.P_ld + k0 + k]) : ct(0);
  for (int h0 = 0; p.P_pre == nullptr && h0 < H; h0 += p.hb) {
    const int hn = min(p.hb, H - h0);
    // Safe to overwrite qh: its last readers (the previous chunk's exp loop) finished at the sync below.
    const Tm* q = static_cast<const Tm*>(p.q) + (t * H + h0) * int64_t(D);
    for (int i = threadIdx.x; i < hn * D; i += blockDim.x) s.qh[(i / D) * ldm + i % D] = to_ct<ct>(q[i]);
    __syncthreads();
    for (int i = threadIdx.x; i < hn * bs; i += blockDim.x) {
      const int hh = i / bs, k = i % bs;
      const ct l = s.lse[h0 + hh];
      ct v = 0;
      if (s.key[k] >= 0 && l != inf) v = dev_exp(fma(sm, dot_seq(s.qh + hh * ldm, s.kvt + k * ldm, D), -l));
      s.e[i] = v;
    }
    __syncthreads();
    for (int k = threadIdx.x; k < bs; k += blockDim.x) {  // heads in increasing order (same thread as the init)
      ct v = s.P[k];
      for (int hh = 0; hh < hn; ++hh) v += s.e[hh * bs + k];
      s.P[k] = v;
    }
  }
  __syncthreads();  // sidx visible (also when H = 0)
  for (int k = threadIdx.x; k < bs; k += blockDim.x) {
    ct v = -inf;
    if (s.key[k] >= 0) {
      v = 0;
      for (int j = 0; j < HI; ++j) v += s.wi[j] * relu_keep_nan(s.sidx[j * bs + k]);
    }
    s.I[k] = v;
  }
  __syncthreads();
}

// Writes the tile's keys (positions [k0, k0 + bs) of query t's set) after syncing with the previous tile's
// readers, then scores the tile.
template <typename Ti, typename Tm, typename ct>
__device__ inline void query_tile(const IndexerLossParams& p, const LossSmem<ct>& s, int64_t t, int lo, int hi,
                                  int k0, int npos) {
  __syncthreads();
  for (int k = threadIdx.x; k < p.bs; k += blockDim.x) s.key[k] = k0 + k < npos ? loss_key(p, t, lo, hi, k0 + k) : -1;
  __syncthreads();
  score_tile<Ti, Tm, ct>(p, s, t, k0);
}

// Pass 1 of a query CTA: folds every tile into sum P, the online logsumexp of I and the set size (warp 0,
// lanes over positions, fixed butterflies), then leaves red[kStatLse], red[kStatNorm], red[kStatGm] = mass
// and count in shared memory (synced). Returns the set size.
template <typename Ti, typename Tm, typename ct>
__device__ inline int query_stats(const IndexerLossParams& p, const LossSmem<ct>& s, int64_t t, int lo, int hi) {
  const int npos = loss_positions(p, lo, hi);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const ct ninf = neg_inf<ct>();
  ct z = 0, m = ninf, l = 0;
  int cnt = 0;
  for (int k0 = 0; k0 < npos; k0 += p.bs) {
    query_tile<Ti, Tm, ct>(p, s, t, lo, hi, k0, npos);
    if (warp == 0) {
      ct zp = 0, mp = ninf;
      int cp = 0;
      for (int k = lane; k < p.bs; k += 32) {
        zp += s.P[k];
        mp = fmax(mp, s.I[k]);
        cp += s.key[k] >= 0 ? 1 : 0;
      }
      zp = warp_sum(zp);
      mp = warp_max(mp);
      cp = warp_sum(cp);
      const ct m_new = fmax(m, mp);
      ct lp = 0;
      if (m_new != ninf) {
        for (int k = lane; k < p.bs; k += 32) lp += dev_exp(s.I[k] - m_new);  // -inf off the set: 0
      }
      lp = warp_sum(lp);
      l = (m == ninf ? ct(0) : l * dev_exp(m - m_new)) + lp;
      m = m_new;
      z += zp;
      cnt += cp;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const ct norm = fmax(z, loss_tiny<ct>());
    s.red[kStatLse] = cnt > 0 ? m + dev_log(l) : ct(0);
    s.red[kStatNorm] = norm;
    s.red[kStatGm] = z / norm;  // the mass: 1, less for an underflowed target, 0 for an all-zero one
    s.count[0] = cnt;
  }
  __syncthreads();
  return s.count[0];
}

// ---- forward ----------------------------------------------------------------------------------------

template <typename ct>
__host__ __device__ inline size_t loss_fwd_smem(const IndexerLossParams& p) {
  return loss_smem_bytes<ct>(p, 0);
}

// One CTA per query t of [q0, q1): loss[t] = KL(p_t || softmax(I_t)), 0 for an empty set.
template <typename Ti, typename Tm, typename ct>
__global__ void __launch_bounds__(kLossThreads) indexer_loss_fwd_kernel(const IndexerLossParams p) {
  unsigned char* smem_raw = dynamic_smem();
  const LossSmem<ct> s = loss_smem<ct>(p, smem_raw, 0);
  const int64_t t = p.q0 + blockIdx.x;
  int lo, hi;
  loss_range(p, t, lo, hi);
  load_query<Ti, ct>(p, s, t);  // (synced inside the first tile)
  const int cnt = query_stats<Ti, Tm, ct>(p, s, t, lo, hi);
  ct* loss = static_cast<ct*>(p.loss);
  if (cnt == 0) {  // uniform over the CTA
    if (threadIdx.x == 0) loss[t] = ct(0);
    return;
  }
  const ct lse_i = s.red[kStatLse], norm = s.red[kStatNorm];
  const int npos = loss_positions(p, lo, hi);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  ct total = 0;
  for (int k0 = 0; k0 < npos; k0 += p.bs) {
    query_tile<Ti, Tm, ct>(p, s, t, lo, hi, k0, npos);
    if (warp == 0) {
      ct part = 0;
      for (int k = lane; k < p.bs; k += 32) {
        if (s.key[k] < 0) continue;
        const ct pk = s.P[k] / norm;
        if (pk > ct(0)) part += pk * (dev_log(pk) - s.I[k] + lse_i);
      }
      total += warp_sum(part);
    }
  }
  if (threadIdx.x == 0) loss[t] = total;
}

// ---- backward: per query ----------------------------------------------------------------------------

template <typename ct>
__host__ __device__ inline size_t loss_bwd_query_smem(const IndexerLossParams& p) {
  return loss_smem_bytes<ct>(p, bwd_query_acc_elems(p));
}

// One CTA per query t of [q0, q1): dq_idx[t], dw[t]; saves stats[t] (dense dk kernel) or dI per slot (sparse).
template <typename Ti, typename Tm, typename ct>
__global__ void __launch_bounds__(kLossThreads) indexer_loss_bwd_query_kernel(const IndexerLossParams p) {
  unsigned char* smem_raw = dynamic_smem();
  const LossSmem<ct> s = loss_smem<ct>(p, smem_raw, bwd_query_acc_elems(p));
  const int HI = p.HI, DI = p.DI, bs = p.bs, ldi = p.ldi;
  ct* dq = s.acc;            // [HI][DI]
  ct* dw = s.acc + HI * DI;  // [HI]
  const int64_t t = p.q0 + blockIdx.x;
  int lo, hi;
  loss_range(p, t, lo, hi);
  load_query<Ti, ct>(p, s, t);
  for (int i = threadIdx.x; i < HI * DI; i += blockDim.x) dq[i] = ct(0);
  for (int j = threadIdx.x; j < HI; j += blockDim.x) dw[j] = ct(0);
  const int cnt = query_stats<Ti, Tm, ct>(p, s, t, lo, hi);
  const ct g = static_cast<const ct*>(p.grad)[t];
  if (threadIdx.x == 0) {
    s.red[kStatGm] = g * s.red[kStatGm];  // grad * mass
    s.red[kStatG] = g;
    ct* st = static_cast<ct*>(p.stats) + t * 4;
    for (int i = 0; i < 4; ++i) st[i] = s.red[i];
  }
  if (cnt == 0) return;  // dq/dw stay zero (the host zero-fills them); uniform over the CTA
  __syncthreads();
  const int npos = loss_positions(p, lo, hi);
  ct* dI_slots = p.indices != nullptr ? static_cast<ct*>(p.dI) + t * p.K : nullptr;
  for (int k0 = 0; k0 < npos; k0 += bs) {
    query_tile<Ti, Tm, ct>(p, s, t, lo, hi, k0, npos);
    for (int k = threadIdx.x; k < bs; k += blockDim.x) {
      const bool in = s.key[k] >= 0;
      const ct v = in ? loss_dI(s.P[k], s.I[k], s.red) : ct(0);
      s.dI[k] = v;
      if (in && dI_slots != nullptr) dI_slots[k0 + k] = v;
    }
    __syncthreads();
    // Row j (one thread): dw[j] += sum_k dI relu(x), then x <- G = dI w_j [x > 0] in place.
    for (int j = threadIdx.x; j < HI; j += blockDim.x) {
      ct v = dw[j];
      const ct wj = s.wi[j];
      for (int k = 0; k < bs; ++k) {
        const ct x = s.sidx[j * bs + k];
        v += s.dI[k] * relu_keep_nan(x);
        s.sidx[j * bs + k] = x > ct(0) ? s.dI[k] * wj : ct(0);
      }
      dw[j] = v;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < HI * DI; i += blockDim.x) {  // dq[j][d] += sum_k G[j][k] k_idx[k][d]
      const int j = i / DI, d = i % DI;
      ct v = dq[i];
      for (int k = 0; k < bs; ++k) v = fma(s.sidx[j * bs + k], s.kt[k * ldi + d], v);
      dq[i] = v;
    }
  }
  __syncthreads();
  ct* dq_out = static_cast<ct*>(p.dq) + t * HI * DI;
  ct* dw_out = static_cast<ct*>(p.dw) + t * HI;
  for (int i = threadIdx.x; i < HI * DI; i += blockDim.x) dq_out[i] = dq[i];
  for (int j = threadIdx.x; j < HI; j += blockDim.x) dw_out[j] = dw[j];
}

// ---- backward: dk_idx, dense ---------------------------------------------------------------------------

template <typename ct>
__host__ __device__ inline size_t loss_dk_dense_smem(const IndexerLossParams& p) {
  return loss_smem_bytes<ct>(p, dk_dense_acc_elems(p));
}

// One CTA per tile of bs keys [s0, s0 + nk); every query of [q0, q1) in increasing t whose visible range
// meets the tile: dk[s] += sum_j G[j][s] q_idx[t, j] with dI recomputed from stats[t] (written by the query
// kernel). dk (zero-filled by the host) is read first, so launches over consecutive query chunks add up to
// the same sequential sum in t.
template <typename Ti, typename Tm, typename ct>
__global__ void __launch_bounds__(kLossThreads) indexer_loss_bwd_dk_dense_kernel(const IndexerLossParams p) {
  unsigned char* smem_raw = dynamic_smem();
  const LossSmem<ct> s = loss_smem<ct>(p, smem_raw, dk_dense_acc_elems(p));
  const int HI = p.HI, DI = p.DI, bs = p.bs, ldi = p.ldi;
  const int s0 = blockIdx.x * bs, nk = min(bs, p.S - s0);
  ct* acc = s.acc;  // [bs][DI]
  ct* dk = static_cast<ct*>(p.dk) + int64_t(s0) * DI;
  for (int i = threadIdx.x; i < bs * DI; i += blockDim.x) acc[i] = i < nk * DI ? dk[i] : ct(0);
  const ct* stats = static_cast<const ct*>(p.stats);
  for (int64_t t = p.q0; t < p.q1; ++t) {
    int lo, hi;
    loss_range(p, t, lo, hi);
    const int a = max(lo, s0), b = min(hi, s0 + nk);
    if (a >= b) continue;  // no key of the tile is visible to t (uniform over the CTA)
    __syncthreads();       // the previous query's readers of qi/wi/lse/red/key/sidx are done
    load_query<Ti, ct>(p, s, t);
    if (threadIdx.x < 4) s.red[threadIdx.x] = stats[t * 4 + threadIdx.x];
    for (int k = threadIdx.x; k < bs; k += blockDim.x) s.key[k] = (s0 + k >= a && s0 + k < b) ? s0 + k : -1;
    __syncthreads();
    score_tile<Ti, Tm, ct>(p, s, t, s0 - lo);  // positions count from lo
    for (int k = threadIdx.x; k < bs; k += blockDim.x) s.dI[k] = s.key[k] >= 0 ? loss_dI(s.P[k], s.I[k], s.red) : ct(0);
    __syncthreads();
    for (int i = threadIdx.x; i < HI * bs; i += blockDim.x) {  // G, as the query kernel forms it
      const int j = i / bs, k = i % bs;
      s.sidx[i] = s.sidx[i] > ct(0) ? s.dI[k] * s.wi[j] : ct(0);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < bs * DI; i += blockDim.x) {  // acc[k][d] += sum_j G[j][k] q_idx[j][d]
      const int k = i / DI, d = i % DI;
      ct v = acc[i];
      for (int j = 0; j < HI; ++j) v = fma(s.sidx[j * bs + k], s.qi[j * ldi + d], v);
      acc[i] = v;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < nk * DI; i += blockDim.x) dk[i] = acc[i];
}

// ---- backward: dk_idx, sparse -----------------------------------------------------------------------

// Sort keys of the slots of queries [t0, t0 + n / K): the key when the slot is in the set, else S (sorted
// last, never reduced); the value is the slot number relative to t0 * K.
__global__ void indexer_loss_slot_keys_kernel(const IndexerLossParams p, uint32_t* keys, int32_t* slots) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < p.n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = p.t0 + i / p.K;
    int lo, hi;
    loss_range(p, t, lo, hi);
    const int key = loss_key(p, t, lo, hi, int(i % p.K));
    keys[i] = key >= 0 ? uint32_t(key) : uint32_t(p.S);
    slots[i] = int32_t(i);
  }
}

template <typename ct>
__host__ __device__ inline size_t loss_dk_sparse_smem(const IndexerLossParams& p) {
  return 2 * sizeof(int64_t) + sizeof(ct) * (2 * size_t(p.DI) + size_t(p.HI) * p.DI + 2 * size_t(p.HI));
}

// One CTA per key s: dk[s] += sum over its slots (t, k), in (t, k) order, of sum_j G[j] q_idx[t, j] with
// G[j] = dI[t, k] w[t, j] [q_idx[t, j] . k_idx[s] > 0]. dk holds the previous query chunks' sum.
template <typename Ti, typename ct>
__global__ void __launch_bounds__(kLossReduceThreads) indexer_loss_bwd_dk_sparse_kernel(const IndexerLossParams p) {
  unsigned char* smem_raw = dynamic_smem();
  const int HI = p.HI, DI = p.DI;
  int64_t* range = reinterpret_cast<int64_t*>(smem_raw);  // [2] the key's slots [e0, e1) in sorted order
  ct* kr = reinterpret_cast<ct*>(range + 2);               // [DI] k_idx[s]
  ct* acc = kr + DI;                                       // [DI]
  ct* qi = acc + DI;                                       // [HI][DI] q_idx[t] of the current slot
  ct* wg = qi + HI * DI;                                   // [HI] w[t]
  ct* coef = wg + HI;                                      // [HI] G
  const int s = blockIdx.x;
  if (threadIdx.x == 0) {
    range[0] = lower_bound_u32(p.sorted_keys, p.n, uint32_t(s));
    range[1] = lower_bound_u32(p.sorted_keys, p.n, uint32_t(s) + 1u);
  }
  __syncthreads();
  const int64_t e0 = range[0], e1 = range[1];
  if (e0 == e1) return;  // no slot of this chunk selects s (uniform)
  const Ti* q_idx = static_cast<const Ti*>(p.q_idx);
  const Ti* w = static_cast<const Ti*>(p.w);
  const Ti* k_idx = static_cast<const Ti*>(p.k_idx) + int64_t(s) * DI;
  const ct* dI = static_cast<const ct*>(p.dI);
  ct* dk = static_cast<ct*>(p.dk) + int64_t(s) * DI;
  for (int d = threadIdx.x; d < DI; d += blockDim.x) {
    kr[d] = to_ct<ct>(k_idx[d]);
    acc[d] = dk[d];
  }
  for (int64_t e = e0; e < e1; ++e) {
    const int64_t slot = p.t0 * p.K + p.sorted_slots[e];  // global slot t * K + k
    const int64_t t = slot / p.K;
    const ct g = dI[slot];
    __syncthreads();  // the previous slot's readers of qi/coef are done (and kr/acc loaded)
    for (int i = threadIdx.x; i < HI * DI; i += blockDim.x) qi[i] = to_ct<ct>(q_idx[t * HI * DI + i]);
    for (int j = threadIdx.x; j < HI; j += blockDim.x) wg[j] = to_ct<ct>(w[t * HI + j]);
    __syncthreads();
    for (int j = threadIdx.x; j < HI; j += blockDim.x) {
      coef[j] = dot_seq(qi + j * DI, kr, DI) > ct(0) ? g * wg[j] : ct(0);  // the query kernel's G
    }
    __syncthreads();
    for (int d = threadIdx.x; d < DI; d += blockDim.x) {
      ct v = acc[d];
      for (int j = 0; j < HI; ++j) v = fma(coef[j], qi[j * DI + d], v);
      acc[d] = v;
    }
  }
  for (int d = threadIdx.x; d < DI; d += blockDim.x) dk[d] = acc[d];  // same thread as its accumulation
}

}  // namespace glm5::cuda
