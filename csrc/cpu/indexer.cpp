// Lightning indexer on the CPU: logits, their backward, and the fused streaming top-k.
//
//   logits[t,s] = sum_j w[t,j] * relu(q[t,j,:] . k[s,:])   for ks[t] <= s < ke[t], -inf elsewhere.
//
// Forward design. Queries are taken in blocks of ~512 (query, head) rows; each block streams the
// keys it can see in chunks of kChunk. A chunk is scored by a register-tiled micro-kernel (the GEMM
// q_block . k_chunk^T) whose epilogue applies relu, the head weight and the head sum in registers,
// so only the [queries, chunk] scores ever reach memory. indexer_logits copies them out;
// indexer_topk feeds them to a per-query selection buffer with a running threshold (TopkBuffer), so
// its extra memory is O(T * topk + chunk) and never O(T * S).
//
// Every score is a pure function of (q[t], k[s], w[t]): a kernel computes each dot product as one
// accumulation chain over the head dimension and adds the heads in index order, whatever the block,
// chunk or thread that computes it. So indexer_logits and indexer_topk give bitwise-identical
// scores, and both results are independent of the thread count. The selection order (score
// descending, key index ascending) is a strict total order, so the selected set does not depend on
// how the keys were split between threads either.
//
// Kernels: an AVX-512 BF16 dot-product kernel (vdpbf16ps: bf16 products, fp32 accumulation) for
// bf16 inputs on CPUs that have it; an AVX2/FMA fp32 kernel for fp32, fp16, and bf16 elsewhere (the
// environment variable GLM5_CPU_DISABLE_AVX512BF16=1 forces it, for tests); a scalar kernel for
// fp64 (gradcheck) and for non-x86 builds.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <glm5/checks.h>
#include <glm5/indexer_checks.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GLM5_INDEXER_X86 1
#endif

namespace {

constexpr int64_t kChunk = 512;         // keys scored per step: a multiple of every kernel's NR
constexpr int64_t kRowsPerBlock = 512;  // (query, head) rows per query block
constexpr int64_t kMaxQueriesPerBlock = 64;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Input checks
// ---------------------------------------------------------------------------------------------

// Shapes and dtypes: glm5/indexer_checks.h (shared with CUDA); ks/ke values on the host here.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, const at::Tensor& ks,
                  const at::Tensor& ke) {
  glm5::indexer_checks::inputs(q, k, w, ks, ke, at::kCPU);
  const at::Tensor ksc = ks.contiguous(), kec = ke.contiguous();
  glm5::indexer_checks::ranges_values(ksc.data_ptr<int32_t>(), kec.data_ptr<int32_t>(), q.size(0), k.size(0));
}

at::ScalarType acc_type(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

template <typename scalar_t>
struct Inputs {
  const scalar_t* q;  // [T, HI, DI]
  const scalar_t* k;  // [S, DI]
  const scalar_t* w;  // [T, HI]
  const int32_t* ks;  // [T]
  const int32_t* ke;  // [T]
  int64_t T, S, HI, DI;
};

// ---------------------------------------------------------------------------------------------
// Scratch memory and the work plan
// ---------------------------------------------------------------------------------------------

// A grow-only, 64-byte aligned buffer, one per thread and use.
template <typename T>
class Scratch {
 public:
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { std::free(p_); }
  T* get(int64_t n) {
    if (n > n_) {
      std::free(p_);
      const size_t bytes = static_cast<size_t>(ceil_div(std::max<int64_t>(n, 1) * sizeof(T), 64) * 64);
      p_ = static_cast<T*>(std::aligned_alloc(64, bytes));
      TORCH_CHECK(p_ != nullptr, "indexer: failed to allocate ", bytes, " bytes of scratch");
      n_ = n;
    }
    return p_;
  }

 private:
  T* p_ = nullptr;
  int64_t n_ = 0;
};

// One unit of work: the queries [t0, t0 + tb) against the keys [lo, hi) (a segment of the union of
// their visible ranges). Blocks are split into several segments only when there are too few blocks
// to keep the threads busy (few queries, long context).
struct Item {
  int64_t t0, tb, lo, hi, block, seg;
};

struct Plan {
  int64_t tb = 1;                  // queries per block
  std::vector<Item> items;         // ordered largest first (scheduling only; results do not depend on it)
  std::vector<int64_t> block_nseg; // segments of each block (0: no query of the block sees a key)
};

// min_seg_keys: the shortest key segment worth splitting off (each segment of a top-k restarts its
// selection from an empty buffer, so segments must be long compared with topk).
Plan make_plan(const int32_t* ks, const int32_t* ke, int64_t T, int64_t HI, int64_t min_seg_keys) {
  Plan plan;
  plan.tb = std::clamp<int64_t>(kRowsPerBlock / std::max<int64_t>(HI, 1), 1, kMaxQueriesPerBlock);
  const int64_t nblocks = ceil_div(T, plan.tb);
  std::vector<int64_t> lo(nblocks, 0), hi(nblocks, 0);
  int64_t nonempty = 0;
  for (int64_t b = 0; b < nblocks; ++b) {
    int64_t l = std::numeric_limits<int64_t>::max(), h = 0;
    for (int64_t t = b * plan.tb; t < std::min(T, (b + 1) * plan.tb); ++t) {
      if (ks[t] < ke[t]) {
        l = std::min<int64_t>(l, ks[t]);
        h = std::max<int64_t>(h, ke[t]);
      }
    }
    if (h > 0) {
      lo[b] = l, hi[b] = h;
      ++nonempty;
    }
  }
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());
  const int64_t seg_chunks = std::max<int64_t>(2, ceil_div(min_seg_keys, kChunk));
  plan.block_nseg.assign(nblocks, 0);
  for (int64_t b = 0; b < nblocks; ++b) {
    if (hi[b] == 0) continue;
    const int64_t nchunks = ceil_div(hi[b] - lo[b], kChunk);
    const int64_t nseg =
        nonempty >= want ? 1 : std::max<int64_t>(1, std::min(ceil_div(want, nonempty), nchunks / seg_chunks));
    plan.block_nseg[b] = nseg;
    const int64_t t0 = b * plan.tb, tb = std::min(T, t0 + plan.tb) - t0;
    for (int64_t g = 0; g < nseg; ++g) {
      const int64_t c_begin = nchunks * g / nseg, c_end = nchunks * (g + 1) / nseg;
      plan.items.push_back({t0, tb, lo[b] + c_begin * kChunk, std::min(hi[b], lo[b] + c_end * kChunk), b, g});
    }
  }
  std::stable_sort(plan.items.begin(), plan.items.end(),
                   [](const Item& a, const Item& b) { return a.tb * (a.hi - a.lo) > b.tb * (b.hi - b.lo); });
  return plan;
}

