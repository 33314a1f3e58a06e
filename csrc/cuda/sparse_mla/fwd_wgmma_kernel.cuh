// Sparse MLA forward on Hopper's warpgroup tensor cores (wgmma, bf16/fp16 in, fp32 accumulation), for
// the GLM-5 shapes: D % 64 == 0 (576), d_v = 2 NV with NV in {64, 256} (d_v 512), heads in groups of 64.
// Semantics: glm5/ops/reference.py (sparse_mla); the same results as the mma.sync kernel
// (fwd_tc_kernel.cuh) up to rounding: P is rounded to the input type before P V.
//
// One CTA per (query t, 64 heads), two warpgroups. Q (64 x D) stays in shared memory; the K selected key
// rows stream through two shared tiles of kBK = 64 keys, gathered by cp.async one block ahead (an
// invalid slot, or the padding of the last block, is zero-filled and masked to -inf). Per block:
//   S = Q K^T      warpgroup w scores keys 32 w .. 32 w + 31 (wgmma m64n32k16, D / 16 steps)
//   online softmax the two warpgroups swap their row maxima through shared memory, so both hold the
//                  same running max m (log2 units); each keeps partial row sums l over its keys
//   P -> smem      as T, 64 heads x 64 keys, K-major for the next mma
//   O += P V       warpgroup w owns O columns w NV .. w NV + NV - 1: A = P, B = the same key tile read
//                  MN-major (V = key[:d_v]) (wgmma m64nNVk16, 4 steps)
// At the end the two partial row sums are added, out = O / l, lse = ln 2 (m + log2 l); a query with no
// valid slot gets out = 0, lse = +inf. Padded heads (past H) are zero rows, never written.
//
// Every tile is stored in the 128-byte-swizzled layout of gmma_desc.h (column blocks of 64 elements),
// 1024-byte aligned: the dynamic shared memory is over-allocated by 1 KB and aligned by address.
//
// Device code only (no ATen): fwd_wgmma.cu launches it; tests/cuda_sim runs the same source on the CPU.
#pragma once
#include <cmath>
#include <cstdint>

#include "../common/device_utils.cuh"
#include "../common/gmma_tiles.cuh"
#include "../common/mma.cuh"
#include "../common/wgmma.cuh"
#include "params.h"

