// glm5's wgmma operand layouts and descriptors (csrc/cuda/common/gmma_desc.h) against CuTe's, for
// test_sim_gmma_desc.py. CuTe's Layout_{K,MN}_SW128_Atom tilings and make_gmma_desc are what CUTLASS's
// Hopper GEMMs run on hardware; glm5's kernels write their tiles with gmma::elem_offset / chunk_offset,
// build descriptors with gmma::desc_*, and the simulator reads operands through gmma::*_addr. Checked,
// for tiles of 64 and 32 rows x D read K-major and MN-major as the sparse MLA kernels read them:
//   layout: every element's offset equals CuTe's tile_to_shape of the swizzle atom;
//   desc:   every wgmma's descriptor equals make_gmma_desc of the CuTe slice it reads;
//   decode: the simulator's address of every element of that slice, from CuTe's descriptor, equals the
//           slice's own (swizzled) address;
// and the accumulator fragment layout against CuTe's CLayout_64xN.
// Host code only: a stand-in for __cvta_generic_to_shared gives CuTe shared addresses on the CPU.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

alignas(1024) static unsigned char g_window[256 * 1024];  // the "shared window": address = offset
inline size_t __cvta_generic_to_shared(const void* p) {
  return size_t(static_cast<const unsigned char*>(p) - g_window);
}
#define CUTE_CVTA_GENERIC_TO_SHARED_ACTIVATED 1

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include <torch/extension.h>

#include <map>
#include <string>

#include "../../csrc/cuda/common/gmma_desc.h"