// Runs body(next) once per worker thread; next() hands out item numbers 0..n-1 (dynamically, so
// uneven items, such as causal query blocks, balance) and -1 when none is left.
template <typename F>
void parallel_items(int64_t n, const F& body) {
  if (n <= 0) return;
  std::atomic<int64_t> counter{0};
  auto next = [&counter, n]() -> int64_t {
    const int64_t i = counter.fetch_add(1, std::memory_order_relaxed);
    return i < n ? i : -1;
  };
  const int64_t nthreads = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) { body(next); });
}

// ---------------------------------------------------------------------------------------------
// Scorers: score a block of queries against a chunk of keys into out[query][key - c0]
// ---------------------------------------------------------------------------------------------

// The plain kernel: fp64 (gradcheck) and non-x86 builds. Scores only the visible keys.
template <typename scalar_t, typename acc_type_t>
class ScalarScorer {
 public:
  using acc_t = acc_type_t;
  explicit ScalarScorer(const Inputs<scalar_t>& in) : in_(in) {}

  void set_block(int64_t t0, int64_t tb) { t0_ = t0, tb_ = tb; }

  void score(int64_t c0, int64_t c1) {
    const int64_t HI = in_.HI, DI = in_.DI;
    acc_t* out = out_.get(tb_ * kChunk);
    for (int64_t i = 0; i < tb_; ++i) {
      const int64_t t = t0_ + i;
      const int64_t a = std::max<int64_t>(in_.ks[t], c0), b = std::min<int64_t>(in_.ke[t], c1);
      for (int64_t s = a; s < b; ++s) {
        const scalar_t* kr = in_.k + s * DI;
        acc_t sum = 0;
        for (int64_t j = 0; j < HI; ++j) {
          const scalar_t* qr = in_.q + (t * HI + j) * DI;
          acc_t d = 0;
          for (int64_t x = 0; x < DI; ++x) d += static_cast<acc_t>(qr[x]) * static_cast<acc_t>(kr[x]);
          const acc_t relu = d < 0 ? acc_t(0) : d;  // keeps NaN
          sum += static_cast<acc_t>(in_.w[t * HI + j]) * relu;
        }
        out[i * kChunk + (s - c0)] = sum;
      }
    }
  }

  const acc_t* row(int64_t i) { return out_.get(tb_ * kChunk) + i * kChunk; }

 private:
  Inputs<scalar_t> in_;
  int64_t t0_ = 0, tb_ = 0;
  Scratch<acc_t> out_;
};

#ifdef GLM5_INDEXER_X86

