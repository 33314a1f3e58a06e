// Tensor-core backward of sparse MLA (bf16 / fp16 inputs, fp32 accumulation on mma.sync m16n8k16).
// Same contract and outputs as sparse_mla_bwd_kernel (kernels.cuh): dq_acc [T, H, D] fp32 owned per
// query, and one fp32 key-gradient row per valid (t, slot) in the chunk's rows buffer, which api.cu
// then sorts by key and sums in (t, slot) order; so the result stays deterministic and independent of
// the chunking. The one numerical difference from the SIMT kernel: P and dS are rounded to the input
// dtype before they enter the dq / dk products (as FlashAttention's backward does).
//
// One CTA per query t, 16 warps. Heads in groups of up to 16 * mt_max (16-head m-tiles; padded heads
// are zero q / dO rows with lse = +inf, so P = dS = 0 there, and are never written). Per group, the
// query's q and dO rows sit in shared memory and the K selected keys stream through a double-buffered
// shared tile of kBK rows gathered with cp.async (invalid slots zero-filled). Per key block:
//   1. warp (mt, nt): S = Q K^T and dP = dO V^T for 16 heads x 8 keys; P = exp(scale S - lse)
//      (0 on invalid slots), dS = P (dP - Delta) scale; P and dS go to [head][key] tiles in shared memory
//   2. dq[16 heads x 16-column pairs] += dS K, accumulated in registers over all key blocks
//   3. warp (16 keys, column pairs): dk = dS^T Q + P^T dO (the latter on the first dv columns),
//      reduced over the group's heads in increasing order, then written to (first group) or added to
//      (later groups, same thread, fixed order) the rows of the valid slots.
// A block whose slots are all invalid is skipped (its rows are never read, and it adds nothing).
//
// Operand fragments (layouts: common/mma.cuh): all tiles are row-major with a row stride of
// (cols + 8) elements, i.e. an odd number of 16-byte units, so the 8 row addresses of an ldmatrix hit
// 8 different 16-byte bank groups, and every row address is 16-byte aligned (D, dv multiples of 16).
//   A from a row-major [m][k] tile: ldmatrix_x4, lane row m0 + lane % 16, column k0 + 8 (lane / 16).
//   B from a row-major [n][k] tile (K for S, V for dP): ldmatrix_x4, lane row n0 + lane % 8, column
//     k0 + 8 (lane / 8): registers b0, b1 of k-step k0 and b0, b1 of k-step k0 + 16.
//   B from a row-major [k][n] tile (K for dq; Q, dO for dk): ldmatrix_x4_trans, lane row k0 + lane % 16,
//     column n0 + 8 (lane / 16): registers b0, b1 of columns n0..n0+7 and b0, b1 of n0+8..n0+15.
//   A = X^T from a row-major [k][m] tile (dS^T, P^T from [head][key]): ldmatrix_x4_trans, lane row
//     k0 + 8 (lane / 16) + lane % 8, column m0 + 8 ((lane / 8) % 2).
//
// Device code only (no ATen): bwd_tc.cu launches it; tests/cuda_sim runs the same source on the CPU.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../common/device_utils.cuh"
#include "../common/mma.cuh"
#include "bwd_stage.cuh"
#include "params.h"

