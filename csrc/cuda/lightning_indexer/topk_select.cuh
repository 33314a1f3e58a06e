// Exact, deterministic top-k selection in shared memory, shared by the SIMT and the tensor-core
// indexer_topk kernels. One CTA (blockDim.x a multiple of 32) serves QB queries, each with its own lists.
//
// Order: a comes before b iff score(a) > score(b), or the scores are equal and key(a) < key(b). Keys of
// one query are distinct, so this is a strict total order: the sorted top-k is unique and cannot
// depend on thread timing or on the order in which candidates were gathered.
//
// Per query: a sorted list L (cnt <= topk entries, best first) and an unsorted candidate buffer C
// (n <= cap entries, cap a power of two >= the tile size). A tile of scored keys is filtered: a key is
// a candidate iff it is visible, its score is neither NaN nor -inf (both end up as padding, -1 / -inf,
// so dropping them changes nothing) and, once L holds topk entries, it comes before L's last entry.
// Dropping the others is exact: topk keys already seen come before such a key, so it cannot be in the
// final top-k. The threshold only tightens when C is flushed, so between flushes a stale one merely
// admits more candidates. Survivors are appended to C in a fixed order (warp ballots). C is flushed
// (bitonic sort, then a rank merge into L in place, see flush) when the next tile could overflow it,
// when it can complete a not yet full L (which yields a threshold early), and at the end.
#pragma once
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>

#include "../common/device_utils.cuh"

namespace glm5::cuda {

// a comes before b: higher score, or equal score and smaller key.
template <typename ct>
__device__ __forceinline__ bool topk_before(ct sa, int ia, ct sb, int ib) {
  return sa > sb || (sa == sb && ia < ib);
}

// Number of the first n entries of a sorted list that come before (s, i).
template <typename ct>
__device__ __forceinline__ int count_before(const ct* vs, const int* is, int n, ct s, int i) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (topk_before(vs[mid], is[mid], s, i)) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Sorts v/k[0, P) best first (P a power of two) with a bitonic network; every thread of the CTA
// calls it. Starts and ends with a barrier.
template <typename ct>
__device__ __forceinline__ void bitonic_sort_best_first(ct* v, int* k, int P) {
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      for (int pid = threadIdx.x; pid < P / 2; pid += blockDim.x) {
        // pair pid -> (i, i + stride): i has bit `stride` clear (blocks of 2 * stride elements).
        const int i = ((pid & ~(stride - 1)) << 1) | (pid & (stride - 1)), j = i + stride;
        const bool up = (i & size) == 0;  // this block sorts best first (the last merge: all of them)
        if (topk_before(v[j], k[j], v[i], k[i]) == up) {
          const ct tv = v[i];
          v[i] = v[j];
          v[j] = tv;
          const int tk = k[i];
          k[i] = k[j];
          k[j] = tk;
        }
      }
    }
  }
  __syncthreads();
}

// Bytes of the selection state of QB queries: L and C scores (ct), then L and C keys, the merge
// positions of one flush, and one count per (query, warp).
template <typename ct>
__host__ __device__ inline size_t topk_select_smem(int QB, int topk, int cap, int nwarps) {
  return size_t(QB) * (size_t(topk) + size_t(cap)) * (sizeof(ct) + sizeof(int)) + size_t(cap) * sizeof(int) +
         size_t(QB) * size_t(nwarps) * sizeof(int);
}

template <typename ct, int QB>
struct TopkSelect {
  ct* lv;     // [QB][topk] L scores
  ct* cv;     // [QB][cap]  C scores
  int* li;    // [QB][topk] L keys
  int* ci;    // [QB][cap]  C keys
  int* pc;    // [cap] merge positions of C's entries during a flush
  int* wtot;  // [QB][nwarps] candidates per warp in the current tile
  int topk, cap, nwarps;
  // Identical in every thread (only ever updated from values all threads computed alike).
  int cnt[QB];  // entries in L
  int nc[QB];   // entries in C

  // smem: 16-byte aligned, topk_select_smem<ct>(QB, topk, cap, blockDim.x / 32) bytes.
  __device__ __forceinline__ TopkSelect(void* smem, int topk_, int cap_)
      : topk(topk_), cap(cap_), nwarps(int(blockDim.x) / 32) {
    lv = static_cast<ct*>(smem);
    cv = lv + size_t(QB) * topk;
    li = reinterpret_cast<int*>(cv + size_t(QB) * cap);
    ci = li + size_t(QB) * topk;
    pc = ci + size_t(QB) * cap;
    wtot = pc + cap;
#pragma unroll
    for (int q = 0; q < QB; ++q) cnt[q] = nc[q] = 0;
  }

