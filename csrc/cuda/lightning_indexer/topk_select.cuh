// Exact, deterministic top-k selection in shared memory, shared by the SIMT and the tensor-core
// indexer_topk kernels. One CTA (blockDim.x a multiple of 32) serves QB queries, each with its own lists.
//
// Order: a comes before b iff score(a) > score(b), or the scores are equal and key(a) < key(b). Keys of
// one query are distinct, so this is a strict total order: the sorted top-k is unique and cannot
// depend on thread timing or on the order in which candidates were gathered.
//
// Per query: a sorted list L (cnt <= topk entries, best first) and an unsorted candidate buffer C
// (n <= cap <= kSortN entries, cap >= the tile size). A tile of scored keys is filtered: a key is
// a candidate iff it is visible, its score is neither NaN nor -inf (both end up as padding, -1 / -inf,
// so dropping them changes nothing) and, once L holds topk entries, it comes before L's last entry.
// Dropping the others is exact: topk keys already seen come before such a key, so it cannot be in the
// final top-k. The threshold only tightens when C is flushed, so between flushes a stale one merely
// admits more candidates. Survivors are appended to C in a fixed order (warp ballots). C is flushed
// (sort_candidates, then an in-place merge into L, see flush) when the next tile could overflow it,
// when it can complete a not yet full L (which yields a threshold early), and at the end.
// Every kernel that uses this runs kSelThreads threads per CTA.
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

constexpr int kSelThreads = 256;                          // threads per CTA of every user
constexpr int kSortPerThread = 4;                         // candidates per thread in sort_candidates
constexpr int kSortN = kSelThreads * kSortPerThread;      // C's size per query; cap <= kSortN
constexpr int kMergePerThread = 8;                        // outputs per thread per merge round

namespace topk_detail {

// Compare-exchange of elements j and j + JS * 32 ... held by one thread: registers j and j | JS.
template <typename ct, int JS>
__device__ __forceinline__ void thread_stage(ct (&v)[kSortPerThread], int (&k)[kSortPerThread], int base, int size) {
#pragma unroll
  for (int j = 0; j < kSortPerThread; ++j) {
    if ((j & JS) == 0) {
      const bool up = ((base + 32 * j) & size) == 0;  // this block sorts best first
      if (topk_before(v[j | JS], k[j | JS], v[j], k[j]) == up) {
        const ct tv = v[j];
        v[j] = v[j | JS];
        v[j | JS] = tv;
        const int tk = k[j];
        k[j] = k[j | JS];
        k[j | JS] = tk;
      }
    }
  }
}

}  // namespace topk_detail

// Sorts C[0, m) (m <= kSortN) best first and pads C[m, kSortN) with entries that sort last: a bitonic
// network over kSortN elements. Thread t = 32 w + l holds elements w * 32E + 32 j + l (j < E =
// kSortPerThread) in registers, so stages of stride < 32 exchange between lanes (shuffles), strides
// 32 .. 32E - 1 stay within a thread, and only strides >= 32E (across warps) go through shared memory,
// behind barriers. Every thread calls it; it ends with a barrier.
template <typename ct>
__device__ __forceinline__ void sort_candidates(ct* C, int* CI, int m) {
  constexpr int E = kSortPerThread, W = 32 * E, P = kSortN;
  static_assert(E == 4, "thread_stage dispatch below assumes strides 32 and 64 stay in a thread");
  const int lane = int(threadIdx.x) & 31;
  const int base = (int(threadIdx.x) >> 5) * W + lane;  // element of register j: base + 32 j
  ct v[E];
  int k[E];
#pragma unroll
  for (int j = 0; j < E; ++j) {
    const int i = base + 32 * j;
    v[j] = i < m ? C[i] : neg_inf<ct>();  // padding: after every candidate (never -inf)
    k[j] = i < m ? CI[i] : INT_MAX;
  }
  bool in_smem = false;  // uniform: where the elements live now
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      if (stride >= W) {
        if (!in_smem) {
#pragma unroll
          for (int j = 0; j < E; ++j) {
            C[base + 32 * j] = v[j];
            CI[base + 32 * j] = k[j];
          }
          in_smem = true;
        }
        __syncthreads();
        for (int pid = int(threadIdx.x); pid < P / 2; pid += int(blockDim.x)) {
          // pair pid -> (i, i + stride): i has bit `stride` clear (blocks of 2 * stride elements).
          const int i = ((pid & ~(stride - 1)) << 1) | (pid & (stride - 1)), j = i + stride;
          const bool up = (i & size) == 0;
          if (topk_before(C[j], CI[j], C[i], CI[i]) == up) {
            const ct tv = C[i];
            C[i] = C[j];
            C[j] = tv;
            const int tk = CI[i];
            CI[i] = CI[j];
            CI[j] = tk;
          }
        }
        continue;
      }
      if (in_smem) {
        __syncthreads();
#pragma unroll
        for (int j = 0; j < E; ++j) {
          v[j] = C[base + 32 * j];
          k[j] = CI[base + 32 * j];
        }
        in_smem = false;
      }
      if (stride == 32) {
        topk_detail::thread_stage<ct, 1>(v, k, base, size);
      } else if (stride == 64) {
        topk_detail::thread_stage<ct, 2>(v, k, base, size);
      } else {
        // Partner: the same register of lane ^ stride. The lower element of a pair keeps the better
        // one where the block sorts best first (up), the worse one elsewhere.
        const bool lower = (lane & stride) == 0;
#pragma unroll
        for (int j = 0; j < E; ++j) {
          const ct pv = __shfl_xor_sync(0xffffffffu, v[j], stride);
          const int pk = __shfl_xor_sync(0xffffffffu, k[j], stride);
          const bool up = ((base + 32 * j) & size) == 0;
          if ((lower == up) != topk_before(v[j], k[j], pv, pk)) {
            v[j] = pv;
            k[j] = pk;
          }
        }
      }
    }
  }
  if (!in_smem) {
#pragma unroll
    for (int j = 0; j < E; ++j) {
      C[base + 32 * j] = v[j];
      CI[base + 32 * j] = k[j];
    }
  }
  __syncthreads();
}

