// The indexer KL loss's target on Hopper's warpgroup tensor cores: for every position k of query t's key
// set, the head-summed main-attention probability from the saved lse,
//   P[t, k] = sum over heads h with lse[t,h] != +inf of exp(sm * q[t,h] . kv[s] - lse[t,h])
// where s = indices[t, k] (sparse; 0 for a slot off the set: s outside the clamped visible range
// [ks, ke), or -1) or s = ks[t] + k (dense: every visible key). The loss kernels (kernels.cuh) then read
// P instead of recomputing it on CUDA cores in every pass; fwd and bwd each compute it once, for chunks
// of queries. bf16/fp16 q and kv, D % 64 == 0 (GLM-5: 576), fp32 accumulation and output.
//
// One CTA per query of the chunk [t0, t0 + gridDim.x), two warpgroups. Heads in groups of 64 (padded
// rows: zero q, excluded); per group q stays in shared memory and the positions stream through two
// shared tiles of kBK = 64 keys gathered by cp.async one block ahead (positions off the set zero-filled).
// Warpgroup w scores positions 32 w .. 32 w + 31 of a block (wgmma m64n32k16 over D / 16 steps, the
// 128-byte-swizzled tiles of gmma_desc.h), exponentiates, and sums its columns in a fixed order: the
// thread's two rows, a butterfly over the warp's 16 rows, then the 4 warps in increasing order; head
// groups add in increasing order. Deterministic.
//
// Device code only (no ATen): probs_wgmma.cu launches it; tests/cuda_sim runs the same source on the CPU.
#pragma once
#include <cmath>
#include <cstdint>

#include "../common/device_utils.cuh"
#include "../common/gmma_tiles.cuh"
#include "../common/mma.cuh"
#include "../common/wgmma.cuh"

