// Sparse MLA backward on Hopper's warpgroup tensor cores (wgmma, bf16/fp16 in, fp32 accumulation), for
// D = 64 NCB with NCB odd, 3..9 (GLM-5: 576 = 8 blocks of latent + 1 of rope), and d_v % 64 == 0,
// d_v <= D. Same contract and outputs as the other backward kernels (bwd_tc_kernel.cuh): dq_acc
// [T, H, D] fp32 owned per query, and one fp32 key-gradient row per valid (t, slot) in the chunk's rows
// buffer, which api.cu sorts by key and sums in (t, slot) order. P and dS are rounded to the input
// dtype before they enter the dq / dk products.
//
// One CTA per query t, two warpgroups; heads in groups of 64 (padded heads: zero q / dO rows, lse = +inf,
// so P = dS = 0 there; never written). Per group, q and dO stay in shared memory and the K selected keys
// stream through two shared tiles of kBK = 32 keys, gathered by cp.async one block ahead. Warpgroup w
// handles keys 16 w .. 16 w + 15 of a block where the work splits by keys, and its half of the columns
// where it splits by columns; every wgmma is issued on control flow that is the same in both warpgroups
// (ptxas serialises wgmma on paths it cannot prove warpgroup-uniform). Per block (skipped when all its
// slots are invalid):
//   1. S = Q K^T, dP = dO V^T (m64n16, this warpgroup's keys); P = exp(scale S - lse) (0 on invalid
//      slots), dS = P (dP - Delta) scale, stored as T: dS [head][key] and P^T, dS^T [key][head].
//   2. dq += dS K: warpgroup w owns the latent column blocks [w NQ, w NQ + NQ), NQ = (NCB - 1) / 2,
//      over the block's 32 keys; the rope block (the last) is split by keys instead: each warpgroup
//      keeps a partial sum over its 16 keys, added in a fixed order when the group ends.
//   3. dk^T of column block cb (64 columns x this warpgroup's 16 keys) = Q^T dS^T (+ dO^T P^T while
//      cb < d_v / 64), A = Q^T / dO^T read MN-major from the [head][col] tiles, two blocks' chains in
//      flight; written to (first head group) or added to (later ones, same thread, fixed order) the
//      rows of the valid slots.
//
// Every operand is a canonical 128-byte-swizzled layout of gmma_desc.h (K-major, or MN-major with whole
// 64-column blocks), 1024-byte aligned (the dynamic shared memory is over-allocated by 1 KB and aligned
// by address). Device code only (no ATen): bwd_wgmma.cu launches it; tests/cuda_sim runs the same
// source on the CPU.
#pragma once
#include <cmath>
#include <cstdint>

#include "../common/device_utils.cuh"
#include "../common/gmma_tiles.cuh"
#include "../common/mma.cuh"
#include "../common/wgmma.cuh"
#include "bwd_stage.cuh"
#include "params.h"