// Bytes of the selection state of QB queries: L and C scores (ct), then L and C keys, then one count
// per (query, warp).
template <typename ct>
__host__ __device__ inline size_t topk_select_smem(int QB, int topk) {
  return size_t(QB) * (size_t(topk) + kSortN) * (sizeof(ct) + sizeof(int)) +
         size_t(QB) * (kSelThreads / 32) * sizeof(int);
}

template <typename ct, int QB>
struct TopkSelect {
  ct* lv;     // [QB][topk]   L scores
  ct* cv;     // [QB][kSortN] C scores
  int* li;    // [QB][topk]   L keys
  int* ci;    // [QB][kSortN] C keys
  int* wtot;  // [QB][kSelThreads / 32] candidates per warp in the current tile
  int topk, cap;
  // Identical in every thread (only ever updated from values all threads computed alike).
  int cnt[QB];  // entries in L
  int nc[QB];   // entries in C

  // smem: 16-byte aligned, topk_select_smem<ct>(QB, topk) bytes; cap in [blockDim.x, kSortN].
  __device__ __forceinline__ TopkSelect(void* smem, int topk_, int cap_) : topk(topk_), cap(cap_) {
    lv = static_cast<ct*>(smem);
    cv = lv + size_t(QB) * topk;
    li = reinterpret_cast<int*>(cv + size_t(QB) * kSortN);
    ci = li + size_t(QB) * topk;
    wtot = ci + size_t(QB) * kSortN;
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
    int* wt = wtot + q * (kSelThreads / 32);
    if (lane == 0) wt[warp] = __popc(ballot);
    __syncthreads();
    int off = nc[q], total = 0;
    for (int w = 0; w < kSelThreads / 32; ++w) {
      const int c = wt[w];
      off += w < warp ? c : 0;
      total += c;
    }
    if (keep) {
      const size_t pos = size_t(q) * kSortN + off + __popc(ballot & ((1u << lane) - 1u));
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
    ct* C = cv + size_t(q) * kSortN;
    int* CI = ci + size_t(q) * kSortN;
    const int n = cnt[q], total = min(topk, n + m);
    __syncthreads();  // C's last entries were written by other threads
    sort_candidates(C, CI, m);
    // In place, in rounds of span outputs from the back; a thread makes R consecutive outputs from
    // its merge-path split (i entries of L and o - i of C precede output o). Output o only reads
    // L[0, o] (an L entry never moves forward), so a round reads nothing a later round overwrote,
    // and it writes only after every thread of the round has read (barrier).
    constexpr int R = kMergePerThread;
    const int span = int(blockDim.x) * R;
    for (int o0 = (total - 1) / span * span; o0 >= 0; o0 -= span) {
      const int o = o0 + R * int(threadIdx.x);
      ct v[R];
      int key[R];
      if (o < total) {
        int lo = max(0, o - m), hi = min(o, n);
        while (lo < hi) {  // the number of L entries among the first o outputs
          const int mid = (lo + hi) >> 1;
          if (topk_before(L[mid], LI[mid], C[o - 1 - mid], CI[o - 1 - mid])) lo = mid + 1; else hi = mid;
        }
        int i = lo, j = o - lo;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (o + r < total) {  // i < n or j < m: i + j = o + r < n + m
            if (j >= m || (i < n && topk_before(L[i], LI[i], C[j], CI[j]))) {
              v[r] = L[i];
              key[r] = LI[i];
              ++i;
            } else {
              v[r] = C[j];
              key[r] = CI[j];
              ++j;
            }
          }
        }
      }
      __syncthreads();
      if (o < total) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (o + r < total) {
            L[o + r] = v[r];
            LI[o + r] = key[r];
          }
        }
      }
      __syncthreads();
    }
    cnt[q] = total;
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
