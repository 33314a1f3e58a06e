// glm5's wgmma operand layouts and descriptors (csrc/cuda/common/gmma_desc.h) against CuTe's, for
// test_sim_gmma_desc.py. CuTe's Layout_{K,MN}_SW128_Atom tilings and make_gmma_desc are what CUTLASS's
// Hopper GEMMs run on hardware; glm5's kernels write their tiles with gmma::elem_offset / chunk_offset,
// build descriptors with gmma::desc_*, and the simulator reads operands through gmma::*_addr. Checked,
// for the sparse MLA forward's tiles (Q and key tiles of 64 rows x D, V = the key tile read MN-major):
//   layout: every element's offset equals CuTe's tile_to_shape of the swizzle atom;
//   desc:   every wgmma's descriptor equals make_gmma_desc of the CuTe slice it reads;
//   decode: the simulator's address of every element of that slice, from CuTe's descriptor, equals the
//           slice's own (swizzled) address.
// Host code only: a stand-in for __cvta_generic_to_shared gives CuTe shared addresses on the CPU.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

alignas(1024) static unsigned char g_window[256 * 1024];  // the "shared window": address = offset
inline size_t __cvta_generic_to_shared(const void* p) { return size_t(static_cast<const unsigned char*>(p) - g_window); }
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

// D = ND x 64 columns; the tile is 64 rows; V has NV-column slices (NV = 256 at GLM-5 sizes).
template <int ND>
std::map<std::string, int64_t> check_tiles() {
  constexpr int D = ND * 64, NV = 256;
  constexpr uint32_t block = 64 * 128, base = 3 * 1024;  // a tile's column-block stride, and its address
  std::map<std::string, int64_t> bad{{"layout", 0}, {"desc", 0}, {"decode", 0}, {"checked", 0}};
  auto* ptr = reinterpret_cast<T*>(g_window + base);

  // Rows x D, K-major (Q; keys for Q K^T; P with D = 64).
  auto k_layout = tile_to_shape(SM90::GMMA::Layout_K_SW128_Atom<T>{}, Shape<_64, Int<D>>{});
  Tensor k_tile = make_tensor(make_smem_ptr(ptr), k_layout);
  for (int r = 0; r < 64; ++r)
    for (int col = 0; col < D; ++col) bad["layout"] += offset_of(k_tile, base, r, col) != gm::elem_offset(r, col, block);
  for (int row0 : {0, 32}) {           // A = all 64 rows; B of a warpgroup's 32 keys
    for (int k0 = 0; k0 < D; k0 += 16) {  // every k step
      Tensor slice = local_tile(k_tile, Shape<_32, _16>{}, make_coord(row0 / 32, k0 / 16));
      const uint64_t want = SM90::GMMA::make_gmma_desc<SM90::GMMA::Major::K>(slice);
      const uint32_t start = base + gm::elem_offset(row0, k0, block);
      bad["desc"] += gm::desc_k_major(start) != want;
      const gm::Desc d = gm::decode(want);
      for (int i = 0; i < 32; ++i)
        for (int k = 0; k < 16; ++k) {
          bad["decode"] += gm::k_major_addr(d, i, k) != base + gm::elem_offset(row0 + i, k0 + k, block);
          ++bad["checked"];
        }
    }
  }

  // The same key tile as (N = columns, K = 64 keys), MN-major: V for P V.
  if constexpr (D >= 2 * NV) {
    auto mn_layout = tile_to_shape(SM90::GMMA::Layout_MN_SW128_Atom<T>{}, Shape<Int<D>, _64>{}, Step<_2, _1>{});
    Tensor v_tile = make_tensor(make_smem_ptr(ptr), mn_layout);
    for (int n = 0; n < D; ++n)
      for (int k = 0; k < 64; ++k) bad["layout"] += offset_of(v_tile, base, n, k) != gm::elem_offset(k, n, block);
    for (int wg = 0; wg < 2; ++wg) {
      for (int k0 = 0; k0 < 64; k0 += 16) {
        Tensor slice = local_tile(v_tile, Shape<Int<NV>, _16>{}, make_coord(wg, k0 / 16));
        const uint64_t want = SM90::GMMA::make_gmma_desc<SM90::GMMA::Major::MN>(slice);
        const uint32_t start = base + gm::elem_offset(k0, wg * NV, block);
        bad["desc"] += gm::desc_mn_major(start, block) != want;
        const gm::Desc d = gm::decode(want);
        for (int k = 0; k < 16; ++k)
          for (int n = 0; n < NV; ++n) {
            bad["decode"] += gm::mn_major_addr(d, k, n) != base + gm::elem_offset(k0 + k, wg * NV + n, block);
            ++bad["checked"];
          }
      }
    }
  }
  return bad;
}

std::map<std::string, int64_t> check(int64_t D) {
  switch (D) {
    case 64: return check_tiles<1>();
    case 128: return check_tiles<2>();
    case 576: return check_tiles<9>();
    default: TORCH_CHECK(false, "D must be 64, 128 or 576");
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("check", &check); }
