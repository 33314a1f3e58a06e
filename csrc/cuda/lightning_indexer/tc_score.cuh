// Warp-level tensor-core scoring of the lightning indexer (bf16 / fp16 inputs, fp32 accumulation), the
// one code path of indexer_logits and indexer_topk on tensor cores, so their scores are bit-identical.
//
// A warp scores 32 consecutive keys (two m16 tiles; the first key index is a multiple of 16) against
// one query's HI x DI rows (HI % 16 == 0, DI % 16 == 0, DI <= 16 * kTcMaxKSteps):
//   D[key][head] = k[key, :] . q[head, :] by mma m16n8k16 (A = 16 keys x 16 dims, B = 16 dims x 8 heads,
//   layouts in ../common/mma.cuh), k-steps in increasing order from zero accumulators; then
//   score(key) = sum over heads of w[head] * relu(D[key][head]) in a fixed order: each lane folds its
//   own heads with fmaf (16-head passes ascending; per pass n-tile 0 then 1; heads 2c then 2c + 1),
//   then the quad's 4 lanes add their partial sums by a butterfly (xor 1, then xor 2), which leaves
//   the same bits in all four. The result for a key depends only on the key's row, its index mod 16
//   (its row in the m16 tile) and the query: not on the warp, tile or kernel that computed it.
// relu keeps NaN (as torch's), so a NaN input gives a NaN score.
//
// Shared-memory tiles (keys and q) are row-major with a row stride of tc_ld(DI) = DI + 8 elements: the
// stride is an odd number of 16-byte units (DI / 8 is even), so the 8 rows an ldmatrix reads fall in
// 8 different bank groups, and every row start stays 16-byte aligned for cp.async and ldmatrix.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/mma.cuh"

namespace glm5::cuda {

constexpr int kTcWarps = 8;
constexpr int kTcThreads = 32 * kTcWarps;
constexpr int kTcWarpKeys = 32;                          // keys per warp (two m16 tiles)
constexpr int kTcTileKeys = kTcWarps * kTcWarpKeys;      // keys per CTA tile
constexpr int kTcMaxKSteps = 8;                          // DI <= 128
__host__ __device__ constexpr int tc_ld(int DI) { return DI + 8; }

// The key (offset in the warp's 32) whose score lane `lane` returns from tc_score_query: quad lane c
// keeps the sum of m16 tile c / 2, row g (+ 8 when c is odd), g = lane / 4.
__device__ __forceinline__ int tc_key_of_lane(int lane) { return 8 * (lane & 3) + (lane >> 2); }

// cp.async of rows [0, nrows) of a row-major [*, DI] matrix into dst (row stride ld): row r < nvalid
// comes from src + r * DI, the others are zero-filled (and read nothing; `legal` is any valid address).
// Threads tid, tid + nthr, ... of the caller's group each issue their share of 16-byte chunks.
template <typename T>
__device__ __forceinline__ void tc_copy_rows(T* dst, int ld, const T* src, const T* legal, int nrows, int nvalid,
                                             int DI, int tid, int nthr) {
  const int chunks = DI / 8;  // 16-byte chunks per row
  for (int i = tid; i < nrows * chunks; i += nthr) {
    const int r = i / chunks, c = i - r * chunks;
    const bool valid = r < nvalid;
    cp_async_16(dst + r * ld + 8 * c, valid ? src + int64_t(r) * DI + 8 * c : legal, valid);
  }
}

// A fragments of the warp's 32 keys (rows 0..31 of `keys`, stride ld) for the nk = DI / 16 k-steps:
// a[mt][kk] = keys[16 mt + 0..15][16 kk + 0..15]. ldmatrix x4: lanes 0-15 give rows 0-15 at column 0
// (matrices 0, 1 = a0, a1), lanes 16-31 the same rows at column 8 (matrices 2, 3 = a2, a3).
template <typename T>
__device__ __forceinline__ void tc_load_afrag(uint32_t (&a)[2][kTcMaxKSteps][4], const T* keys, int ld, int nk) {
  const int lane = int(threadIdx.x) & 31;
  const T* row = keys + (lane & 15) * ld + 8 * (lane >> 4);
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int kk = 0; kk < kTcMaxKSteps; ++kk) {
      if (kk < nk) ldmatrix_x4(a[mt][kk], row + 16 * mt * ld + 16 * kk);
    }
  }
}

__device__ __forceinline__ float tc_relu(float x) { return x < 0.f ? 0.f : x; }

// The score of key tc_key_of_lane(lane) of the warp's 32 keys (A fragments `a`) for one query: q rows
// qs[0..HI) (stride ld, shared memory), weights ws[0..HI) (fp32, shared memory). See the file comment.
template <typename T>
__device__ __forceinline__ float tc_score_query(const uint32_t (&a)[2][kTcMaxKSteps][4], const T* qs, int ld,
                                                const float* ws, int HI, int nk) {
  const int lane = int(threadIdx.x) & 31, c = lane & 3;
  // B fragments of heads 16 p + 0..15: ldmatrix x4 matrix i = lane / 8 holds heads 8 (i / 2) + 0..7 at
  // dims 8 (i % 2) + 0..7 of the k-step, i.e. b0, b1 of n-tile 0, then b0, b1 of n-tile 1.
  const T* brow = qs + (8 * ((lane >> 3) >> 1) + (lane & 7)) * ld + 8 * ((lane >> 3) & 1);
  float part[2][2] = {{0.f, 0.f}, {0.f, 0.f}};  // [m16 tile][row g, row g + 8]
  for (int p = 0; p < HI / 16; ++p) {
    float acc[2][2][4];  // [m16 tile][n-tile][C fragment]
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
    const T* bp = brow + 16 * p * ld;
#pragma unroll
    for (int kk = 0; kk < kTcMaxKSteps; ++kk) {
      if (kk < nk) {
        uint32_t b[4];
        ldmatrix_x4(b, bp + 16 * kk);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_16816<T>(acc[mt][0], a[mt][kk], b[0], b[1]);
          mma_16816<T>(acc[mt][1], a[mt][kk], b[2], b[3]);
        }
      }
    }
    // C fragment: acc[.][nt][0, 1] = D[row g][heads h, h + 1], acc[.][nt][2, 3] = D[row g + 8][h, h + 1].
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int h = 16 * p + 8 * nt + 2 * c;
      const float w0 = ws[h], w1 = ws[h + 1];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        part[mt][0] = fmaf(w0, tc_relu(acc[mt][nt][0]), part[mt][0]);
        part[mt][0] = fmaf(w1, tc_relu(acc[mt][nt][1]), part[mt][0]);
        part[mt][1] = fmaf(w0, tc_relu(acc[mt][nt][2]), part[mt][1]);
        part[mt][1] = fmaf(w1, tc_relu(acc[mt][nt][3]), part[mt][1]);
      }
    }
  }
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      part[mt][r] += __shfl_xor_sync(0xffffffffu, part[mt][r], 1);
      part[mt][r] += __shfl_xor_sync(0xffffffffu, part[mt][r], 2);
    }
  }
  // Lane c keeps key 8 c + g: tile c / 2, row g + 8 (c % 2).
  return c == 0 ? part[0][0] : c == 1 ? part[0][1] : c == 2 ? part[1][0] : part[1][1];
}

}  // namespace glm5::cuda
