// Shared-memory operand layout of the sm_90a warpgroup MMAs (wgmma) as glm5 uses it, and the matrix
// descriptors that tell wgmma about it. Pure arithmetic (no device code), so the CPU simulator's wgmma
// (tests/cuda_sim/cuda_sim.h) and the check against CuTe's make_gmma_desc (tests/cuda_sim/sim_gmma_desc.cpp)
// use the same functions as the kernels.
//
// One layout only, the 128-byte swizzle (CuTe's Layout_{K,MN}_SW128_Atom): a tile of R rows x 64 16-bit
// columns is stored row after row, 128 bytes a row, and the 16-byte chunk j of row r lands at chunk
// j ^ (r % 8); a wider operand is a sequence of such column blocks, `block` bytes apart. With every tile
// 1024-byte aligned in the shared window (the swizzle XORs absolute address bits [4, 7) with [7, 10)),
// the same bytes serve as
//   K-major:  rows = M or N (heads, keys), columns = the reduction index k   (A, or B of Q K^T)
//   MN-major: rows = k, columns = N                                          (B of P V: key rows are V)
// Descriptor fields (PTX ISA "matrix descriptor"; CuTe's GmmaDescriptor): start address >> 4 in bits
// [0, 14), leading byte offset >> 4 in [16, 30), stride byte offset >> 4 in [32, 46), base offset 0, and
// the layout type in [62, 64) (1 = 128-byte swizzle). In these layouts SBO is the step between 8-row
// groups (1024 bytes) and LBO is unused (1) when K-major, the step between 64-column blocks when MN-major
// (not read when the operand is a single block).
#pragma once
#include <cuda_runtime.h>  // __host__ / __device__

#include <cstdint>

namespace glm5::cuda::gmma {

inline constexpr uint32_t kRowBytes = 128;    // one swizzled row: 64 16-bit elements
inline constexpr uint32_t kAtomBytes = 1024;  // 8 rows: the swizzle's period and the tiles' alignment

// Byte offset of the 16-byte chunk `chunk` (0..7) of row `row` inside one column block.
__host__ __device__ constexpr uint32_t chunk_offset(uint32_t row, uint32_t chunk) {
  return row * kRowBytes + ((chunk ^ (row & 7u)) << 4);
}

// Byte offset of 16-bit element (row, col) of a tile of column blocks `block` bytes apart.
__host__ __device__ constexpr uint32_t elem_offset(uint32_t row, uint32_t col, uint32_t block) {
  return (col >> 6) * block + chunk_offset(row, (col >> 3) & 7u) + (col & 7u) * 2u;
}

__host__ __device__ constexpr uint64_t make_desc(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return uint64_t((smem_addr & 0x3ffffu) >> 4) | (uint64_t((lbo_bytes >> 4) & 0x3fffu) << 16) |
         (uint64_t((sbo_bytes >> 4) & 0x3fffu) << 32) | (uint64_t(1) << 62);
}

// K-major operand whose first row is at shared address `addr` (a 16-element k step inside a column block
// starts 32 bytes further: the hardware applies the swizzle after adding the offsets, as CUTLASS's
// descriptor iterator relies on).
__host__ __device__ constexpr uint64_t desc_k_major(uint32_t addr) { return make_desc(addr, 16, kAtomBytes); }

// MN-major B whose k row 0, column 0 is at `addr`, column blocks `block` bytes apart.
__host__ __device__ constexpr uint64_t desc_mn_major(uint32_t addr, uint32_t block) {
  return make_desc(addr, block, kAtomBytes);
}

// Decoded fields, for the simulator.
struct Desc {
  uint32_t start, lbo, sbo, base_offset, layout;
};
__host__ __device__ constexpr Desc decode(uint64_t d) {
  return Desc{uint32_t(d & 0x3fffu) << 4, uint32_t((d >> 16) & 0x3fffu) << 4, uint32_t((d >> 32) & 0x3fffu) << 4,
              uint32_t((d >> 49) & 7u), uint32_t(d >> 62)};
}

// The shared address of element (i, k) of a K-major operand (i = row of A or column of B), or of element
// (k, n) of an MN-major B, under descriptor d (128-byte swizzle): the canonical layouts of the PTX ISA
// (CuTe: ((8,m),(T,2)):((8T,SBO),(1,T)) and ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)) in 16-byte units),
// then the swizzle on the absolute address.
__host__ __device__ constexpr uint32_t swizzle128(uint32_t addr) { return addr ^ (((addr >> 7) & 7u) << 4); }
__host__ __device__ constexpr uint32_t k_major_addr(const Desc& d, uint32_t i, uint32_t k) {
  return swizzle128(d.start + (i & 7u) * kRowBytes + (i >> 3) * d.sbo + (k >> 3) * 16u + (k & 7u) * 2u);
}
__host__ __device__ constexpr uint32_t mn_major_addr(const Desc& d, uint32_t k, uint32_t n) {
  return swizzle128(d.start + (n & 63u) * 2u + (n >> 6) * d.lbo + (k & 7u) * kRowBytes + (k >> 3) * d.sbo);
}

}  // namespace glm5::cuda::gmma
