// POD parameter blocks of the lightning-indexer CUDA kernels (filled by api.cu, read by kernels.cuh).
#pragma once
#include <cstdint>

namespace glm5::cuda {

struct IndexerParams {
  const void* q;   // [T, HI, DI] storage dtype
  const void* k;   // [S, DI]
  const void* w;   // [T, HI]
  const int32_t* ks;  // [T] first visible key
  const int32_t* ke;  // [T] one past the last visible key
  int64_t T;
  int S, HI, DI;
  int bs;   // keys per shared-memory tile (SIMT kernels)
  int ldk;  // padded (odd) row stride of the key tile (SIMT kernels)
  int qb;   // queries per CTA (tensor-core logits)
  // indexer_logits
  void* logits;  // [T, S] compute dtype
  // indexer_logits_bwd
  const void* grad;  // [T, S] compute dtype
  void* dq;          // [T, HI, DI] compute dtype
  void* dk;          // [S, DI] compute dtype
  void* dw;          // [T, HI] compute dtype
  // indexer_topk
  int topk;
  int cap;  // top-k candidates gathered per query before a sorted merge (>= the key tile, <= kSortN)
  int32_t* out_idx;  // [T, topk]
  void* out_val;     // [T, topk] compute dtype
};

}  // namespace glm5::cuda