// 8x8 transpose of 32-bit elements: dst[x * ld_dst + c] = src[c][x] for c, x < 8.
inline void transpose8x8_u32(const uint32_t* const* src, uint32_t* dst, int64_t ld_dst) {
  __m256 r[8], t[8];
#pragma GCC unroll 8
  for (int c = 0; c < 8; ++c) r[c] = _mm256_loadu_ps(reinterpret_cast<const float*>(src[c]));
#pragma GCC unroll 4
  for (int c = 0; c < 8; c += 2) {
    t[c] = _mm256_unpacklo_ps(r[c], r[c + 1]);
    t[c + 1] = _mm256_unpackhi_ps(r[c], r[c + 1]);
  }
  // t0 = a0 b0 a1 b1 | a4 b4 a5 b5, t1 = a2 b2 a3 b3 | a6 b6 a7 b7, t2/t3 likewise for c, d, ...
  const __m256 u0 = _mm256_shuffle_ps(t[0], t[2], 0x44), u1 = _mm256_shuffle_ps(t[0], t[2], 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t[1], t[3], 0x44), u3 = _mm256_shuffle_ps(t[1], t[3], 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t[4], t[6], 0x44), u5 = _mm256_shuffle_ps(t[4], t[6], 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t[5], t[7], 0x44), u7 = _mm256_shuffle_ps(t[5], t[7], 0xEE);
  float* d = reinterpret_cast<float*>(dst);
  _mm256_storeu_ps(d + 0 * ld_dst, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(d + 1 * ld_dst, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(d + 2 * ld_dst, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(d + 3 * ld_dst, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(d + 4 * ld_dst, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(d + 5 * ld_dst, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(d + 6 * ld_dst, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(d + 7 * ld_dst, _mm256_permute2f128_ps(u3, u7, 0x31));
}

// dst[x * NR + c] = rows[c][x] for x < K, c < NR (rows[c] == nullptr: zeros), for 32-bit elements.
template <int64_t NR>
void pack_transpose_u32(const uint32_t* const* rows, int64_t K, uint32_t* dst) {
  static const uint32_t zeros[8] = {};
  int64_t x = 0;
  for (; x + 8 <= K; x += 8) {
    for (int64_t c = 0; c < NR; c += 8) {
      const uint32_t* src[8];
      for (int i = 0; i < 8; ++i) src[i] = rows[c + i] ? rows[c + i] + x : zeros;
      transpose8x8_u32(src, dst + x * NR + c, NR);
    }
  }
  for (; x < K; ++x) {
    for (int64_t c = 0; c < NR; ++c) dst[x * NR + c] = rows[c] ? rows[c][x] : 0u;
  }
}

// Adds w[i] * relu(acc[i]) into orow[i] for the MR rows of a tile, in row order. Consecutive rows
// of the same query (equal orow) are chained in registers: the same operations, in the same order,
// as one load-fma-store per row, so every score sums its heads in index order either way.
// max(0, x) returns x when x is NaN: relu keeps NaN, as torch's does.
#define GLM5_INDEXER_EPILOGUE(MR, VEC, LOAD, STORE, FMA, MAX, SET1, ZERO, WIDTH)                   \
  do {                                                                                            \
    const VEC zero = ZERO();                                                                      \
    float* cur = orow[0];                                                                         \
    VEC o0 = LOAD(cur), o1 = LOAD(cur + WIDTH);                                                   \
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {                                        \
      const VEC wi = SET1(wr[i]);                                                                 \
      o0 = FMA(wi, MAX(zero, c[i][0]), o0);                                                       \
      o1 = FMA(wi, MAX(zero, c[i][1]), o1);                                                       \
      if (i + 1 == MR || orow[i + 1] != cur) {                                                    \
        STORE(cur, o0);                                                                           \
        STORE(cur + WIDTH, o1);                                                                   \
        if (i + 1 < MR) {                                                                         \
          cur = orow[i + 1];                                                                      \
          o0 = LOAD(cur);                                                                         \
          o1 = LOAD(cur + WIDTH);                                                                 \
        }                                                                                         \
      }                                                                                           \
    }                                                                                             \
  } while (0)

// AVX2/FMA fp32 micro-kernel, 6 rows x 16 keys: A packed [DI][6], B packed [DI][16].
inline void tile_f32_6x16(const float* __restrict A, const float* __restrict B, int64_t K, const float* wr,
                          float* const* orow) {
  __m256 c[6][2];
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i) c[i][0] = c[i][1] = _mm256_setzero_ps();
  for (int64_t x = 0; x < K; ++x) {
    const __m256 b0 = _mm256_load_ps(B), b1 = _mm256_load_ps(B + 8);
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) {
      const __m256 a = _mm256_broadcast_ss(A + i);
      c[i][0] = _mm256_fmadd_ps(a, b0, c[i][0]);
      c[i][1] = _mm256_fmadd_ps(a, b1, c[i][1]);
    }
    A += 6;
    B += 16;
  }
  GLM5_INDEXER_EPILOGUE(6, __m256, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps, _mm256_max_ps, _mm256_set1_ps,
                        _mm256_setzero_ps, 8);
}

template <typename scalar_t>
struct F32Avx2Kernel {
  static constexpr int64_t MR = 6, NR = 16;
  using a_t = float;
  using b_t = float;
  static int64_t ksteps(int64_t DI) { return DI; }
  static void pack_a(const scalar_t* const* rows, int64_t DI, a_t* dst) {
    for (int64_t x = 0; x < DI; ++x) {
      for (int64_t i = 0; i < MR; ++i) dst[x * MR + i] = rows[i] ? static_cast<float>(rows[i][x]) : 0.f;
    }
  }
  static void pack_b(const scalar_t* k, int64_t n, int64_t DI, b_t* dst) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      const uint32_t* rows[NR];
      for (int64_t c = 0; c < NR; ++c) rows[c] = c < n ? reinterpret_cast<const uint32_t*>(k + c * DI) : nullptr;
      pack_transpose_u32<NR>(rows, DI, reinterpret_cast<uint32_t*>(dst));
    } else {
      for (int64_t x = 0; x < DI; ++x) {
        for (int64_t c = 0; c < NR; ++c) dst[x * NR + c] = c < n ? static_cast<float>(k[c * DI + x]) : 0.f;
      }
    }
  }
  static void tile(const a_t* A, const b_t* B, int64_t K, const float* wr, float* const* orow) {
    tile_f32_6x16(A, B, K, wr, orow);
  }
};

// AVX-512 BF16 micro-kernel, 8 rows x 32 keys over pairs of the head dim: A packed [DI/2][8] as
// (q[2x], q[2x+1]) bf16 pairs, B packed [DI/2][32] likewise. vdpbf16ps multiplies bf16 exactly and
// accumulates in fp32 (bf16 subnormal inputs read as zero).
__attribute__((target("avx512f,avx512bf16"))) void tile_bf16_8x32(const uint32_t* __restrict A,
                                                                   const uint32_t* __restrict B, int64_t K,
                                                                   const float* wr, float* const* orow) {
  __m512 c[8][2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) c[i][0] = c[i][1] = _mm512_setzero_ps();
  for (int64_t x = 0; x < K; ++x) {
    const __m512bh b0 = (__m512bh)_mm512_load_si512(B), b1 = (__m512bh)_mm512_load_si512(B + 16);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(A[i]));
      c[i][0] = _mm512_dpbf16_ps(c[i][0], a, b0);
      c[i][1] = _mm512_dpbf16_ps(c[i][1], a, b1);
    }
    A += 8;
    B += 32;
  }
  GLM5_INDEXER_EPILOGUE(8, __m512, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps, _mm512_max_ps, _mm512_set1_ps,
                        _mm512_setzero_ps, 16);
}

struct Bf16DotKernel {
  static constexpr int64_t MR = 8, NR = 32;
  using a_t = uint32_t;
  using b_t = uint32_t;
  static int64_t ksteps(int64_t DI) { return ceil_div(DI, 2); }
  static uint32_t pair(const c10::BFloat16* r, int64_t x, int64_t DI) {
    const uint32_t lo = r[2 * x].x, hi = 2 * x + 1 < DI ? r[2 * x + 1].x : 0;
    return lo | (hi << 16);
  }
  static void pack_a(const c10::BFloat16* const* rows, int64_t DI, a_t* dst) {
    const int64_t K = ksteps(DI);
    for (int64_t x = 0; x < K; ++x) {
      for (int64_t i = 0; i < MR; ++i) dst[x * MR + i] = rows[i] ? pair(rows[i], x, DI) : 0u;
    }
  }
  static void pack_b(const c10::BFloat16* k, int64_t n, int64_t DI, b_t* dst) {
    const int64_t K = ksteps(DI);
    if (DI % 2 == 0) {  // a bf16 pair is one 32-bit word of the key row: a plain transpose
      const uint32_t* rows[NR];
      for (int64_t c = 0; c < NR; ++c) rows[c] = c < n ? reinterpret_cast<const uint32_t*>(k + c * DI) : nullptr;
      pack_transpose_u32<NR>(rows, K, dst);
    } else {
      for (int64_t x = 0; x < K; ++x) {
        for (int64_t c = 0; c < NR; ++c) dst[x * NR + c] = c < n ? pair(k + c * DI, x, DI) : 0u;
      }
    }
  }
  static void tile(const a_t* A, const b_t* B, int64_t K, const float* wr, float* const* orow) {
    tile_bf16_8x32(A, B, K, wr, orow);
  }
};

bool use_avx512_bf16() {
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  const char* off = std::getenv("GLM5_CPU_DISABLE_AVX512BF16");
  return supported && !(off && off[0] && std::strcmp(off, "0") != 0);
}

// A register-tiled scorer around one of the micro-kernels above. Rows are the (query, head) pairs of
// the block, MR per tile (the last tile is padded with zero rows writing to a scratch row); keys are
// NR per panel. Loop order: a B panel stays in L1 while all row tiles stream past it.
template <class Kern, typename scalar_t>
class TiledScorer {
 public:
  using acc_t = float;
  static constexpr int64_t MR = Kern::MR, NR = Kern::NR;
  static_assert(kChunk % NR == 0, "kChunk must be a multiple of the panel width");

  explicit TiledScorer(const Inputs<scalar_t>& in) : in_(in), K_(Kern::ksteps(in.DI)) {}

  void set_block(int64_t t0, int64_t tb) {
    const int64_t HI = in_.HI, DI = in_.DI, R = tb * HI;
    t0_ = t0, tb_ = tb, ntiles_ = ceil_div(R, MR);
    typename Kern::a_t* A = apack_.get(ntiles_ * K_ * MR);
    float* wr = wrow_.get(ntiles_ * MR);
    int64_t* rowq = rowq_.get(ntiles_ * MR);
    int64_t* tlo = tile_lo_.get(ntiles_);
    int64_t* thi = tile_hi_.get(ntiles_);
    for (int64_t tile = 0; tile < ntiles_; ++tile) {
      const scalar_t* rows[MR];
      int64_t lo = std::numeric_limits<int64_t>::max(), hi = 0;
      for (int64_t i = 0; i < MR; ++i) {
        const int64_t r = tile * MR + i;
        if (r < R) {
          const int64_t t = t0 + r / HI;
          rows[i] = in_.q + (t0 * HI + r) * DI;
          wr[tile * MR + i] = static_cast<float>(in_.w[t0 * HI + r]);
          rowq[tile * MR + i] = r / HI;
          if (in_.ks[t] < in_.ke[t]) {
            lo = std::min<int64_t>(lo, in_.ks[t]);
            hi = std::max<int64_t>(hi, in_.ke[t]);
          }
        } else {
          rows[i] = nullptr;
          wr[tile * MR + i] = 0.f;
          rowq[tile * MR + i] = tb;  // the scratch row
        }
      }
      tlo[tile] = hi > 0 ? lo : 0;
      thi[tile] = hi;
      Kern::pack_a(rows, DI, A + tile * K_ * MR);
    }
  }

  void score(int64_t c0, int64_t c1) {
    const int64_t DI = in_.DI, n = c1 - c0, npanels = ceil_div(n, NR);
    typename Kern::b_t* B = bpack_.get(npanels * K_ * NR);
    for (int64_t p = 0; p < npanels; ++p) {
      Kern::pack_b(in_.k + (c0 + p * NR) * DI, std::min(NR, n - p * NR), DI, B + p * K_ * NR);
    }
    float* out = out_.get((tb_ + 1) * kChunk);
    std::memset(out, 0, sizeof(float) * (tb_ + 1) * kChunk);
    const typename Kern::a_t* A = apack_.get(0);
    const float* wr = wrow_.get(0);
    const int64_t* rowq = rowq_.get(0);
    const int64_t* tlo = tile_lo_.get(0);
    const int64_t* thi = tile_hi_.get(0);
    for (int64_t p = 0; p < npanels; ++p) {
      const int64_t ps = c0 + p * NR, pe = std::min(ps + NR, c1);
      for (int64_t tile = 0; tile < ntiles_; ++tile) {
        if (thi[tile] <= ps || tlo[tile] >= pe) continue;  // no query of this tile sees the panel
        float* orow[MR];
        for (int64_t i = 0; i < MR; ++i) orow[i] = out + rowq[tile * MR + i] * kChunk + p * NR;
        Kern::tile(A + tile * K_ * MR, B + p * K_ * NR, K_, wr + tile * MR, orow);
      }
    }
  }

  const float* row(int64_t i) { return out_.get(0) + i * kChunk; }

 private:
  Inputs<scalar_t> in_;
  int64_t K_;
  int64_t t0_ = 0, tb_ = 0, ntiles_ = 0;
  Scratch<typename Kern::a_t> apack_;
  Scratch<typename Kern::b_t> bpack_;
  Scratch<float> wrow_, out_;
  Scratch<int64_t> rowq_, tile_lo_, tile_hi_;
};

#endif  // GLM5_INDEXER_X86

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<Scorer>{}) with the scorer for scalar_t on this CPU.
template <typename scalar_t, typename F>
void with_scorer(const F& f) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    f(TypeTag<ScalarScorer<double, double>>{});
  } else {
#ifdef GLM5_INDEXER_X86
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (use_avx512_bf16()) return f(TypeTag<TiledScorer<Bf16DotKernel, scalar_t>>{});
    }
    f(TypeTag<TiledScorer<F32Avx2Kernel<scalar_t>, scalar_t>>{});