namespace glm5::cuda {
namespace sparse_mla_wgmma {

inline constexpr int kHeads = 64;                      // wgmma M: the heads of one CTA
inline constexpr int kBK = 64;                         // keys per block, 32 per warpgroup
inline constexpr int kThreads = 256;                   // two warpgroups
inline constexpr uint32_t kBlockBytes = kHeads * 128;  // one column block of Q, of a key tile, or P
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

// Q, two key tiles, P, the row exchange [2][64] and the key flags [2][kBK], plus the alignment slack.
inline constexpr size_t smem_bytes(int D) {
  return gmma::kAtomBytes + size_t(3 * (D / 64) + 1) * kBlockBytes + sizeof(float) * 2 * kHeads +
         sizeof(int) * 2 * kBK;
}

template <typename T, int NV>
__global__ void __launch_bounds__(kThreads, 1) sparse_mla_fwd_wgmma_kernel(const SparseMlaFwdParams p) {
  static_assert(NV == 64 || NV == 128 || NV == 256, "d_v / 2 must be 64, 128 or 256");
  const gmma::AlignedSmem sm = gmma::aligned_dynamic_smem();
  unsigned char* base = sm.ptr;
  const uint32_t base_addr = sm.addr;

  const int D = p.D, dv = p.dv, K = p.K, S = p.S, ncb = D / 64;
  const uint32_t tile = uint32_t(ncb) * kBlockBytes;  // bytes of Q, and of one key tile
  const int tid = threadIdx.x, wg = tid >> 7, wq = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const int64_t t = blockIdx.x;
  const int h0 = blockIdx.y * kHeads, nh = min(kHeads, p.H - h0);

  unsigned char* qs = base;                                     // [ncb][64 heads][128 B]
  unsigned char* ks = qs + tile;                                // [2][ncb][64 keys][128 B]
  unsigned char* ps = ks + 2 * tile;                            // [64 heads][128 B]: P, keys as k
  float* red = reinterpret_cast<float*>(ps + kBlockBytes);      // [2][64] one value per (warpgroup, row)
  int* keyok = reinterpret_cast<int*>(red + 2 * kHeads);        // [2][kBK]
  const uint32_t q_addr = base_addr, k_addr = base_addr + tile, p_addr = base_addr + 3 * tile;

  const T* qg = static_cast<const T*>(p.q) + (t * p.H + h0) * D;
  const T* kvg = static_cast<const T*>(p.kv);
  const int32_t* idx_row = p.indices + t * K;
  bool saw_valid = false;

  // Gathers block blk's key rows into tile buf (swizzled; invalid rows zero-filled).
  auto load_block = [&](int blk, int buf) {
    const int k0 = blk * kBK;
    auto key_row = [&](int j) -> const T* {
      const int s = k0 + j < K ? idx_row[k0 + j] : -1;
      return s >= 0 && s < S ? kvg + int64_t(s) * D : nullptr;
    };
    gmma::gather_rows(ks + buf * tile, kBK, D, key_row, kvg, tid, kThreads);
    if (tid < kBK) {
      const int s = k0 + tid < K ? idx_row[k0 + tid] : -1;
      const bool ok = s >= 0 && s < S;
      keyok[buf * kBK + tid] = ok;
      saw_valid |= ok;
    }
  };

  const int nblk = (K + kBK - 1) / kBK;
  gmma::gather_rows(qs, kHeads, D, [&](int r) { return r < nh ? qg + int64_t(r) * D : nullptr; }, qg, tid, kThreads);
  if (nblk > 0) load_block(0, 0);
  cp_async_commit();

  const float sl2 = float(p.scale) * kLog2e;  // scores in log2 units
  float m_run[2] = {-INFINITY, -INFINITY};    // rows 16 wq + g and + 8
  float l_run[2] = {0.f, 0.f};                // this thread's partial sums of those rows
  float o[NV / 2];
#pragma unroll
  for (int i = 0; i < NV / 2; ++i) o[i] = 0.f;

  for (int b = 0; b < nblk; ++b) {
    const int buf = b & 1;
    if (b + 1 < nblk) load_block(b + 1, buf ^ 1);  // tile buf ^ 1 was released at the end of b - 1
    cp_async_commit();                             // (possibly empty: keeps the group count uniform)
    cp_async_wait<1>();                            // Q and block b have landed for this thread
    wgmma::fence_proxy_async();                    // ... and are visible to wgmma
    __syncthreads();                               // ... for every thread
    const int* ok = keyok + buf * kBK;
    const uint32_t kb_addr = k_addr + buf * tile;

    // S = Q K^T over this warpgroup's 32 keys: s[4 i + e] = S[16 wq + g + 8 (e / 2)][32 wg + 8 i + 2 c + e % 2].
    float s[16];
#pragma unroll
    for (int e = 0; e < 16; ++e) s[e] = 0.f;
    wgmma::fence_operand(s);
    wgmma::fence();
    wgmma::mma_k_blocks<T, 32>(s, q_addr, kBlockBytes, kb_addr + wg * 32 * gmma::kRowBytes, kBlockBytes, ncb);
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::fence_operand(s);

    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int e = 0; e < 16; ++e) {
      const int j = wg * 32 + 8 * (e >> 2) + 2 * c + (e & 1);
      const float v = ok[j] ? s[e] * sl2 : -INFINITY;
      s[e] = v;
      mx[(e >> 1) & 1] = fmaxf(mx[(e >> 1) & 1], v);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      if (c == 0) red[wg * kHeads + 16 * wq + g + 8 * r] = mx[r];
    }
    __syncthreads();
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = 16 * wq + g + 8 * r;
      const float m_new = fmaxf(m_run[r], fmaxf(red[row], red[kHeads + row]));
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing valid yet: keep exp2 finite
      alpha[r] = exp2f(m_run[r] - m_use);                     // 0 while m_run = -inf
      m_run[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[4 * i + 2 * r] = exp2f(s[4 * i + 2 * r] - m_use);
        s[4 * i + 2 * r + 1] = exp2f(s[4 * i + 2 * r + 1] - m_use);
        sum += s[4 * i + 2 * r] + s[4 * i + 2 * r + 1];
      }
      l_run[r] = l_run[r] * alpha[r] + sum;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        *reinterpret_cast<uint32_t*>(ps + gmma::elem_offset(row, wg * 32 + 8 * i + 2 * c, kBlockBytes)) =
            pack2<T>(s[4 * i + 2 * r], s[4 * i + 2 * r + 1]);
      }
    }
#pragma unroll
    for (int i = 0; i < NV / 2; ++i) o[i] *= alpha[(i >> 1) & 1];
    wgmma::fence_proxy_async();
    __syncthreads();  // P of both warpgroups is in shared memory

    // O[:, wg NV ..] += P V: 16 keys a step; V's columns w NV .. are column blocks of the key tile.
    wgmma::fence_operand(o);
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      wgmma::mma<T, NV, true>(o, gmma::desc_k_major(p_addr + kk * 32),
                              gmma::desc_mn_major(kb_addr + wg * (NV / 64) * kBlockBytes + kk * 16 * gmma::kRowBytes,
                                                  kBlockBytes),
                              true);
    }
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::fence_operand(o);
    __syncthreads();  // the key tile, P and red are free for the next block
  }
  cp_async_wait<0>();

  // Row sums: the four lanes of a row, then the two warpgroups.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
    if (c == 0) red[wg * kHeads + 16 * wq + g + 8 * r] = l_run[r];
  }
  const bool any = __syncthreads_or(saw_valid);  // also the barrier for red
  T* og = static_cast<T*>(p.out);
  float* lse = static_cast<float*>(p.lse);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = 16 * wq + g + 8 * r;
    if (row >= nh) continue;
    const float l = red[row] + red[kHeads + row];
    const float inv = any ? 1.f / l : 0.f;
    T* orow = og + (t * p.H + h0 + row) * dv + wg * NV + 2 * c;
#pragma unroll
    for (int i = 0; i < NV / 8; ++i)
      *reinterpret_cast<uint32_t*>(orow + 8 * i) = pack2<T>(o[4 * i + 2 * r] * inv, o[4 * i + 2 * r + 1] * inv);
    if (wg == 0 && c == 0) lse[t * p.H + h0 + row] = any ? (m_run[r] + log2f(l)) * kLn2 : INFINITY;
  }
}

}  // namespace sparse_mla_wgmma
}  // namespace glm5::cuda