namespace glm5::cuda {
namespace indexer_probs_wgmma {

struct Params {
  const void* q;           // [T, H, D] bf16 / fp16
  const void* kv;          // [S, D]
  const float* lse;        // [T, H]
  const int32_t* indices;  // [T, K] (sparse) or null (dense)
  const int32_t* ks;       // [T]
  const int32_t* ke;       // [T]
  float* P;                // [gridDim.x, ld] out: row t - t0, positions [0, K) or [0, ke - ks)
  int64_t t0, ld;
  int64_t T;
  int S, H, D, K;
  double sm_scale;
};

inline constexpr int kHeads = 64;
inline constexpr int kBK = 64;  // slots per block, 32 per warpgroup
inline constexpr int kThreads = 256;
inline constexpr uint32_t kBlockBytes = 64 * 128;  // a 64-column block of 64 rows

// Q, two key tiles, the column sums [2 warpgroups][4 warps][32], lse [64], key flags [2][kBK], and the
// alignment slack.
inline constexpr size_t smem_bytes(int D) {
  return gmma::kAtomBytes + size_t(3 * (D / 64)) * kBlockBytes + sizeof(float) * (2 * 4 * 32 + kHeads) +
         sizeof(int) * 2 * kBK;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) head_summed_probs_wgmma_kernel(const Params p) {
  const gmma::AlignedSmem sm_base = gmma::aligned_dynamic_smem();
  unsigned char* base = sm_base.ptr;
  const uint32_t base_addr = sm_base.addr;

  const int D = p.D, K = p.K, H = p.H, ncb = D / 64;
  const uint32_t tile = uint32_t(ncb) * kBlockBytes;
  const int tid = threadIdx.x, wg = tid >> 7, wq = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const int64_t t = p.t0 + blockIdx.x;
  const int lo = max(0, min(p.ks[t], p.S)), hi = max(lo, min(p.ke[t], p.S));
  const bool sparse = p.indices != nullptr;
  const int npos = sparse ? K : hi - lo;

  unsigned char* qs = base;        // [ncb][64 heads][128 B]
  unsigned char* ks = qs + tile;   // [2][ncb][64 keys][128 B]
  float* colsum = reinterpret_cast<float*>(ks + 2 * tile);  // [2][4][32]
  float* lse_s = colsum + 2 * 4 * 32;                        // [64]
  int* keyok = reinterpret_cast<int*>(lse_s + kHeads);       // [2][kBK]
  const uint32_t q_addr = base_addr, k_addr = base_addr + tile;

  const T* kvg = static_cast<const T*>(p.kv);
  const int32_t* idx_row = sparse ? p.indices + t * K : nullptr;
  float* prow = p.P + (t - p.t0) * p.ld;
  const float sm = static_cast<float>(p.sm_scale);
  const int nblk = (npos + kBK - 1) / kBK;

  // The key of position pos of the set, or -1 when it is not in it (the loss kernels' loss_key).
  auto key_at = [&](int pos) -> int {
    if (pos >= npos) return -1;
    if (!sparse) return lo + pos;
    const int s = idx_row[pos];
    return s >= lo && s < hi ? s : -1;
  };
  auto load_block = [&](int blk, int buf) {
    const int k0 = blk * kBK;
    auto key_row = [&](int j) -> const T* {
      const int s = key_at(k0 + j);
      return s >= 0 ? kvg + int64_t(s) * D : nullptr;
    };
    gmma::gather_rows(ks + buf * tile, kBK, D, key_row, kvg, tid, kThreads);
    if (tid < kBK) keyok[buf * kBK + tid] = key_at(k0 + tid) >= 0;
  };

  for (int h0 = 0; h0 < H; h0 += kHeads) {
    const int nh = min(kHeads, H - h0);
    const T* qg = static_cast<const T*>(p.q) + (t * H + h0) * D;
    // The previous group ended with a barrier: q, the tiles and lse are free.
    gmma::gather_rows(qs, kHeads, D, [&](int r) { return r < nh ? qg + int64_t(r) * D : nullptr; }, qg, tid,
                      kThreads);
    if (tid < kHeads) lse_s[tid] = tid < nh ? p.lse[t * H + h0 + tid] : INFINITY;  // padded rows: excluded
    if (nblk > 0) load_block(0, 0);
    cp_async_commit();

    for (int b = 0; b < nblk; ++b) {
      const int buf = b & 1;
      if (b + 1 < nblk) load_block(b + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
      wgmma::fence_proxy_async();
      __syncthreads();
      const int* ok = keyok + buf * kBK;
      const uint32_t kb_addr = k_addr + buf * tile;

      // s[4 i + e] = q[16 wq + g + 8 (e / 2)] . kv[slot 32 wg + 8 i + 2 c + e % 2]
      float s[16];
#pragma unroll
      for (int e = 0; e < 16; ++e) s[e] = 0.f;
      wgmma::fence_operand(s);
      wgmma::fence();
      wgmma::mma_k_blocks<T, 32>(s, q_addr, kBlockBytes, kb_addr + wg * 32 * gmma::kRowBytes, kBlockBytes, ncb);
      wgmma::commit();
      wgmma::wait<0>();
      wgmma::fence_operand(s);

      // Column sums of exp(sm s - lse) over this warp's 16 rows (rows with lse = +inf add nothing).
      const float l0 = lse_s[16 * wq + g], l1 = lse_s[16 * wq + g + 8];
      float col[8];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const float e0 = l0 != INFINITY ? dev_exp(fmaf(sm, s[4 * i + u], -l0)) : 0.f;
          const float e1 = l1 != INFINITY ? dev_exp(fmaf(sm, s[4 * i + 2 + u], -l1)) : 0.f;
          float v = e0 + e1;
          v += __shfl_xor_sync(0xffffffffu, v, 4);
          v += __shfl_xor_sync(0xffffffffu, v, 8);
          v += __shfl_xor_sync(0xffffffffu, v, 16);
          col[2 * i + u] = v;
        }
      if (g == 0) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int u = 0; u < 2; ++u) colsum[(wg * 4 + wq) * 32 + 8 * i + 2 * c + u] = col[2 * i + u];
      }
      __syncthreads();
      if (tid < kBK) {  // slot j of the block: its warpgroup's four warps, in order
        const int k = b * kBK + tid, w = tid >> 5, j = tid & 31;
        if (k < npos) {
          float v = 0.f;
#pragma unroll
          for (int q4 = 0; q4 < 4; ++q4) v += colsum[(w * 4 + q4) * 32 + j];
          v = ok[tid] ? v : 0.f;
          prow[k] = h0 == 0 ? v : prow[k] + v;  // later head groups add, same thread, fixed order
        }
      }
      __syncthreads();  // tile buf, colsum and keyok[buf] are free for the next block
    }
    cp_async_wait<0>();
  }
}

}  // namespace indexer_probs_wgmma
}  // namespace glm5::cuda