#else
    f(TypeTag<ScalarScorer<scalar_t, float>>{});
#endif
  }
}

// Scores item.t0.. against the keys [item.lo, item.hi) chunk by chunk; visit(c0, c1) after each.
template <class Scorer, typename V>
void stream_item(Scorer& sc, const Item& it, const V& visit) {
  sc.set_block(it.t0, it.tb);
  for (int64_t c0 = it.lo; c0 < it.hi; c0 += kChunk) {
    const int64_t c1 = std::min(c0 + kChunk, it.hi);
    sc.score(c0, c1);
    visit(c0, c1);
  }
}

// ---------------------------------------------------------------------------------------------
// indexer_logits
// ---------------------------------------------------------------------------------------------

at::Tensor indexer_logits_cpu(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& w_, const at::Tensor& ks_,
                              const at::Tensor& ke_) {
  check_inputs(q_, k_, w_, ks_, ke_);
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), w = w_.contiguous();
  const at::Tensor ks = ks_.contiguous(), ke = ke_.contiguous();
  const int64_t T = q.size(0), HI = q.size(1), DI = q.size(2), S = k.size(0);
  at::Tensor logits = at::full({T, S}, -std::numeric_limits<double>::infinity(), q.options().dtype(acc_type(q)));
  if (T == 0 || S == 0) return logits;
  const Plan plan = make_plan(ks.data_ptr<int32_t>(), ke.data_ptr<int32_t>(), T, HI, 2 * kChunk);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "indexer_logits_cpu", [&] {
    const Inputs<scalar_t> in{q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                              ks.data_ptr<int32_t>(), ke.data_ptr<int32_t>(), T, S, HI, DI};
    with_scorer<scalar_t>([&](auto tag) {
      using Scorer = typename decltype(tag)::type;
      using acc_t = typename Scorer::acc_t;
      acc_t* out = logits.data_ptr<acc_t>();
      parallel_items(static_cast<int64_t>(plan.items.size()), [&](const auto& next) {
        Scorer sc(in);
        for (int64_t n = next(); n >= 0; n = next()) {
          const Item& it = plan.items[n];
          stream_item(sc, it, [&](int64_t c0, int64_t c1) {
            for (int64_t i = 0; i < it.tb; ++i) {
              const int64_t t = it.t0 + i;
              const int64_t a = std::max<int64_t>(in.ks[t], c0), b = std::min<int64_t>(in.ke[t], c1);
              if (a < b) std::memcpy(out + t * S + a, sc.row(i) + (a - c0), sizeof(acc_t) * (b - a));
            }
          });
        }
      });
    });
  });
  return logits;
}

