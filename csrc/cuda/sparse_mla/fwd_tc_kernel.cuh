// Sparse MLA forward on tensor cores (mma.sync m16n8k16, bf16/fp16 in, fp32 accumulation).
// Semantics: glm5/ops/reference.py (sparse_mla); same results as sparse_mla_fwd_kernel (kernels.cuh)
// up to rounding: P is rounded to the input type before P V, as FlashAttention does.
//
// One CTA per (query t, group of 16 MT heads), 2 MT warps. Warp w owns m-tile mi = w % MT (16 heads)
// and half = w / MT. The query's head rows stay in shared memory; the K selected key rows stream
// through a double-buffered shared tile, BK = 32 keys per block, gathered by cp.async (an invalid slot,
// or the padding of the last block, is zero-filled and masked to -inf). Per block:
//   S = Q K^T      warp (mi, half) computes rows mi, keys half * 16 .. +16 (two n8-tiles)
//   online softmax the two warps of an m-tile swap their row maxima through shared memory, so both
//                  hold the same running max m (log2 units) and each keeps a partial row sum l
//   P -> smem      as T, [16 MT][BK]
//   O += P V       warp (mi, half) owns O rows mi, columns half * dv / 2 .. +dv / 2 (V = key[:dv])
// At the end the partial sums of the pair are added, out = O / l, lse = ln 2 (m + log2 l); a query
// with no valid slot gets out = 0, lse = +inf. Padded heads (past H) are zero rows, never written.
//
// Shared rows are padded by 8 elements: the row stride is an odd multiple of 16 bytes, so the eight
// 16-byte rows of every ldmatrix phase fall in distinct banks.
//
// Device code only (no ATen): fwd_tc.cu launches it; tests/cuda_sim runs the same source on the CPU.
#pragma once
#include <cmath>
#include <cstdint>

#include "../common/device_utils.cuh"
#include "../common/mma.cuh"
#include "params.h"