namespace {

using namespace cute;
namespace gm = glm5::cuda::gmma;
using T = cute::bfloat16_t;

// Byte offset of element (i, j) of a tensor on g_window + base (CuTe applies a swizzle to the pointer).
template <class Tensor>
uint32_t offset_of(const Tensor& t, uint32_t base, int i, int j) {
  return uint32_t(reinterpret_cast<const unsigned char*>(raw_pointer_cast(&t(i, j))) - g_window) - base;
}

// A ROWS x D tile (ROWS 64: Q, dO, a forward key tile; 32: a backward key tile; D = ND x 64 columns)
// read K-major in slices of 16 rows (N = 16, a warpgroup's keys) and 32 rows, and MN-major (its rows are
// k) in slices of N = 64 and N = 256 columns, at every 16-row k step.
template <int ROWS, int ND>
void check_tile(std::map<std::string, int64_t>& bad) {
  constexpr int D = ND * 64;
  constexpr uint32_t block = ROWS * 128, base = 3 * 1024;  // a column block's stride, the tile's address
  auto* ptr = reinterpret_cast<T*>(g_window + base);

  auto k_layout = tile_to_shape(SM90::GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<ROWS>, Int<D>>{});
  Tensor k_tile = make_tensor(make_smem_ptr(ptr), k_layout);
  for (int r = 0; r < ROWS; ++r)
    for (int col = 0; col < D; ++col)
      bad["layout"] += offset_of(k_tile, base, r, col) != gm::elem_offset(r, col, block);
  auto k_slices = [&](auto rows_per_slice) {
    constexpr int R = decltype(rows_per_slice)::value;
    for (int row0 = 0; row0 < ROWS; row0 += R) {
      for (int k0 = 0; k0 < D; k0 += 16) {
        Tensor slice = local_tile(k_tile, Shape<Int<R>, _16>{}, make_coord(row0 / R, k0 / 16));
        const uint64_t want = SM90::GMMA::make_gmma_desc<SM90::GMMA::Major::K>(slice);
        bad["desc"] += gm::desc_k_major(base + gm::elem_offset(row0, k0, block)) != want;
        const gm::Desc d = gm::decode(want);
        for (int i = 0; i < R; ++i)
          for (int k = 0; k < 16; ++k, ++bad["checked"])
            bad["decode"] += gm::k_major_addr(d, i, k) != base + gm::elem_offset(row0 + i, k0 + k, block);
      }
    }
  };
  k_slices(Int<16>{});
  k_slices(Int<32>{});

  // The same bytes as (N = columns, K = ROWS), MN-major.
  auto mn_layout = tile_to_shape(SM90::GMMA::Layout_MN_SW128_Atom<T>{}, Shape<Int<D>, Int<ROWS>>{}, Step<_2, _1>{});
  Tensor mn_tile = make_tensor(make_smem_ptr(ptr), mn_layout);
  for (int n = 0; n < D; ++n)
    for (int k = 0; k < ROWS; ++k) bad["layout"] += offset_of(mn_tile, base, n, k) != gm::elem_offset(k, n, block);
  auto mn_slices = [&](auto cols_per_slice) {
    constexpr int N = decltype(cols_per_slice)::value;
    if constexpr (N <= D) {
      for (int n0 = 0; n0 + N <= D; n0 += N) {
        for (int k0 = 0; k0 < ROWS; k0 += 16) {
          Tensor slice = local_tile(mn_tile, Shape<Int<N>, _16>{}, make_coord(n0 / N, k0 / 16));
          const uint64_t want = SM90::GMMA::make_gmma_desc<SM90::GMMA::Major::MN>(slice);
          // One 64-column block has no next block: CuTe writes LBO 0 there, glm5 the block stride (unread).
          constexpr uint64_t kMask = N == 64 ? ~(uint64_t(0x3fff) << 16) : ~uint64_t(0);
          bad["desc"] += (gm::desc_mn_major(base + gm::elem_offset(k0, n0, block), block) & kMask) != (want & kMask);
          const gm::Desc d = gm::decode(want);
          for (int k = 0; k < 16; ++k)
            for (int n = 0; n < N; ++n, ++bad["checked"])
              bad["decode"] += gm::mn_major_addr(d, k, n) != base + gm::elem_offset(k0 + k, n0 + n, block);
        }
      }
    }
  };
  mn_slices(Int<64>{});
  mn_slices(Int<256>{});
}

template <int ND>
std::map<std::string, int64_t> check_tiles() {
  std::map<std::string, int64_t> bad{{"layout", 0}, {"desc", 0}, {"decode", 0}, {"checked", 0}};
  check_tile<64, ND>(bad);
  check_tile<32, ND>(bad);
  return bad;
}

// The accumulator layout the kernels (and the simulator's wgmma) assume, d[4 i + e] of thread tid =
// D[16 (tid / 32) + (tid % 32) / 4 + 8 (e / 2)][8 i + 2 (tid % 4) + e % 2], against CuTe's CLayout_64xN
// ((thread, value) -> m + 64 n) for every N the kernels use. Returns the mismatches.
template <int N>
int64_t accumulator_mismatches() {
  int64_t bad = 0;
  const auto layout = SM90::GMMA::CLayout_64xN<N>{};
  for (int tid = 0; tid < 128; ++tid) {
    for (int v = 0; v < N / 2; ++v) {
      const int idx = int(layout(tid, v));
      const int lane = tid % 32, i = v / 4, e = v % 4;
      const int m = 16 * (tid / 32) + lane / 4 + 8 * (e / 2), n = 8 * i + 2 * (lane % 4) + e % 2;
      bad += idx != m + 64 * n;
    }
  }
  return bad;
}

int64_t accumulators() {
  return accumulator_mismatches<16>() + accumulator_mismatches<32>() + accumulator_mismatches<64>() +
         accumulator_mismatches<128>() + accumulator_mismatches<192>() + accumulator_mismatches<256>();
}

std::map<std::string, int64_t> check(int64_t D) {
  switch (D) {
    case 64: return check_tiles<1>();
    case 192: return check_tiles<3>();
    case 576: return check_tiles<9>();
    default: TORCH_CHECK(false, "D must be 64, 192 or 576");
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("check", &check);
  m.def("accumulators", &accumulators);
}