// ---------------------------------------------------------------------------------------------
// indexer_topk: streaming selection
// ---------------------------------------------------------------------------------------------

// The selection order: higher score first, then the smaller key index. A strict total order over
// distinct keys, so the selected set and its order are unique. For fp32 scores a candidate is one
// uint64 whose integer order is the selection order (order-preserving score bits, then ~index), so
// selecting and sorting compare plain integers.
template <typename acc_t>
struct SelKey;

template <>
struct SelKey<float> {
  using type = uint64_t;
  static type make(float v, int64_t i) {
    v += 0.f;  // -0 -> +0: equal scores must map to equal bits
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    u ^= (u >> 31) ? 0xFFFFFFFFu : 0x80000000u;
    return (static_cast<uint64_t>(u) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(i));
  }
  static float score(type key) {
    uint32_t u = static_cast<uint32_t>(key >> 32);
    u ^= (u >> 31) ? 0x80000000u : 0xFFFFFFFFu;
    float v;
    std::memcpy(&v, &u, sizeof(v));
    return v;
  }
  static int32_t index(type key) { return static_cast<int32_t>(~static_cast<uint32_t>(key)); }
  static bool before(type a, type b) { return a > b; }
};

template <>
struct SelKey<double> {
  struct type {
    double v;
    int32_t i;
  };
  static type make(double v, int64_t i) { return {v, static_cast<int32_t>(i)}; }
  static double score(const type& key) { return key.v; }
  static int32_t index(const type& key) { return key.i; }
  static bool before(const type& a, const type& b) { return a.v > b.v || (a.v == b.v && a.i < b.i); }
};

template <typename acc_t>
struct RanksBefore {
  using K = typename SelKey<acc_t>::type;
  bool operator()(const K& a, const K& b) const { return SelKey<acc_t>::before(a, b); }
};

// The running top-k of one query over keys offered in increasing index order. Holds up to `cap`
// (k + max(k, 1024)) candidates; when full it keeps the k best and raises the threshold to the k-th best score.
// A later key with a score equal to the threshold ranks after it (larger index), so only scores
// strictly above the threshold are kept: one compare rejects most keys. -inf never enters (a
// visible key scoring -inf is reported as padding, like the reference), NaN is flagged.
template <typename acc_t>
class TopkBuffer {
 public:
  using Key = typename SelKey<acc_t>::type;

  void reset(Key* buf, int64_t cap, int64_t k) {
    buf_ = buf, cap_ = cap, k_ = k, n_ = 0;
    thr_ = -std::numeric_limits<acc_t>::infinity();
    nan_ = false;
  }

  // Keys a..b-1 with scores sc[s - base].
  void offer(const acc_t* sc, int64_t base, int64_t a, int64_t b) {
    for (int64_t s = a; s < b;) {
      if (n_ == cap_) prune();
      const int64_t e = std::min(b, s + (cap_ - n_));
      offer_batch(sc, base, s, e);
      s = e;
    }
  }