namespace glm5::cuda {
namespace sparse_mla_tc_bwd {

inline constexpr int kThreads = 512;
inline constexpr int kWarps = kThreads / 32;
inline constexpr int kBK = 32;               // keys per block (4 n-tiles of 8 in step 1, 2 m-tiles of 16 in step 3)
inline constexpr int kMaxMt = 4;             // up to 64 heads per group: step 1 has 4 * 4 = 16 warp tiles
inline constexpr int kMaxPairsPerWarp = 9;   // dq registers: 9 pairs x 2 n-tiles x 4 = 72 fp32 per lane
inline constexpr int kPad = 8;               // row padding (elements) of every shared tile
inline constexpr int kLdp = kBK + kPad;      // row stride of the [head][key] P / dS tiles

// Byte offsets of the shared-memory tiles for groups of hg = 16 * mt_max heads (T is 2 bytes).
struct SmemLayout {
  size_t q, dout, keys_tile, p, ds, lse, delta, keys, total;
  __host__ __device__ SmemLayout(int hg, int D, int dv) {
    q = 0;                                                      // [hg][D + 8] T
    dout = q + size_t(hg) * (D + kPad) * 2;                     // [hg][dv + 8] T
    keys_tile = dout + size_t(hg) * (dv + kPad) * 2;            // [2][kBK][D + 8] T
    p = keys_tile + size_t(2) * kBK * (D + kPad) * 2;           // [hg][kLdp] T
    ds = p + size_t(hg) * kLdp * 2;                             // [hg][kLdp] T
    lse = ds + size_t(hg) * kLdp * 2;                           // [hg] float
    delta = lse + size_t(hg) * 4;                               // [hg] float
    keys = delta + size_t(hg) * 4;                              // [2][kBK] int: key, -1 = skip
    total = keys + size_t(2) * kBK * 4;
  }
};

// m-tiles per head group of a launch: the most (<= kMaxMt, <= what H needs) whose dq split fits the
// registers (a group of mt m-tiles spreads each m-tile's D / 16 column pairs over kWarps / mt warps) and
// whose tiles fit in smem_limit bytes; 0 when none does. Smaller later groups only need less.
inline int pick_mt(int H, int D, int dv, size_t smem_limit) {
  const int n_pairs = D / 16;
  for (int mt = H < 16 * kMaxMt ? (H + 15) / 16 : kMaxMt; mt >= 1; --mt) {
    const int ncg = kWarps / mt;
    if ((n_pairs + ncg - 1) / ncg <= kMaxPairsPerWarp && SmemLayout(16 * mt, D, dv).total <= smem_limit) return mt;
  }
  return 0;
}

// acc[16 x 8] += A[16 x kdim] B[8 x kdim]^T with A (lda) and B (ldb) row-major in shared memory,
// kdim % 16 == 0. Each x4 load of B covers two k-steps; an odd last k-step loads its two matrices
// twice (lanes 16..31 repeat the addresses of lanes 0..15) and uses the first copy.
template <typename T>
__device__ __forceinline__ void mma_rows_rows(float (&acc)[4], const T* A, int lda, const T* B, int ldb, int kdim,
                                              int lane) {
  const T* a_row = A + (lane & 15) * lda + (lane >> 4) * 8;
  const T* b_row = B + (lane & 7) * ldb;
  const int bi = lane >> 3;
  for (int k0 = 0; k0 < kdim; k0 += 32) {
    const bool two = k0 + 32 <= kdim;
    uint32_t b[4], a[4];
    ldmatrix_x4(b, b_row + k0 + (two ? bi : (bi & 1)) * 8);
    ldmatrix_x4(a, a_row + k0);
    mma_16816<T>(acc, a, b[0], b[1]);
    if (two) {
      ldmatrix_x4(a, a_row + k0 + 16);
      mma_16816<T>(acc, a, b[2], b[3]);
    }
  }
}

__device__ __forceinline__ void store2(float* dst, float x, float y, bool add) {
  float2 v;
  v.x = x, v.y = y;
  if (add) {
    const float2 o = *reinterpret_cast<const float2*>(dst);
    v.x += o.x, v.y += o.y;
  }
  *reinterpret_cast<float2*>(dst) = v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) sparse_mla_bwd_tc_kernel(const SparseMlaBwdParams p, const int mt_max) {
  unsigned char* smem_raw = dynamic_smem();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c = lane & 3;  // fragment row / column-pair of this lane (mma.cuh)
  const int64_t t = p.t0 + blockIdx.x;
  const int H = p.H, D = p.D, dv = p.dv, K = p.K, S = p.S;
  const int ldq = D + kPad, ldo = dv + kPad, ldk = D + kPad;
  const int n_pairs = D / 16;             // 16-column pairs of n-tiles of dq / dk
  const int chunks_d = D / 8, chunks_v = dv / 8;  // 16-byte chunks per q / key row and per dO row
  const float scale = static_cast<float>(p.scale);

  const SmemLayout L(16 * mt_max, D, dv);
  T* qs = reinterpret_cast<T*>(smem_raw + L.q);
  T* dos = reinterpret_cast<T*>(smem_raw + L.dout);
  T* ks_base = reinterpret_cast<T*>(smem_raw + L.keys_tile);
  T* ps = reinterpret_cast<T*>(smem_raw + L.p);
  T* dss = reinterpret_cast<T*>(smem_raw + L.ds);
  float* lse_s = reinterpret_cast<float*>(smem_raw + L.lse);
  float* delta_s = reinterpret_cast<float*>(smem_raw + L.delta);
  int* keys_base = reinterpret_cast<int*>(smem_raw + L.keys);

  const T* qg = static_cast<const T*>(p.q) + t * H * D;
  const T* kv = static_cast<const T*>(p.kv);
  const T* dog = static_cast<const T*>(p.dout) + t * H * dv;
  const T* og = static_cast<const T*>(p.out) + t * H * dv;
  const float* lseg = static_cast<const float*>(p.lse) + t * H;
  float* dqg = static_cast<float*>(p.dq_acc) + t * H * D;
  float* rows = static_cast<float*>(p.rows) + (t - p.t0) * int64_t(K) * D;
  const int32_t* idx = p.indices + t * K;
  const int n_blocks = (K + kBK - 1) / kBK;

  // Gathers key block blk into buffer blk % 2 (cp.async, not committed here). Thread j < kBK also
  // records slot j's key (-1 past K and for an index outside [0, S)), which it alone reads before the
  // barrier that publishes it.
  auto load_block = [&](int blk) {
    const int k0 = blk * kBK, buf = blk & 1;
    T* ks = ks_base + buf * kBK * ldk;
    if (tid < kBK) {
      const int s = k0 + tid < K ? idx[k0 + tid] : -1;
      keys_base[buf * kBK + tid] = (s >= 0 && s < S) ? s : -1;
    }
    for (int i = tid; i < kBK * chunks_d; i += kThreads) {
      const int j = i / chunks_d, ch = i % chunks_d;
      const int s = k0 + j < K ? idx[k0 + j] : -1;
      const bool ok = s >= 0 && s < S;
      cp_async_16(ks + j * ldk + ch * 8, ok ? kv + int64_t(s) * D + ch * 8 : kv, ok);
    }
  };

  for (int h0 = 0; h0 < H; h0 += 16 * mt_max) {
    const int hb = min(16 * mt_max, H - h0);  // real heads of this group
    const int mtg = (hb + 15) / 16;           // its m-tiles
    const int hp = 16 * mtg;                  // padded heads

    // q / dO rows of the group (zero past hb); lse (+inf past hb) and Delta = rowsum(dO * O).
    // The previous group's last block ended with a barrier, so these tiles are free.
    for (int i = tid; i < hp * chunks_d; i += kThreads) {
      const int h = i / chunks_d, ch = i % chunks_d;
      const bool ok = h < hb;
      cp_async_16(qs + h * ldq + ch * 8, ok ? qg + int64_t(h0 + h) * D + ch * 8 : qg, ok);
    }
    for (int i = tid; i < hp * chunks_v; i += kThreads) {
      const int h = i / chunks_v, ch = i % chunks_v;
      const bool ok = h < hb;
      cp_async_16(dos + h * ldo + ch * 8, ok ? dog + int64_t(h0 + h) * dv + ch * 8 : dog, ok);
    }
    stage_lse_delta(dog, og, lseg, h0, hb, hp, dv, lse_s, delta_s, warp, lane, kWarps);

    // dq of this warp: m-tile dq_mt, column pairs dq_cg + i * dq_ncg (i < kMaxPairsPerWarp; the host
    // checked that ceil(n_pairs / dq_ncg) <= kMaxPairsPerWarp for every group).
    const int dq_ncg = kWarps / mtg;
    const int dq_mt = warp / dq_ncg, dq_cg = warp % dq_ncg;
    const bool dq_warp = dq_mt < mtg;
    float dq[kMaxPairsPerWarp][2][4];
#pragma unroll
    for (int i = 0; i < kMaxPairsPerWarp; ++i)
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int r = 0; r < 4; ++r) dq[i][n][r] = 0.f;

    load_block(0);
    cp_async_commit();  // with the q / dO tiles
    for (int blk = 0; blk < n_blocks; ++blk) {
      const int buf = blk & 1, k0 = blk * kBK;
      if (blk + 1 < n_blocks) load_block(blk + 1);  // buffer (blk + 1) % 2 was last read before the
      cp_async_commit();                            // barrier that ended block blk - 1
      cp_async_wait<1>();                           // all but block blk + 1 has landed
      const int* keys = keys_base + buf * kBK;
      const T* ks = ks_base + buf * kBK * ldk;
      if (__syncthreads_or(tid < kBK && keys[tid] >= 0)) {
        // 1. S and dP of warp tile (16 heads of m-tile mt) x (8 keys of n-tile nt); P, dS to shared.
        if (warp < 4 * mtg) {
          const int mt = warp >> 2, nt = warp & 3;
          float s_acc[4] = {0.f, 0.f, 0.f, 0.f}, dp_acc[4] = {0.f, 0.f, 0.f, 0.f};
          mma_rows_rows<T>(s_acc, qs + mt * 16 * ldq, ldq, ks + nt * 8 * ldk, ldk, D, lane);
          mma_rows_rows<T>(dp_acc, dos + mt * 16 * ldo, ldo, ks + nt * 8 * ldk, ldk, dv, lane);
          const int j = nt * 8 + 2 * c;  // this lane's keys j, j + 1 (C fragment columns 2c, 2c + 1)
          const bool v0 = keys[j] >= 0, v1 = keys[j + 1] >= 0;
#pragma unroll
          for (int half = 0; half < 2; ++half) {  // C rows g (c0, c1) and g + 8 (c2, c3)
            const int h = mt * 16 + g + 8 * half;
            const float lse = lse_s[h], delta = delta_s[h];
            const float p0 = v0 ? dev_exp(s_acc[2 * half] * scale - lse) : 0.f;  // lse = +inf: 0
            const float p1 = v1 ? dev_exp(s_acc[2 * half + 1] * scale - lse) : 0.f;
            const float d0 = p0 * (dp_acc[2 * half] - delta) * scale;
            const float d1 = p1 * (dp_acc[2 * half + 1] - delta) * scale;
            *reinterpret_cast<uint32_t*>(ps + h * kLdp + j) = pack2<T>(p0, p1);
            *reinterpret_cast<uint32_t*>(dss + h * kLdp + j) = pack2<T>(d0, d1);
          }
        }
        __syncthreads();

        // 2. dq[16 heads of dq_mt][its column pairs] += dS[heads][kBK keys] K[kBK keys][columns].
        if (dq_warp) {
          uint32_t a[2][4];
#pragma unroll
          for (int kk = 0; kk < 2; ++kk)
            ldmatrix_x4(a[kk], dss + (dq_mt * 16 + (lane & 15)) * kLdp + kk * 16 + (lane >> 4) * 8);
#pragma unroll
          for (int i = 0; i < kMaxPairsPerWarp; ++i) {
            const int pr = dq_cg + i * dq_ncg;
            if (pr < n_pairs) {
#pragma unroll
              for (int kk = 0; kk < 2; ++kk) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, ks + (kk * 16 + (lane & 15)) * ldk + pr * 16 + (lane >> 4) * 8);
                mma_16816<T>(dq[i][0], a[kk], b[0], b[1]);
                mma_16816<T>(dq[i][1], a[kk], b[2], b[3]);
              }
            }
          }
        }

        // 3. dk[16 keys of km][column pair pr] = sum over the group's heads of dS^T q (+ P^T dO when
        //    the pair lies within dv), for pairs pr = cg, cg + 8, ...; written to the valid slots' rows.
        {
          const int km = warp & 1, cg = warp >> 1;
          const int a_off = ((lane >> 4) * 8 + (lane & 7)) * kLdp + km * 16 + ((lane >> 3) & 1) * 8;
          const int j_lo = km * 16 + g, j_hi = j_lo + 8;  // C rows g and g + 8 of this warp's keys
          const bool w_lo = keys[j_lo] >= 0, w_hi = keys[j_hi] >= 0;
          const bool add = h0 > 0;  // later head groups add to the rows the first group wrote
          for (int pr = cg; pr < n_pairs; pr += kWarps / 2) {
            float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
            const bool in_v = pr * 16 < dv;  // dv % 16 == 0: the pair is wholly inside or outside
            for (int kh = 0; kh < mtg; ++kh) {
              uint32_t a[4], b[4];
              ldmatrix_x4_trans(a, dss + kh * 16 * kLdp + a_off);
              ldmatrix_x4_trans(b, qs + (kh * 16 + (lane & 15)) * ldq + pr * 16 + (lane >> 4) * 8);
              mma_16816<T>(acc[0], a, b[0], b[1]);
              mma_16816<T>(acc[1], a, b[2], b[3]);
              if (in_v) {
                ldmatrix_x4_trans(a, ps + kh * 16 * kLdp + a_off);
                ldmatrix_x4_trans(b, dos + (kh * 16 + (lane & 15)) * ldo + pr * 16 + (lane >> 4) * 8);
                mma_16816<T>(acc[0], a, b[0], b[1]);
                mma_16816<T>(acc[1], a, b[2], b[3]);
              }
            }
#pragma unroll
            for (int n = 0; n < 2; ++n) {
              const int col = pr * 16 + n * 8 + 2 * c;
              if (w_lo) store2(rows + int64_t(k0 + j_lo) * D + col, acc[n][0], acc[n][1], add);
              if (w_hi) store2(rows + int64_t(k0 + j_hi) * D + col, acc[n][2], acc[n][3], add);
            }
          }
        }
      }
      __syncthreads();  // this block's buffers (keys, P, dS) may now be overwritten
    }
    cp_async_wait<0>();  // the last (empty) group

    // The group's dq, once: C rows g and g + 8 of m-tile dq_mt, real heads only.
    if (dq_warp) {
#pragma unroll
      for (int i = 0; i < kMaxPairsPerWarp; ++i) {
        const int pr = dq_cg + i * dq_ncg;
        if (pr < n_pairs) {
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            const int col = pr * 16 + n * 8 + 2 * c;
            const int h_lo = dq_mt * 16 + g, h_hi = h_lo + 8;
            if (h_lo < hb) store2(dqg + int64_t(h0 + h_lo) * D + col, dq[i][n][0], dq[i][n][1], false);
            if (h_hi < hb) store2(dqg + int64_t(h0 + h_hi) * D + col, dq[i][n][2], dq[i][n][3], false);
          }
        }
      }
    }
  }
}

}  // namespace sparse_mla_tc_bwd
}  // namespace glm5::cuda