namespace glm5::cuda {
namespace sparse_mla_tc {

inline constexpr int kBK = 32;       // keys per block
inline constexpr int kMaxOTiles = 32;  // n8-tiles of O per warp: dv / 16 <= 32, i.e. dv <= 512
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

__host__ __device__ inline constexpr int q_stride(int D) { return D + 8; }
inline constexpr int kPStride = kBK + 8;

template <int MT>
inline size_t sparse_mla_fwd_tc_smem(int D, int elem) {
  constexpr int HR = 16 * MT;
  return size_t(elem) * (size_t(HR) * q_stride(D) + 2 * size_t(kBK) * q_stride(D) + size_t(HR) * kPStride) +
         sizeof(float) * 2 * HR + sizeof(int) * 2 * kBK;
}

template <typename T, int MT>
__global__ void __launch_bounds__(64 * MT, 1) sparse_mla_fwd_tc_kernel(const SparseMlaFwdParams p) {
  constexpr int NT = 64 * MT, HR = 16 * MT;
  unsigned char* smem_raw = dynamic_smem();
  const int D = p.D, dv = p.dv, K = p.K, S = p.S, ld = q_stride(D), cpr = D / 8;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int mi = warp % MT, half = warp / MT, g = lane >> 2, c = lane & 3;
  const int64_t t = blockIdx.x;
  const int h0 = blockIdx.y * HR, nh = min(HR, p.H - h0);

  T* qs = reinterpret_cast<T*>(smem_raw);  // [HR][ld]
  T* ks = qs + HR * ld;                    // [2][kBK][ld]
  T* ps = ks + 2 * kBK * ld;               // [HR][kPStride]
  float* red = reinterpret_cast<float*>(ps + HR * kPStride);  // [2][HR] one value per (half, row)
  int* keyok = reinterpret_cast<int*>(red + 2 * HR);          // [2][kBK]

  const T* qg = static_cast<const T*>(p.q) + (t * p.H + h0) * D;
  const T* kvg = static_cast<const T*>(p.kv);
  const int32_t* idx_row = p.indices + t * K;
  bool saw_valid = false;

  // Gathers block blk's key rows into buffer buf (16-byte chunks; invalid rows zero-filled).
  auto load_block = [&](int blk, int buf) {
    const int k0 = blk * kBK;
    T* kb = ks + buf * kBK * ld;
    for (int i = tid; i < kBK * cpr; i += NT) {
      const int j = i / cpr, ch = i % cpr;
      const int s = k0 + j < K ? idx_row[k0 + j] : -1;
      const bool ok = s >= 0 && s < S;
      cp_async_16(kb + j * ld + ch * 8, ok ? kvg + int64_t(s) * D + ch * 8 : kvg, ok);
    }
    if (tid < kBK) {
      const int s = k0 + tid < K ? idx_row[k0 + tid] : -1;
      const bool ok = s >= 0 && s < S;
      keyok[buf * kBK + tid] = ok;
      saw_valid |= ok;
    }
  };

  const int nblk = (K + kBK - 1) / kBK;
  for (int i = tid; i < HR * cpr; i += NT) {
    const int r = i / cpr, ch = i % cpr;
    cp_async_16(qs + r * ld + ch * 8, r < nh ? qg + int64_t(r) * D + ch * 8 : qg, r < nh);
  }
  if (nblk > 0) load_block(0, 0);
  cp_async_commit();

  const float sl2 = float(p.scale) * kLog2e;  // scores in log2 units
  const int nto = dv / 16;                    // O n8-tiles of this warp (even: dv % 32 == 0)
  const int ocol0 = half * (dv / 2);
  float m_run[2] = {-INFINITY, -INFINITY};    // rows g and g + 8 of m-tile mi
  float l_run[2] = {0.f, 0.f};                // this thread's partial sums of those rows
  float acc[kMaxOTiles][4];
#pragma unroll
  for (int i = 0; i < kMaxOTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  for (int b = 0; b < nblk; ++b) {
    const int buf = b & 1;
    if (b + 1 < nblk) load_block(b + 1, buf ^ 1);  // buffer buf ^ 1 was released at the end of b - 1
    cp_async_commit();                             // (possibly empty: keeps the group count uniform)
    cp_async_wait<1>();                            // Q and block b have landed for this thread
    __syncthreads();                               // ... and for every thread
    const T* kb = ks + buf * kBK * ld;
    const int* ok = keyok + buf * kBK;

    // S = Q K^T: rows mi * 16 + (g, g + 8), keys half * 16 + nt * 8 + 2c + (0, 1).
    float sacc[2][4] = {};
    for (int d0 = 0; d0 < D; d0 += 16) {
      uint32_t a[4], bk[4];
      ldmatrix_x4(a, qs + (mi * 16 + (lane & 15)) * ld + d0 + (lane >> 4) * 8);
      ldmatrix_x4(bk, kb + (half * 16 + (lane & 7) + (lane >> 4) * 8) * ld + d0 + ((lane >> 3) & 1) * 8);
      mma_16816<T>(sacc[0], a, bk[0], bk[1]);
      mma_16816<T>(sacc[1], a, bk[2], bk[3]);
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = half * 16 + nt * 8 + 2 * c + (e & 1);
        const float v = ok[j] ? sacc[nt][e] * sl2 : -INFINITY;
        sacc[nt][e] = v;
        mx[e >> 1] = fmaxf(mx[e >> 1], v);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      if (c == 0) red[half * HR + mi * 16 + g + 8 * r] = mx[r];
    }
    __syncthreads();
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = mi * 16 + g + 8 * r;
      const float m_new = fmaxf(m_run[r], fmaxf(red[row], red[HR + row]));
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing valid yet: keep exp2 finite
      alpha[r] = exp2f(m_run[r] - m_use);                     // 0 while m_run = -inf
      m_run[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        sacc[nt][2 * r] = exp2f(sacc[nt][2 * r] - m_use);
        sacc[nt][2 * r + 1] = exp2f(sacc[nt][2 * r + 1] - m_use);
        sum += sacc[nt][2 * r] + sacc[nt][2 * r + 1];
      }
      l_run[r] = l_run[r] * alpha[r] + sum;
    }
    T* prow = ps + (mi * 16 + g) * kPStride + half * 16 + 2 * c;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      *reinterpret_cast<uint32_t*>(prow + nt * 8) = pack2<T>(sacc[nt][0], sacc[nt][1]);
      *reinterpret_cast<uint32_t*>(prow + 8 * kPStride + nt * 8) = pack2<T>(sacc[nt][2], sacc[nt][3]);
    }
#pragma unroll
    for (int nt = 0; nt < kMaxOTiles; ++nt) {
      acc[nt][0] *= alpha[0];
      acc[nt][1] *= alpha[0];
      acc[nt][2] *= alpha[1];
      acc[nt][3] *= alpha[1];
    }
    __syncthreads();  // P of both halves is in shared memory

    // O += P V: A = P rows of m-tile mi, B = key rows [j][col] through ldmatrix.trans.
#pragma unroll
    for (int j0 = 0; j0 < kBK; j0 += 16) {
      uint32_t a[4];
      ldmatrix_x4(a, ps + (mi * 16 + (lane & 15)) * kPStride + j0 + (lane >> 4) * 8);
      const T* vrow = kb + (j0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + ocol0 + (lane >> 4) * 8;
#pragma unroll
      for (int nt = 0; nt < kMaxOTiles; nt += 2) {
        if (nt < nto) {
          uint32_t bv[4];
          ldmatrix_x4_trans(bv, vrow + nt * 8);
          mma_16816<T>(acc[nt], a, bv[0], bv[1]);
          mma_16816<T>(acc[nt + 1], a, bv[2], bv[3]);
        }
      }
    }
    __syncthreads();  // keys[buf], P and red are free for the next block
  }
  cp_async_wait<0>();

  // Row sums: the four lanes of a row, then the two warps of the m-tile.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
    if (c == 0) red[half * HR + mi * 16 + g + 8 * r] = l_run[r];
  }
  const bool any = __syncthreads_or(saw_valid);  // also the barrier for red
  T* og = static_cast<T*>(p.out);
  float* lse = static_cast<float*>(p.lse);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = mi * 16 + g + 8 * r;
    if (row >= nh) continue;
    const float l = red[row] + red[HR + row];
    const float inv = any ? 1.f / l : 0.f;
    const int64_t oh = (t * p.H + h0 + row) * dv + ocol0 + 2 * c;
#pragma unroll
    for (int nt = 0; nt < kMaxOTiles; ++nt) {
      if (nt < nto)
        *reinterpret_cast<uint32_t*>(og + oh + nt * 8) = pack2<T>(acc[nt][2 * r] * inv, acc[nt][2 * r + 1] * inv);
    }
    if (half == 0 && c == 0) lse[t * p.H + h0 + row] = any ? (m_run[r] + log2f(l)) * kLn2 : INFINITY;
  }
}

}  // namespace sparse_mla_tc
}  // namespace glm5::cuda