  // Keeps the best min(k, n) candidates (sorted when asked); returns their number.
  int64_t finish(bool sorted) {
    if (n_ > k_) prune_exact();
    if (sorted) std::sort(buf_, buf_ + n_, RanksBefore<acc_t>());
    return n_;
  }

  bool saw_nan() const { return nan_; }

 private:
  // Keys [s, e) with e - s <= cap - n, so the buffer cannot overflow and the threshold is fixed:
  // branch-free appends (the slot after the last kept key is overwritten until a key is kept),
  // and with AVX2 groups of 8 keys all at or below the threshold are skipped with one compare.
  void offer_batch(const acc_t* sc, int64_t base, int64_t s, int64_t e) {
    Key* buf = buf_;
    int64_t n = n_;
    const acc_t thr = thr_;
    bool nan = false;
    auto one = [&](int64_t x) {
      const acc_t v = sc[x - base];
      buf[n] = SelKey<acc_t>::make(v, x);
      n += v > thr;
      nan |= v != v;
    };
#ifdef GLM5_INDEXER_X86
    if constexpr (std::is_same_v<acc_t, float>) {
      const __m256 vt = _mm256_set1_ps(thr);
      for (; s + 8 <= e; s += 8) {
        const __m256 v = _mm256_loadu_ps(sc + (s - base));
        if (_mm256_movemask_ps(_mm256_cmp_ps(v, vt, _CMP_NLE_UQ)) == 0) continue;  // NaN passes
#pragma GCC unroll 8
        for (int64_t x = 0; x < 8; ++x) one(s + x);
      }
    }
#endif
    for (; s < e; ++s) one(s);
    n_ = n;
    nan_ = nan_ || nan;
  }

  void prune() {
    if constexpr (std::is_same_v<Key, uint64_t>) {
      if (prune_histogram()) return;
    }
    prune_exact();
  }

  // Keeps exactly the k best; the threshold becomes the k-th best score.
  void prune_exact() {
    std::nth_element(buf_, buf_ + (k_ - 1), buf_ + n_, RanksBefore<acc_t>());
    n_ = k_;
    thr_ = SelKey<acc_t>::score(buf_[k_ - 1]);
  }

  // The cheap prune for uint64 keys: a histogram of the top 12 key bits finds the bin b holding the
  // k-th best key; every key of a lower bin is dropped (two linear passes, no sort) and the
  // threshold becomes the smallest score of bin b. That is safe: >= k kept keys score at least
  // that much and have smaller indices, so a later key scoring at or below it cannot make the
  // top k. Falls back to the exact prune when bin b is too crowded to free half the room.
  bool prune_histogram() {
    constexpr int kBits = 12;
    uint32_t hist[1 << kBits] = {};
    for (int64_t x = 0; x < n_; ++x) ++hist[buf_[x] >> (64 - kBits)];
    int64_t above = 0;
    int b = (1 << kBits) - 1;
    for (; b > 0 && above + hist[b] < k_; --b) above += hist[b];
    const int64_t kept = above + hist[b];
    if (b == 0 || kept > cap_ - (cap_ - k_) / 2) return false;
    const uint64_t lo = static_cast<uint64_t>(b) << (64 - kBits);
    int64_t m = 0;
    for (int64_t x = 0; x < n_; ++x) {
      const uint64_t key = buf_[x];
      buf_[m] = key;
      m += key >= lo;
    }
    n_ = m;
    thr_ = SelKey<acc_t>::score(lo);
    return true;
  }

  Key* buf_ = nullptr;
  int64_t cap_ = 0, k_ = 0, n_ = 0;
  acc_t thr_ = 0;
  bool nan_ = false;
};

template <typename acc_t>
void write_row(const typename SelKey<acc_t>::type* c, int64_t n, int32_t* idx, acc_t* val) {
  for (int64_t x = 0; x < n; ++x) idx[x] = SelKey<acc_t>::index(c[x]), val[x] = SelKey<acc_t>::score(c[x]);
}