namespace glm5::cuda {
namespace sparse_mla_wgmma_bwd {

inline constexpr int kHeads = 64;                     // wgmma M: the heads of one group
inline constexpr int kBK = 32;                        // keys per block, 16 per warpgroup
inline constexpr int kThreads = 256;                  // two warpgroups
inline constexpr uint32_t kHeadBlock = kHeads * 128;  // a 64-column block of [64 heads][...]
inline constexpr uint32_t kKeyBlock = kBK * 128;      // a 64-column block of [32 keys][...]

// Byte offsets from the aligned base, and the dynamic shared memory to request (with the 1 KB slack).
// The rope partial of dq (fp32 [64][64]) passes between the warpgroups through the key tiles when a
// head group ends.
struct Layout {
  uint32_t q, dout, keys, ds, pt, dst, lse, delta, keyok, bytes;
  __host__ __device__ constexpr Layout(int D, int dv)
      : q(0),
        dout(q + uint32_t(D / 64) * kHeadBlock),
        keys(dout + uint32_t(dv / 64) * kHeadBlock),
        ds(keys + 2u * uint32_t(D / 64) * kKeyBlock),
        pt(ds + kHeadBlock),
        dst(pt + kKeyBlock),
        lse(dst + kKeyBlock),
        delta(lse + 4u * kHeads),
        keyok(delta + 4u * kHeads),
        bytes(keyok + 4u * 2u * kBK + gmma::kAtomBytes) {}
};

template <typename T, int NCB>
__global__ void __launch_bounds__(kThreads, 1) sparse_mla_bwd_wgmma_kernel(const SparseMlaBwdParams p) {
  static_assert(NCB % 2 == 1 && NCB >= 3 && NCB <= 9, "D = 64 NCB, NCB odd in 3..9");
  constexpr int NQ = (NCB - 1) / 2;  // latent dq column blocks per warpgroup
  constexpr int D = 64 * NCB;
  constexpr int kRope = 32 * NQ;  // first dq register of the rope partial

  const gmma::AlignedSmem sm = gmma::aligned_dynamic_smem();
  unsigned char* base = sm.ptr;
  const uint32_t base_addr = sm.addr;

  const int H = p.H, dv = p.dv, K = p.K, S = p.S, nvb = dv / 64;
  const int tid = threadIdx.x, wg = tid >> 7, wq = (tid >> 5) & 3, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int64_t t = p.t0 + blockIdx.x;
  const float scale = static_cast<float>(p.scale);
  const Layout L(D, dv);
  const uint32_t q_addr = base_addr + L.q, do_addr = base_addr + L.dout, k_addr = base_addr + L.keys;
  const uint32_t ds_addr = base_addr + L.ds, pt_addr = base_addr + L.pt, dst_addr = base_addr + L.dst;
  float* lse_s = reinterpret_cast<float*>(base + L.lse);
  float* delta_s = reinterpret_cast<float*>(base + L.delta);
  int* keys_s = reinterpret_cast<int*>(base + L.keyok);  // [2][kBK] key, -1 = skip
  float* rope_xch = reinterpret_cast<float*>(base + L.keys);  // [64][64] fp32, at a group's end only

  const T* qg = static_cast<const T*>(p.q) + t * H * D;
  const T* kv = static_cast<const T*>(p.kv);
  const T* dog = static_cast<const T*>(p.dout) + t * H * dv;
  const T* og = static_cast<const T*>(p.out) + t * H * dv;
  const float* lseg = static_cast<const float*>(p.lse) + t * H;
  float* dqg = static_cast<float*>(p.dq_acc) + t * H * D;
  float* rows = static_cast<float*>(p.rows) + (t - p.t0) * int64_t(K) * D;
  const int32_t* idx = p.indices + t * K;
  const int n_blocks = (K + kBK - 1) / kBK;

  // Gathers key block blk into tile blk % 2 (cp.async, swizzled; invalid rows zero-filled). Thread
  // j < kBK records slot j's key (-1 past K and outside [0, S)), published by the next barrier.
  auto load_block = [&](int blk) {
    const int k0 = blk * kBK, buf = blk & 1;
    unsigned char* kt = base + L.keys + buf * NCB * kKeyBlock;
    if (tid < kBK) {
      const int s = k0 + tid < K ? idx[k0 + tid] : -1;
      keys_s[buf * kBK + tid] = (s >= 0 && s < S) ? s : -1;
    }
    auto key_row = [&](int j) -> const T* {
      const int s = k0 + j < K ? idx[k0 + j] : -1;
      return s >= 0 && s < S ? kv + int64_t(s) * D : nullptr;
    };
    gmma::gather_rows(kt, kBK, D, key_row, kv, tid, kThreads);
  };

  for (int h0 = 0; h0 < H; h0 += kHeads) {
    const int hb = min(kHeads, H - h0);  // real heads of this group
    // q / dO rows of the group (zero past hb); lse (+inf past hb) and Delta = rowsum(dO * O). The
    // previous group ended with a barrier, so these tiles are free.
    gmma::gather_rows(base + L.q, kHeads, D, [&](int h) { return h < hb ? qg + int64_t(h0 + h) * D : nullptr; }, qg,
                      tid, kThreads);
    gmma::gather_rows(base + L.dout, kHeads, dv, [&](int h) { return h < hb ? dog + int64_t(h0 + h) * dv : nullptr; },
                      dog, tid, kThreads);
    stage_lse_delta(dog, og, lseg, h0, hb, kHeads, dv, lse_s, delta_s, warp, lane, kThreads / 32);

    // dq[32 j + 4 i + e] = dq[16 wq + g + 8 (e / 2)][64 (wg NQ + j) + 8 i + 2 c + e % 2] for j < NQ;
    // dq[kRope + 4 i + e]: this warpgroup's partial of rope column 64 (NCB - 1) + 8 i + 2 c + e % 2.
    float dq[32 * NQ + 32];
#pragma unroll
    for (int i = 0; i < 32 * NQ + 32; ++i) dq[i] = 0.f;

    load_block(0);
    cp_async_commit();  // with the q / dO tiles
    for (int blk = 0; blk < n_blocks; ++blk) {
      const int buf = blk & 1, k0 = blk * kBK;
      if (blk + 1 < n_blocks) load_block(blk + 1);  // tile (blk + 1) % 2 was released by the barrier
      cp_async_commit();                            // that ended block blk - 1
      cp_async_wait<1>();
      wgmma::fence_proxy_async();
      const int* keys = keys_s + buf * kBK;
      const uint32_t kt_addr = k_addr + buf * NCB * kKeyBlock;
      if (__syncthreads_or(tid < kBK && keys[tid] >= 0)) {
        // 1. S and dP over this warpgroup's 16 keys: x[4 i + e] = X[16 wq + g + 8 (e / 2)][16 wg + 8 i + 2 c + e % 2].
        float s[8], dp[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) s[e] = dp[e] = 0.f;
        wgmma::fence_operand(s);
        wgmma::fence_operand(dp);
        wgmma::fence();
        const uint32_t kw_addr = kt_addr + wg * 16 * gmma::kRowBytes;  // this warpgroup's key rows
        wgmma::mma_k_blocks<T, 16>(s, q_addr, kHeadBlock, kw_addr, kKeyBlock, NCB);
        wgmma::mma_k_blocks<T, 16>(dp, do_addr, kHeadBlock, kw_addr, kKeyBlock, nvb);
        wgmma::commit();
        wgmma::wait<0>();
        wgmma::fence_operand(s);
        wgmma::fence_operand(dp);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int h = 16 * wq + g + 8 * r;
          const float lse = lse_s[h], delta = delta_s[h];
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int j = 16 * wg + 8 * i + 2 * c, e = 4 * i + 2 * r;
            float pv[2], dsv[2];
#pragma unroll
            for (int u = 0; u < 2; ++u) {
              pv[u] = keys[j + u] >= 0 ? dev_exp(s[e + u] * scale - lse) : 0.f;  // lse = +inf: 0
              dsv[u] = pv[u] * (dp[e + u] - delta) * scale;
            }
            *reinterpret_cast<uint32_t*>(base + L.ds + gmma::elem_offset(h, j, kHeadBlock)) = pack2<T>(dsv[0], dsv[1]);
#pragma unroll
            for (int u = 0; u < 2; ++u) {
              const uint32_t off = gmma::elem_offset(j + u, h, kKeyBlock);
              *reinterpret_cast<T*>(base + L.pt + off) = from_ct<T>(pv[u]);
              *reinterpret_cast<T*>(base + L.dst + off) = from_ct<T>(dsv[u]);
            }
          }
        }
        wgmma::fence_proxy_async();
        __syncthreads();  // dS, P^T and dS^T of both warpgroups are in shared memory

        // 2. dq += dS K: the latent blocks of this warpgroup over all 32 keys, the rope block over its 16.
        wgmma::fence_operand(dq);
        wgmma::fence();
#pragma unroll
        for (int ks = 0; ks < kBK / 16; ++ks)
          wgmma::mma<T, 64 * NQ, true>(
              *reinterpret_cast<float(*)[32 * NQ]>(&dq[0]), gmma::desc_k_major(ds_addr + ks * 32),
              gmma::desc_mn_major(kt_addr + wg * NQ * kKeyBlock + ks * 16 * gmma::kRowBytes, kKeyBlock), true);
        wgmma::mma<T, 64, true>(*reinterpret_cast<float(*)[32]>(&dq[kRope]), gmma::desc_k_major(ds_addr + wg * 32),
                                gmma::desc_mn_major(kw_addr + (NCB - 1) * kKeyBlock, kKeyBlock), true);
        wgmma::commit();

        // 3. dk^T per column block over this warpgroup's keys, two chains in flight: chain cb is issued
        //    before chain cb - 1's rows are written. acc[cb % 2][4 i + e] = dk[key 16 wg + 8 i + 2 c + e % 2]
        //    [column 64 cb + 16 wq + g + 8 (e / 2)].
        const bool add = h0 > 0;  // later head groups add to the rows the first group wrote
        float acc[2][8];
#pragma unroll
        for (int cb = 0; cb <= NCB; ++cb) {
          if (cb < NCB) {
            float(&a)[8] = acc[cb & 1];
#pragma unroll
            for (int e = 0; e < 8; ++e) a[e] = 0.f;
            wgmma::fence_operand(a);
            wgmma::fence();
#pragma unroll
            for (int ks = 0; ks < kHeads / 16; ++ks)
              wgmma::mma<T, 16, false, true>(
                  a, gmma::desc_mn_major(q_addr + cb * kHeadBlock + ks * 16 * gmma::kRowBytes, kHeadBlock),
                  gmma::desc_k_major(dst_addr + wg * 16 * gmma::kRowBytes + ks * 32), true);
            if (cb < nvb) {
#pragma unroll
              for (int ks = 0; ks < kHeads / 16; ++ks)
                wgmma::mma<T, 16, false, true>(
                    a, gmma::desc_mn_major(do_addr + cb * kHeadBlock + ks * 16 * gmma::kRowBytes, kHeadBlock),
                    gmma::desc_k_major(pt_addr + wg * 16 * gmma::kRowBytes + ks * 32), true);
            }
            wgmma::commit();
          }
          if (cb > 0) {
            if (cb < NCB) wgmma::wait<1>();  // chain cb - 1 (and the dq batch) done, chain cb may run on
            else wgmma::wait<0>();
            float(&a)[8] = acc[(cb - 1) & 1];
            wgmma::fence_operand(a);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              const int key = 16 * wg + 8 * (e >> 2) + 2 * c + (e & 1);
              if (keys[key] < 0) continue;
              float* dst = rows + int64_t(k0 + key) * D + 64 * (cb - 1) + 16 * wq + g + 8 * ((e >> 1) & 1);
              *dst = add ? *dst + a[e] : a[e];
            }
          }
        }
        wgmma::wait<0>();
        wgmma::fence_operand(dq);
      }
      __syncthreads();  // this block's tiles (keys, dS, P^T, dS^T) may now be overwritten
    }
    cp_async_wait<0>();

