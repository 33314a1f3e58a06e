// POD parameter block of the indexer KL loss CUDA kernels (filled by api.cu, read by kernels.cuh).
#pragma once
#include <cstdint>

namespace glm5::cuda {

struct IndexerLossParams {
  // Inputs. q_idx/k_idx/w: the indexer's storage dtype; q/kv: the main attention's (its own dtype when
  // equal to the indexer's, else converted to the compute dtype by the host); lse/grad: compute dtype.
  const void* q_idx;       // [T, HI, DI]
  const void* k_idx;       // [S, DI]
  const void* w;           // [T, HI]
  const void* q;           // [T, H, D]
  const void* kv;          // [S, D]
  const void* lse;         // [T, H] compute dtype
  const int32_t* ks;       // [T] first visible key (clamped to [0, S] by the kernels)
  const int32_t* ke;       // [T] one past the last visible key (clamped to [ks, S])
  const int32_t* indices;  // [T, K] or null (dense mode); a slot outside [ks, ke) is not in the set
  const void* grad;        // [T] compute dtype (backward)
  // Null, or the target P of the launch's queries precomputed per position of their sets (probs_wgmma_kernel.cuh):
  // row t - q0 of P_ld fp32 values; the tile kernels then read it instead of computing P from q, kv and lse.
  const float* P_pre;
  int64_t P_ld;
  int64_t T;
  int64_t q0, q1;  // the queries of this launch of the per-query and dense dk kernels: [q0, q1)
  int S, HI, DI, H, D, K;
  double sm_scale;
  // Tiling (picked by the host to fit shared memory).
  int bs;   // keys (or slots) per tile
  int hb;   // attention heads per q chunk in shared memory
  int ldm;  // padded (odd) row stride of the q chunk / kv tile
  int ldi;  // padded (odd) row stride of q_idx / the k_idx tile
  // Outputs, all in the compute dtype.
  void* loss;    // [T] forward
  void* dq;      // [T, HI, DI] backward, written by the query's CTA
  void* dw;      // [T, HI]
  void* dk;      // [S, DI] dense: written by the key tile's CTA; sparse: accumulated per sort chunk
  void* stats;   // [T, 4] per-query (lse_i, norm, grad * mass, grad): backward, read by the dense dk kernel
  void* dI;      // [T, K] dLoss/dI of each valid slot: backward, sparse mode, read by the sparse dk kernel
  // Sparse dk reduction over the query chunk [t0, t0 + n / K), its slots sorted by key.
  const uint32_t* sorted_keys;  // [n] key of each slot (S = not in the set), ascending
  const int32_t* sorted_slots;  // [n] slot (relative to t0 * K) of each, in (t, slot) order within a key
  int64_t t0, n;
};

}  // namespace glm5::cuda