std::tuple<at::Tensor, at::Tensor> indexer_topk_cpu(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& w_,
                                                    const at::Tensor& ks_, const at::Tensor& ke_, int64_t topk) {
  TORCH_CHECK_VALUE(topk > 0, "topk must be positive, got ", topk);
  check_inputs(q_, k_, w_, ks_, ke_);
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), w = w_.contiguous();
  const at::Tensor ks = ks_.contiguous(), ke = ke_.contiguous();
  const int64_t T = q.size(0), HI = q.size(1), DI = q.size(2), S = k.size(0);
  at::Tensor indices = at::full({T, topk}, -1, q.options().dtype(at::kInt));
  at::Tensor scores = at::full({T, topk}, -std::numeric_limits<double>::infinity(), q.options().dtype(acc_type(q)));
  if (T == 0 || S == 0) return {indices, scores};
  const Plan plan = make_plan(ks.data_ptr<int32_t>(), ke.data_ptr<int32_t>(), T, HI, 8 * std::min(topk, S));
  std::atomic<bool> saw_nan{false};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "indexer_topk_cpu", [&] {
    const Inputs<scalar_t> in{q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                              ks.data_ptr<int32_t>(), ke.data_ptr<int32_t>(), T, S, HI, DI};
    with_scorer<scalar_t>([&](auto tag) {
      using Scorer = typename decltype(tag)::type;
      using acc_t = typename Scorer::acc_t;
      using Key = typename SelKey<acc_t>::type;
      int32_t* out_idx = indices.data_ptr<int32_t>();
      acc_t* out_val = scores.data_ptr<acc_t>();

      // Items of split blocks leave their (<= topk) candidates in a slot; a merge follows.
      const int64_t nitems = static_cast<int64_t>(plan.items.size());
      std::vector<int64_t> slot(nitems, -1);
      int64_t nslots = 0;
      for (int64_t n = 0; n < nitems; ++n) {
        if (plan.block_nseg[plan.items[n].block] > 1) slot[n] = nslots++;
      }
      const int64_t tbmax = plan.tb;
      std::vector<Key> slot_keys(static_cast<size_t>(nslots * tbmax * topk));
      std::vector<int64_t> slot_count(static_cast<size_t>(nslots * tbmax), 0);

      parallel_items(nitems, [&](const auto& next) {
        Scorer sc(in);
        Scratch<Key> key_mem;
        std::vector<TopkBuffer<acc_t>> sel(static_cast<size_t>(tbmax));
        bool nan = false;
        for (int64_t n = next(); n >= 0; n = next()) {
          const Item& it = plan.items[n];
          const int64_t cap = std::max<int64_t>(1, std::min(topk + std::max<int64_t>(topk, 1024), it.hi - it.lo));
          const int64_t keep = std::min(topk, cap);
          Key* keys = key_mem.get(it.tb * cap);
          for (int64_t i = 0; i < it.tb; ++i) sel[i].reset(keys + i * cap, cap, keep);
          stream_item(sc, it, [&](int64_t c0, int64_t c1) {
            for (int64_t i = 0; i < it.tb; ++i) {
              const int64_t t = it.t0 + i;
              const int64_t a = std::max<int64_t>(in.ks[t], c0), b = std::min<int64_t>(in.ke[t], c1);
              if (a < b) sel[i].offer(sc.row(i), c0, a, b);
            }
          });
          for (int64_t i = 0; i < it.tb; ++i) {
            const int64_t t = it.t0 + i, cnt = sel[i].finish(/*sorted=*/slot[n] < 0);
            nan = nan || sel[i].saw_nan();
            if (slot[n] < 0) {
              write_row<acc_t>(keys + i * cap, cnt, out_idx + t * topk, out_val + t * topk);
            } else {
              const int64_t r = slot[n] * tbmax + i;
              std::copy(keys + i * cap, keys + i * cap + cnt, slot_keys.begin() + r * topk);
              slot_count[r] = cnt;
            }
          }
        }
        if (nan) saw_nan.store(true, std::memory_order_relaxed);
      });
      if (nslots == 0) return;

      // Merge the segments of each split block.
      std::vector<std::vector<int64_t>> block_items(plan.block_nseg.size());
      for (int64_t n = 0; n < nitems; ++n) {
        if (slot[n] >= 0) block_items[plan.items[n].block].push_back(n);
      }
      std::vector<int64_t> merge_blocks;
      for (size_t b = 0; b < block_items.size(); ++b) {
        if (!block_items[b].empty()) merge_blocks.push_back(static_cast<int64_t>(b));
      }
      at::parallel_for(0, static_cast<int64_t>(merge_blocks.size()), 1, [&](int64_t b0, int64_t b1) {
        std::vector<Key> all;
        for (int64_t mb = b0; mb < b1; ++mb) {
          const auto& items = block_items[merge_blocks[mb]];
          const Item& first = plan.items[items[0]];
          for (int64_t i = 0; i < first.tb; ++i) {
            all.clear();
            for (int64_t n : items) {
              const int64_t r = slot[n] * tbmax + i;
              all.insert(all.end(), slot_keys.begin() + r * topk, slot_keys.begin() + r * topk + slot_count[r]);
            }
            const int64_t cnt = std::min<int64_t>(topk, static_cast<int64_t>(all.size()));
            if (cnt < static_cast<int64_t>(all.size())) {
              std::nth_element(all.begin(), all.begin() + (cnt - 1), all.end(), RanksBefore<acc_t>());
            }
            std::sort(all.begin(), all.begin() + cnt, RanksBefore<acc_t>());
            const int64_t t = first.t0 + i;
            write_row<acc_t>(all.data(), cnt, out_idx + t * topk, out_val + t * topk);
          }
        }
      });
    });
  });
  TORCH_CHECK_VALUE(!saw_nan.load(), "indexer_topk: NaN in the indexer scores (check q, k and w)");
  return {indices, scores};
}

// ---------------------------------------------------------------------------------------------
// indexer_logits_bwd
// ---------------------------------------------------------------------------------------------
//
// With d[t,j,s] = q[t,j] . k[s] and P[t,j,s] = grad[t,s] * w[t,j] * (d > 0) on visible keys (0 on
// masked ones):  dq[t,j] = sum_s P[t,j,s] k[s],  dk[s] = sum_{t,j} P[t,j,s] q[t,j],
// dw[t,j] = sum_s grad[t,s] relu(d[t,j,s]). Computed in fp32 (fp64) with GEMMs on blocks:
// pass 1 owns query blocks (dq, dw), pass 2 owns key blocks (dk) and recomputes d, so every output
// row is summed by one thread in a fixed order: deterministic, no atomics.

constexpr int64_t kBwdRowsPerBlock = 256;
constexpr int64_t kBwdKeys = 512;