  // Offers keys base + i (i < n <= blockDim.x) with scores ts[i] to query q (visible range [lo, hi)).
  // Every thread calls it with the same arguments; ts must already be visible to all threads (a
  // barrier after it was written). Ends with a barrier, after which ts may be overwritten.
  __device__ __forceinline__ void add_tile(int q, const ct* ts, int n, int base, int lo, int hi) {
    if (nc[q] + n > cap || (cnt[q] < topk && cnt[q] + nc[q] >= topk)) flush(q);
    const int i = int(threadIdx.x), lane = i & 31, warp = i >> 5;
    const int s = base + i;
    bool keep = false;
    ct v = neg_inf<ct>();
    if (i < n && s >= lo && s < hi) {
      v = ts[i];
      keep = !(v != v) && v != neg_inf<ct>();
      if (keep && cnt[q] == topk) {
        const size_t last = size_t(q) * topk + topk - 1;  // the threshold: L's last entry
        keep = topk_before(v, s, lv[last], li[last]);
      }
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    int* wt = wtot + q * nwarps;
    if (lane == 0) wt[warp] = __popc(ballot);
    __syncthreads();
    int off = nc[q], total = 0;
    for (int w = 0; w < nwarps; ++w) {
      const int c = wt[w];
      off += w < warp ? c : 0;
      total += c;
    }
    if (keep) {
      const size_t pos = size_t(q) * cap + off + __popc(ballot & ((1u << lane) - 1u));
      cv[pos] = v;
      ci[pos] = s;
    }
    nc[q] += total;
    __syncthreads();
  }

  // Merges C into L: L <- the first min(topk, cnt + n) of the sorted union. Every thread calls it.
  __device__ __forceinline__ void flush(int q) {
    const int m = nc[q];
    if (m == 0) return;
    ct* L = lv + size_t(q) * topk;
    int* LI = li + size_t(q) * topk;
    ct* C = cv + size_t(q) * cap;
    int* CI = ci + size_t(q) * cap;
    const int n = cnt[q], bd = int(blockDim.x);
    int P = 1;
    while (P < m) P <<= 1;  // P <= cap: m <= cap, a power of two
    __syncthreads();        // C's last entries were written by other threads
    for (int i = m + int(threadIdx.x); i < P; i += bd) {
      C[i] = neg_inf<ct>();  // padding sorts after every candidate (never -inf)
      CI[i] = INT_MAX;
    }
    bitonic_sort_best_first(C, CI, P);
    // In the merged order an entry's position is its index in its own list plus the number of entries
    // of the other list before it (the order is strict, so positions are distinct).
    for (int j = int(threadIdx.x); j < m; j += bd) pc[j] = j + count_before(L, LI, n, C[j], CI[j]);
    // L's entries move back: entry i goes to r(i) = i + (#C before it) >= i, increasing in i. Moving
    // chunks from the back, every read of a chunk before any write, a write never hits an unread entry;
    // positions r(i) >= topk are dropped.
    for (int i0 = n > 0 ? (n - 1) / bd * bd : -1; i0 >= 0; i0 -= bd) {
      const int i = i0 + int(threadIdx.x);
      int r = INT_MAX, key = 0;
      ct v = ct(0);
      if (i < n) {
        v = L[i];
        key = LI[i];
        r = i + count_before(C, CI, m, v, key);
      }
      __syncthreads();
      if (r < topk && r != i) {
        L[r] = v;
        LI[r] = key;
      }
      __syncthreads();
    }
    // C's entries fill the remaining positions (pc[j] was computed and is read by the same thread).
    for (int j = int(threadIdx.x); j < m; j += bd) {
      if (pc[j] < topk) {
        L[pc[j]] = C[j];
        LI[pc[j]] = CI[j];
      }
    }
    __syncthreads();
    cnt[q] = min(topk, n + m);
    nc[q] = 0;
  }

  // Writes query q's top-k (after flush(q)): L's entries, then -1 / -inf padding. No barrier.
  __device__ __forceinline__ void store(int q, ct* out_v, int32_t* out_i) const {
    const ct* L = lv + size_t(q) * topk;
    const int* LI = li + size_t(q) * topk;
    for (int i = int(threadIdx.x); i < topk; i += int(blockDim.x)) {
      const bool real = i < cnt[q];
      out_v[i] = real ? L[i] : neg_inf<ct>();
      out_i[i] = real ? LI[i] : -1;
    }
  }
};

}  // namespace glm5::cuda
