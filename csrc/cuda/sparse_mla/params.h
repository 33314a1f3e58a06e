// POD parameter blocks of the sparse MLA CUDA kernels (filled by api.cu, read by kernels.cuh).
#pragma once
#include <cstdint>

namespace glm5::cuda {

struct SparseMlaFwdParams {
  const void* q;         // [T, H, D] storage dtype
  const void* kv;        // [S, D]
  const int32_t* indices;  // [T, K], -1 = empty slot
  void* out;             // [T, H, dv] storage dtype
  void* lse;             // [T, H] compute dtype (fp32, fp64 for fp64)
  int64_t T;
  int H, D, S, K, dv;
  double scale;
  int hb;  // heads per CTA
  int bk;  // keys per shared-memory block
  int ld;  // padded row stride of the q / key tiles in shared memory (odd: no bank conflicts)
};

struct SparseMlaBwdParams {
  const void* q;          // [T, H, D]
  const void* kv;         // [S, D]
  const int32_t* indices;  // [T, K]
  const void* dout;       // [T, H, dv]
  const void* out;        // [T, H, dv]
  const void* lse;        // [T, H] compute dtype
  void* dq_acc;           // [T, H, D] compute dtype, zero-initialised, owned per query
  void* rows;             // [n_chunk * K, D] compute dtype: per-(t, slot) key-gradient rows
  int64_t t0, t1;         // the chunk of queries [t0, t1) this launch handles
  int H, D, S, K, dv;
  double scale;
  int hb;   // heads per inner group
  int bk;   // keys per shared-memory block
  int ld;   // padded stride of q / key tiles
  int ldv;  // padded stride of the dO tile
};

struct SparseMlaReduceParams {
  const uint32_t* sorted_keys;  // [n] key of each valid row (S marks an empty slot), ascending
  const int32_t* sorted_rows;   // [n] row of the chunk buffer, (t, slot) order within a key
  const void* rows;             // [n, D] compute dtype
  void* dkv_acc;                // [S, D] compute dtype, accumulated in place
  int64_t n;
  int S, D;
};

}  // namespace glm5::cuda
