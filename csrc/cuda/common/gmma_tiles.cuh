// Shared-memory tiles of the wgmma kernels (sparse MLA forward / backward, the indexer loss target): the
// 1024-byte-aligned start of the dynamic shared memory, cp.async row gathers into the 128-byte-swizzled
// layout of gmma_desc.h, and the K-major product chain over a tile's column blocks.
#pragma once
#include <cstdint>

#include "device_utils.cuh"
#include "gmma_desc.h"
#include "mma.cuh"
#include "wgmma.cuh"

namespace glm5::cuda {
namespace gmma {

struct AlignedSmem {
  unsigned char* ptr;
  uint32_t addr;  // its shared-window address, a multiple of kAtomBytes
};

// The dynamic shared memory from its first 1024-byte-aligned shared address (the launch requests
// kAtomBytes more than the tiles need): the swizzle XORs absolute address bits.
__device__ __forceinline__ AlignedSmem aligned_dynamic_smem() {
  unsigned char* raw = dynamic_smem();
  const uint32_t a = smem_addr(raw);
  const uint32_t pad = (kAtomBytes - (a & (kAtomBytes - 1))) & (kAtomBytes - 1);
  return {raw + pad, a + pad};
}

// cp.async of `rows` rows of `cols` 16-bit elements (cols % 8 == 0) into the tile at `tile`, whose column
// blocks are rows * 128 bytes apart: row r from row_ptr(r) (16-byte aligned), zero-filled when that is
// null (`dummy`, any legal address, stands in as the unread source). Thread tid copies the 16-byte chunks
// tid, tid + nthreads, ...: consecutive threads take consecutive chunks of a row (coalesced). Not committed.
template <typename T, typename RowPtr>
__device__ __forceinline__ void gather_rows(unsigned char* tile, int rows, int cols, RowPtr&& row_ptr, const T* dummy,
                                            int tid, int nthreads) {
  const int cpr = cols / 8;
  const uint32_t block = uint32_t(rows) * kRowBytes;
  for (int i = tid; i < rows * cpr; i += nthreads) {
    const int r = i / cpr, ch = i % cpr;
    const T* src = row_ptr(r);
    cp_async_16(tile + (ch >> 3) * block + chunk_offset(r, ch & 7), src != nullptr ? src + ch * 8 : dummy,
                src != nullptr);
  }
}

}  // namespace gmma

namespace wgmma {

// acc += A B^T over ncb 64-column blocks (4 k-steps each): A = the 64 rows at a_addr, B = the N rows at
// b_addr, both K-major with column blocks a_block / b_block bytes apart. Issued, not committed.
template <typename T, int N>
__device__ __forceinline__ void mma_k_blocks(float (&acc)[N / 2], uint32_t a_addr, uint32_t a_block, uint32_t b_addr,
                                             uint32_t b_block, int ncb) {
  for (int cb = 0; cb < ncb; ++cb) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      mma<T, N, false>(acc, gmma::desc_k_major(a_addr + cb * a_block + kk * 32),
                       gmma::desc_k_major(b_addr + cb * b_block + kk * 32), true);
  }
}

}  // namespace wgmma
}  // namespace glm5::cuda