// P (in place over D = q_rows . k_chunk^T) for the queries [t0, t0 + tb) and keys [c0, c1); adds
// sum_s grad * relu(d) to dw_rows when it is not null (8 interleaved partial sums, a fixed order).
template <typename acc_t>
void make_p(acc_t* D, const acc_t* grad, const acc_t* w, const int32_t* ks, const int32_t* ke, int64_t S, int64_t HI,
            int64_t t0, int64_t tb, int64_t c0, int64_t c1, acc_t* dw_rows) {
  const int64_t n = c1 - c0;
  for (int64_t r = 0; r < tb * HI; ++r) {
    const int64_t t = t0 + r / HI;
    const int64_t a = std::clamp<int64_t>(ks[t] - c0, 0, n), b = std::clamp<int64_t>(ke[t] - c0, a, n);
    acc_t* d = D + r * n;
    const acc_t* g = grad + t * S + c0;
    const acc_t wr = w[t0 * HI + r];
    if (dw_rows) {
      acc_t part[8] = {};
      int64_t s = a;
      for (; s + 8 <= b; s += 8) {
        for (int l = 0; l < 8; ++l) part[l] += g[s + l] * (d[s + l] < 0 ? acc_t(0) : d[s + l]);
      }
      for (; s < b; ++s) part[0] += g[s] * (d[s] < 0 ? acc_t(0) : d[s]);
      acc_t dw = 0;
      for (int l = 0; l < 8; ++l) dw += part[l];
      dw_rows[r] += dw;
    }
    std::fill(d, d + a, acc_t(0));
    for (int64_t s = a; s < b; ++s) d[s] = d[s] > 0 ? g[s] * wr : acc_t(0);
    std::fill(d + b, d + n, acc_t(0));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> indexer_logits_bwd_cpu(const at::Tensor& grad, const at::Tensor& q,
                                                                      const at::Tensor& k, const at::Tensor& w,
                                                                      const at::Tensor& ks, const at::Tensor& ke) {
  check_inputs(q, k, w, ks, ke);
  GLM5_CHECK_SAME_DEVICE(grad, q);
  GLM5_CHECK_NDIM(grad, 2);
  GLM5_CHECK_FLOAT(grad);
  const int64_t T = q.size(0), HI = q.size(1), DI = q.size(2), S = k.size(0);
  TORCH_CHECK(grad.size(0) == T && grad.size(1) == S, "grad must have shape (T, S) = (", T, ", ", S, "), got ",
              grad.sizes());
  const auto acc = acc_type(q);
  const at::Tensor Q = q.to(acc).contiguous().view({T * HI, DI});
  const at::Tensor K = k.to(acc).contiguous();
  const at::Tensor W = w.to(acc).contiguous();
  const at::Tensor G = grad.to(acc).contiguous();
  const at::Tensor ksc = ks.contiguous(), kec = ke.contiguous();
  at::Tensor dQ = at::zeros_like(Q), dK = at::zeros_like(K), dW = at::zeros_like(W);

  if (T > 0 && S > 0 && HI > 0) {
    const int32_t* ksp = ksc.data_ptr<int32_t>();
    const int32_t* kep = kec.data_ptr<int32_t>();
    const int64_t tb = std::clamp<int64_t>(kBwdRowsPerBlock / HI, 1, kMaxQueriesPerBlock);
    const int64_t nblocks = ceil_div(T, tb);
    std::vector<int64_t> blo(nblocks, 0), bhi(nblocks, 0);  // union of the visible ranges per query block
    for (int64_t b = 0; b < nblocks; ++b) {
      int64_t l = std::numeric_limits<int64_t>::max(), h = 0;
      for (int64_t t = b * tb; t < std::min(T, (b + 1) * tb); ++t) {
        if (ksp[t] < kep[t]) l = std::min<int64_t>(l, ksp[t]), h = std::max<int64_t>(h, kep[t]);
      }
      if (h > 0) blo[b] = l, bhi[b] = h;
    }
    AT_DISPATCH_FLOATING_TYPES(acc, "indexer_logits_bwd_cpu", [&] {
      const scalar_t* g = G.data_ptr<scalar_t>();
      const scalar_t* wp = W.data_ptr<scalar_t>();
      scalar_t* dwp = dW.data_ptr<scalar_t>();
      // Pass 1: dq and dw, one query block per item.
      parallel_items(nblocks, [&](const auto& next) {
        for (int64_t b = next(); b >= 0; b = next()) {
          if (bhi[b] == 0) continue;
          const int64_t t0 = b * tb, n_t = std::min(T, t0 + tb) - t0;
          const at::Tensor Qb = Q.narrow(0, t0 * HI, n_t * HI);
          at::Tensor dQb = dQ.narrow(0, t0 * HI, n_t * HI);
          for (int64_t c0 = blo[b]; c0 < bhi[b]; c0 += kBwdKeys) {
            const int64_t c1 = std::min(c0 + kBwdKeys, bhi[b]);
            const at::Tensor Kc = K.narrow(0, c0, c1 - c0);
            at::Tensor P = at::mm(Qb, Kc.t());
            make_p(P.data_ptr<scalar_t>(), g, wp, ksp, kep, S, HI, t0, n_t, c0, c1, dwp + t0 * HI);
            dQb.addmm_(P, Kc);
          }
        }
      });
      // Pass 2: dk, one key block per item, query blocks in order.
      parallel_items(ceil_div(S, kBwdKeys), [&](const auto& next) {
        for (int64_t kb = next(); kb >= 0; kb = next()) {
          const int64_t c0 = kb * kBwdKeys, c1 = std::min(S, c0 + kBwdKeys);
          const at::Tensor Kc = K.narrow(0, c0, c1 - c0);
          at::Tensor dKc = dK.narrow(0, c0, c1 - c0);
          for (int64_t b = 0; b < nblocks; ++b) {
            if (bhi[b] <= c0 || blo[b] >= c1) continue;
            const int64_t t0 = b * tb, n_t = std::min(T, t0 + tb) - t0;
            const at::Tensor Qb = Q.narrow(0, t0 * HI, n_t * HI);
            at::Tensor P = at::mm(Qb, Kc.t());
            make_p<scalar_t>(P.data_ptr<scalar_t>(), g, wp, ksp, kep, S, HI, t0, n_t, c0, c1, nullptr);
            dKc.addmm_(P.t(), Qb);
          }
        }
      });
    });
  }
  return {dQ.view({T, HI, DI}).to(q.scalar_type()), dK.to(k.scalar_type()), dW.to(w.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(glm5, CPU, m) {
  m.impl("indexer_logits", &indexer_logits_cpu);
  m.impl("indexer_logits_bwd", &indexer_logits_bwd_cpu);
  m.impl("indexer_topk", &indexer_topk_cpu);
}