    // The rope partials: warpgroup 1's through shared memory (the key tiles are free), added to warpgroup
    // 0's in that order; then each warpgroup writes its latent blocks and warpgroup 0 the rope block.
    if (wg == 1) {
#pragma unroll
      for (int e = 0; e < 32; ++e)
        rope_xch[(16 * wq + g + 8 * ((e >> 1) & 1)) * 64 + 8 * (e >> 2) + 2 * c + (e & 1)] = dq[kRope + e];
    }
    __syncthreads();
    if (wg == 0) {
#pragma unroll
      for (int e = 0; e < 32; ++e)
        dq[kRope + e] += rope_xch[(16 * wq + g + 8 * ((e >> 1) & 1)) * 64 + 8 * (e >> 2) + 2 * c + (e & 1)];
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int h = 16 * wq + g + 8 * r;
      if (h >= hb) continue;
      float* dqh = dqg + int64_t(h0 + h) * D;
#pragma unroll
      for (int j = 0; j < NQ + 1; ++j) {
        if (j == NQ && wg == 1) continue;  // the rope block is warpgroup 0's
        const int col0 = j < NQ ? 64 * (wg * NQ + j) : 64 * (NCB - 1);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          float2 v;
          v.x = dq[32 * j + 4 * i + 2 * r], v.y = dq[32 * j + 4 * i + 2 * r + 1];
          *reinterpret_cast<float2*>(dqh + col0 + 8 * i + 2 * c) = v;
        }
      }
    }
    __syncthreads();  // rope_xch read; the next group's loads may overwrite the key tiles
  }
}

}  // namespace sparse_mla_wgmma_bwd
}  // namespace glm5::cuda
