// Sparse MLA attention on the CPU (MQA / absorbed form, as FlashMLA's sparse kernels): forward and
// backward of `glm5::sparse_mla_fwd` / `glm5::sparse_mla_bwd`. Semantics: glm5/ops/reference.py.
//
// Every head of query t attends to the same gathered keys kv[indices[t, :]], so each query is a
// small dense attention. Per block of kKeyBlock valid keys, gathered into a per-thread buffer:
//   scores^T [keys, H] = Kg [keys, D] @ q_t^T [D, H]      (GEMM)
//   online softmax per head (running max and lse in fp32, running sum in fp64; all fp64 for fp64)
//   acc [H, d_v]      += P [H, keys] @ Kg[:, :d_v]         (GEMM)
// The GEMMs are oneDNN's batch-reduce micro-kernels (at::native::cpublas::brgemm): fp32 x fp32, and
// for bf16 inputs bf16 x bf16 -> fp32 with the right operand in VNNI layout (pairs along the
// reduction dim), which the gather writes directly. In the bf16 path the probabilities are rounded
// to bf16 before P @ V, as FlashMLA does. fp16, and bf16 where oneDNN's bf16 kernel is unavailable,
// convert to fp32 in the gather; fp64 (gradcheck) uses a plain loop GEMM. A partial key block is
// zero-padded to a multiple of kRowAlign rows, so only a handful of kernel shapes is ever generated
// (oneDNN caches them per thread). While one block's softmax runs, the next block's key rows are
// prefetched (they are random rows of kv, often not in any cache).
//
// Backward: per query, recompute P = exp(s - lse), dP = dO V^T, Delta = rowsum(dO * O),
// dS = P (dP - Delta), dq = scale dS K, and per-slot key gradients scale dS^T q + P^T dO (one GEMM)
// into a chunk buffer; then a counting sort by key sums each key's rows in increasing (t, slot)
// order, one thread per key: deterministic and independent of the thread count and of the chunking.
// Queries are processed in chunks so that buffer stays bounded (kBwdChunkBytes). The backward
// computes in fp32 for every non-fp64 dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "glm5/checks.h"
#include "glm5/sparse_mla_checks.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kKeyBlock = 128;  // keys per online-softmax block (multiple of kRowAlign)
constexpr int64_t kRowAlign = 32;   // a partial block is zero-padded to a multiple of this
constexpr int64_t kBwdChunkBytes = int64_t(64) << 20;  // backward per-chunk key-gradient buffer

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// Element-wise helpers (written so that -O3 -march=x86-64-v3 vectorises the loops that call them)
// ---------------------------------------------------------------------------------------------

// exp(x) in fp32: Cephes-style range reduction and degree-6 polynomial (relative error < 1e-7),
// exactly 0 below -87.3 (so exp(-inf) = 0). Branch-free, so loops over it vectorise (this needs
// -fno-trapping-math, which CMakeLists.txt sets, as PyTorch does for its own kernels).
inline float fast_exp(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.3f);
  const float shifted = xc * 1.44269504088896341f + 12582912.0f;  // + 1.5 * 2^23 rounds to an integer
  const float n = shifted - 12582912.0f;
  const int32_t ni = std::bit_cast<int32_t>(shifted) - 0x4B400000;
  float r = xc - n * 0.693359375f;  // xc - n * ln(2) in two steps
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float y = p * std::bit_cast<float>((ni + 127) << 23);
  return x < -87.3f ? 0.0f : y;
}
inline double fast_exp(double x) { return std::exp(x); }

// Round-to-nearest-even fp32 -> bf16 (NaN stays NaN), vectorisable unlike c10::BFloat16's constructor.
inline at::BFloat16 to_bf16(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return at::BFloat16(static_cast<uint16_t>(nan ? 0x7FC0u : rounded), at::BFloat16::from_bits());
}
template <typename T, typename F>
inline T convert(F f) {
  if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<F, float>) {
    return to_bf16(f);
  } else {
    return static_cast<T>(f);
  }
}

// Transposes a rows x cols block of 32-bit values: dst[c * ldd + r] = cvt(src[r * lds + c]), with
// cvt = identity (float, uint32) or fp32 -> bf16 rounding (Dst = at::BFloat16). Full 8 x 8 tiles
// go through AVX2 register shuffles; the rest, and other builds, through the scalar loop.
template <typename Src, typename Dst>
void transpose32(const Src* src, int64_t rows, int64_t cols, int64_t lds, Dst* dst, int64_t ldd) {
  static_assert(sizeof(Src) == 4 && (sizeof(Dst) == 4 || std::is_same_v<Dst, at::BFloat16>));
  int64_t r0 = 0;
#if defined(__AVX2__)
  for (; r0 + 8 <= rows; r0 += 8) {
    int64_t c0 = 0;
    for (; c0 + 8 <= cols; c0 += 8) {
      __m256 v[8];
      for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(src + (r0 + i) * lds + c0));
      const __m256 a0 = _mm256_unpacklo_ps(v[0], v[1]), a1 = _mm256_unpackhi_ps(v[0], v[1]);
      const __m256 a2 = _mm256_unpacklo_ps(v[2], v[3]), a3 = _mm256_unpackhi_ps(v[2], v[3]);
      const __m256 a4 = _mm256_unpacklo_ps(v[4], v[5]), a5 = _mm256_unpackhi_ps(v[4], v[5]);
      const __m256 a6 = _mm256_unpacklo_ps(v[6], v[7]), a7 = _mm256_unpackhi_ps(v[6], v[7]);
      const __m256 b0 = _mm256_shuffle_ps(a0, a2, 0x44), b1 = _mm256_shuffle_ps(a0, a2, 0xEE);
      const __m256 b2 = _mm256_shuffle_ps(a1, a3, 0x44), b3 = _mm256_shuffle_ps(a1, a3, 0xEE);
      const __m256 b4 = _mm256_shuffle_ps(a4, a6, 0x44), b5 = _mm256_shuffle_ps(a4, a6, 0xEE);
      const __m256 b6 = _mm256_shuffle_ps(a5, a7, 0x44), b7 = _mm256_shuffle_ps(a5, a7, 0xEE);
      v[0] = _mm256_permute2f128_ps(b0, b4, 0x20);
      v[1] = _mm256_permute2f128_ps(b1, b5, 0x20);
      v[2] = _mm256_permute2f128_ps(b2, b6, 0x20);
      v[3] = _mm256_permute2f128_ps(b3, b7, 0x20);
      v[4] = _mm256_permute2f128_ps(b0, b4, 0x31);
      v[5] = _mm256_permute2f128_ps(b1, b5, 0x31);
      v[6] = _mm256_permute2f128_ps(b2, b6, 0x31);
      v[7] = _mm256_permute2f128_ps(b3, b7, 0x31);
      for (int i = 0; i < 8; ++i) {  // v[i] is column c0 + i, rows r0 .. r0 + 7
        Dst* out = dst + (c0 + i) * ldd + r0;
        if constexpr (std::is_same_v<Dst, at::BFloat16>) {  // round to nearest even, NaN stays NaN
          const __m256i u = _mm256_castps_si256(v[i]);
          const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
          __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
          const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                                 _mm256_set1_epi32(0x7F800000));
          r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
          const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
        } else {
          _mm256_storeu_ps(reinterpret_cast<float*>(out), v[i]);
        }
      }
    }
    for (; c0 < cols; ++c0)
      for (int64_t r = r0; r < r0 + 8; ++r) dst[c0 * ldd + r] = convert<Dst>(src[r * lds + c0]);
  }
#endif
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = r0; r < rows; ++r) dst[c * ldd + r] = convert<Dst>(src[r * lds + c]);
}

// dst[c * ldd + r] = src[r * lds + c] for fp32 (AVX2 tiles) or fp64 (plain loop).
template <typename T>
void transpose_any(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  if constexpr (sizeof(T) == 4) {
    transpose32(src, rows, cols, lds, dst, ldd);
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
}

// Pulls the row of a key that will be gathered soon into the cache (rows are random accesses).
inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
}
constexpr int64_t kPrefetchAhead = 4;  // keys ahead in a gather loop

// The prefetch callback of softmax_block: row j of the next key block, if there is one.
template <typename T>
struct PrefetchNextBlock {
  const T* kv;
  const int32_t* keys;  // the next block's keys
  int64_t n, row_elems;
  void operator()(int64_t j) const {
    if (j < n) prefetch_row(kv + int64_t(keys[j]) * row_elems, row_elems * int64_t(sizeof(T)));
  }
};

// ---------------------------------------------------------------------------------------------
// GEMMs: C[M, N] (+)= A[M, K] @ B[K, N], row-major with leading dimensions in elements.
// ---------------------------------------------------------------------------------------------

void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}

// fp64 exists for gradcheck only: a plain loop with the unit-stride loop innermost.
void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
          int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < M; ++i) {
    double* c = C + i * ldc;
    if (!accumulate) std::fill(c, c + N, 0.0);
    for (int64_t k = 0; k < K; ++k) {
      const double a = A[i * lda + k];
      const double* b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// bf16 x bf16 -> fp32 with B in VNNI layout: B[k / 2][ldb][2] (K even).
void gemm_bf16_vnni(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, int64_t lda, const at::BFloat16* B,
                    int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/true);
}

// Whether oneDNN's bf16 VNNI micro-kernel runs on this CPU and torch build (avx512_core or AMX,
// oneDNN ukernels compiled in, mkldnn enabled) and reads B as [K/2][ldb][2] for a wide, irregular
// ldb like the kernels' (d_v): probed once on a small product with exact (small-integer) values.
bool bf16_brgemm_available() {
  if (!at::globalContext().userEnabledMkldnn()) return false;
  static const bool ok = [] {
    constexpr int64_t M = 3, N = 40, K = 6, ldb = 72;
    std::vector<at::BFloat16> a(M * K), b(K / 2 * ldb * 2, at::BFloat16(0.0f));
    std::vector<float> c(M * N, -1.0f), want(M * N, 0.0f);
    for (int64_t i = 0; i < M * K; ++i) a[i] = at::BFloat16(float(i % 7) - 3.0f);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n) {
        const float v = float((k * 5 + n * 3) % 11) - 5.0f;
        b[(k / 2 * ldb + n) * 2 + k % 2] = at::BFloat16(v);
        for (int64_t i = 0; i < M; ++i) want[i * N + n] += float(a[i * K + k]) * v;
      }
    try {
      gemm_bf16_vnni(M, N, K, a.data(), K, b.data(), ldb, c.data(), N, false);
      gemm_bf16_vnni(M, N, K, a.data(), K, b.data(), ldb, c.data(), N, true);  // c = 2 * want
      at::native::cpublas::brgemm_release(true);
    } catch (const std::exception&) {
      return false;
    }
    for (int64_t i = 0; i < M * N; ++i)
      if (c[i] != 2.0f * want[i]) return false;
    return true;
  }();
  return ok;
}

// ---------------------------------------------------------------------------------------------
// Shared pieces of the per-query loop
// ---------------------------------------------------------------------------------------------

using glm5::sparse_mla_checks::Dims;

// Copies the valid keys of one query row (slot order, duplicates kept) to keys; returns their count.
inline int64_t compact_keys(const int32_t* idx, int64_t K, int32_t* keys) {
  int64_t n = 0;
  for (int64_t k = 0; k < K; ++k) {
    if (idx[k] >= 0) keys[n++] = idx[k];
  }
  return n;
}

// One online-softmax step over a block of transposed scores st [nbp, H] (rows >= nb are padding).
// Updates the running max m (of the scaled scores) and sum l (kept in fp64: the backward recomputes
// P = exp(s - lse) from the lse it yields, so a 2048-term fp32 sum's error would reach the gradients),
// rescales acc [H, dv] by
// exp(m_old - m_new) unless this is the first block, and writes the probabilities transposed into
// p [H, nbp] (zeros in the padding columns). st is overwritten with the fp32 probabilities.
// prefetch(j) runs once per row j of the exp loop: the caller pulls the next block's keys into
// the cache there, so that their (random, often DRAM) reads overlap this arithmetic.
template <typename ct, typename pt, typename Prefetch>
void softmax_block(ct* st, int64_t nb, int64_t nbp, int64_t H, ct scale, ct* m, double* l, ct* tmp, pt* p,
                   ct* acc, int64_t dv, bool first, const Prefetch& prefetch) {
  constexpr ct kNegInf = -std::numeric_limits<ct>::infinity();
  for (int64_t h = 0; h < H; ++h) tmp[h] = kNegInf;
  for (int64_t j = 0; j < nb; ++j) {
    const ct* row = st + j * H;
    for (int64_t h = 0; h < H; ++h) tmp[h] = std::max(tmp[h], row[h] * scale);
  }
  for (int64_t h = 0; h < H; ++h) {  // tmp <- exp(m_old - m_new), m <- m_new
    const ct m_new = std::max(m[h], tmp[h]);
    tmp[h] = first ? ct(0) : fast_exp(m[h] - m_new);
    m[h] = m_new;
  }
  if (!first) {
    for (int64_t h = 0; h < H; ++h) {
      const ct a = tmp[h];
      l[h] *= double(a);
      if (a != ct(1)) {
        ct* r = acc + h * dv;
        for (int64_t d = 0; d < dv; ++d) r[d] *= a;
      }
    }
  }
  for (int64_t j = 0; j < nb; ++j) {
    prefetch(j);
    ct* row = st + j * H;
    for (int64_t h = 0; h < H; ++h) {
      row[h] = fast_exp(row[h] * scale - m[h]);
      l[h] += double(row[h]);
    }
  }
  if constexpr (std::is_same_v<ct, float>) {
    transpose32(st, nb, H, H, p, nbp);
  } else {
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < nb; ++j) p[h * nbp + j] = static_cast<pt>(st[j * H + h]);
  }
  for (int64_t h = 0; h < H; ++h) std::fill(p + h * nbp + nb, p + (h + 1) * nbp, pt(0));
}

// out[t] = acc / l (0 where the query has no key), lse[t] = m + log(l) (+inf where it has none).
template <typename scalar_t, typename ct>
void finalize_query(const ct* acc, const ct* m, const double* l, int64_t H, int64_t dv, bool empty, scalar_t* out,
                    ct* lse) {
  for (int64_t h = 0; h < H; ++h) {
    scalar_t* o = out + h * dv;
    if (empty) {
      std::fill(o, o + dv, scalar_t(0));
      lse[h] = std::numeric_limits<ct>::infinity();
      continue;
    }
    const ct inv = static_cast<ct>(1.0 / l[h]);
    const ct* a = acc + h * dv;
    for (int64_t d = 0; d < dv; ++d) o[d] = static_cast<scalar_t>(a[d] * inv);
    lse[h] = static_cast<ct>(double(m[h]) + std::log(l[h]));
  }
}

// ---------------------------------------------------------------------------------------------
// Forward, plain layouts: compute type ct = float (fp32, fp16, bf16 fallback) or double (fp64)
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename ct>
void fwd_plain(const scalar_t* q, const scalar_t* kv, const int32_t* indices, scalar_t* out, ct* lse, const Dims& dm,
               ct scale) {
  const int64_t H = dm.H, D = dm.D, K = dm.K, dv = dm.dv;
  at::parallel_for(0, dm.T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int32_t> keys(K);
    std::vector<ct> qt(D * H), kg(kKeyBlock * D), st(kKeyBlock * H), p(H * kKeyBlock), acc(H * dv);
    std::vector<ct> m(H), tmp(H);
    std::vector<double> l(H);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t nv = compact_keys(indices + t * K, K, keys.data());
      const scalar_t* qt_src = q + t * H * D;
      if constexpr (std::is_same_v<scalar_t, float>) {
        transpose32(qt_src, H, D, D, qt.data(), H);
      } else {
        for (int64_t h = 0; h < H; ++h)
          for (int64_t d = 0; d < D; ++d) qt[d * H + h] = static_cast<ct>(qt_src[h * D + d]);
      }
      std::fill(m.begin(), m.end(), -std::numeric_limits<ct>::infinity());
      std::fill(l.begin(), l.end(), 0.0);
      for (int64_t j0 = 0; j0 < nv; j0 += kKeyBlock) {
        const int64_t nb = std::min(kKeyBlock, nv - j0), nbp = round_up(nb, kRowAlign);
        for (int64_t j = 0; j < nbp; ++j) {
          ct* dst = kg.data() + j * D;
          if (j < nb) {
            if (j0 + j + kPrefetchAhead < nv)
              prefetch_row(kv + int64_t(keys[j0 + j + kPrefetchAhead]) * D, D * int64_t(sizeof(scalar_t)));
            const scalar_t* src = kv + int64_t(keys[j0 + j]) * D;
            for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<ct>(src[d]);
          } else {
            std::fill(dst, dst + D, ct(0));
          }
        }
        gemm(nbp, H, D, kg.data(), D, qt.data(), H, st.data(), H, false);
        const PrefetchNextBlock<scalar_t> next{kv, keys.data() + j0 + nb, std::min(kKeyBlock, nv - j0 - nb), D};
        softmax_block(st.data(), nb, nbp, H, scale, m.data(), l.data(), tmp.data(), p.data(), acc.data(), dv, j0 == 0,
                      next);
        gemm(H, dv, nbp, p.data(), nbp, kg.data(), D, acc.data(), dv, j0 > 0);
      }
      finalize_query<scalar_t, ct>(acc.data(), m.data(), l.data(), H, dv, nv == 0, out + t * H * dv, lse + t * H);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Forward, bf16 with oneDNN's bf16 micro-kernel (right operands in VNNI layout)
// ---------------------------------------------------------------------------------------------

void fwd_bf16_vnni(const at::BFloat16* q, const at::BFloat16* kv, const int32_t* indices, at::BFloat16* out,
                   float* lse, const Dims& dm, float scale) {
  const int64_t H = dm.H, D = dm.D, K = dm.K, dv = dm.dv;
  const int64_t Dp = round_up(D, 2);  // the reduction dim of q . k must be even in VNNI layout
  const auto* q16 = reinterpret_cast<const uint16_t*>(q);
  const auto* kv16 = reinterpret_cast<const uint16_t*>(kv);
  at::parallel_for(0, dm.T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int32_t> keys(K);
    std::vector<uint32_t> qv(Dp / 2 * H);                        // q_t^T in VNNI: [Dp/2][H][2]
    std::vector<uint16_t> kg(kKeyBlock * Dp), vv(kKeyBlock * dv);  // keys [nbp, Dp]; values [nbp/2][dv][2]
    std::vector<at::BFloat16> p(H * kKeyBlock);
    std::vector<float> st(kKeyBlock * H), acc(H * dv), m(H), tmp(H);
    std::vector<double> l(H);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t nv = compact_keys(indices + t * K, K, keys.data());
      if (D % 2 == 0) {  // q_t [H, D/2 pairs] -> [D/2, H]
        transpose32(reinterpret_cast<const uint32_t*>(q16 + t * H * D), H, D / 2, D / 2, qv.data(), H);
      } else {
        for (int64_t i = 0; i < Dp / 2; ++i) {
          for (int64_t h = 0; h < H; ++h) {
            const uint16_t* src = q16 + (t * H + h) * D;
            const uint32_t hi = 2 * i + 1 < D ? src[2 * i + 1] : 0;
            qv[i * H + h] = uint32_t(src[2 * i]) | (hi << 16);
          }
        }
      }
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0);
      for (int64_t j0 = 0; j0 < nv; j0 += kKeyBlock) {
        const int64_t nb = std::min(kKeyBlock, nv - j0), nbp = round_up(nb, kRowAlign);
        for (int64_t j = 0; j < nbp; ++j) {
          uint16_t* dst = kg.data() + j * Dp;
          if (j < nb) {
            if (j0 + j + kPrefetchAhead < nv)
              prefetch_row(kv16 + int64_t(keys[j0 + j + kPrefetchAhead]) * D, D * int64_t(sizeof(uint16_t)));
            std::memcpy(dst, kv16 + int64_t(keys[j0 + j]) * D, D * sizeof(uint16_t));
            if (Dp > D) dst[D] = 0;
          } else {
            std::fill(dst, dst + Dp, uint16_t(0));
          }
        }
        auto* vv32 = reinterpret_cast<uint32_t*>(vv.data());
        for (int64_t jp = 0; jp < nbp / 2; ++jp) {  // interleave the values of keys 2jp and 2jp+1
          const uint16_t* a = kg.data() + 2 * jp * Dp;
          const uint16_t* b = a + Dp;
          uint32_t* dst = vv32 + jp * dv;
          for (int64_t d = 0; d < dv; ++d) dst[d] = uint32_t(a[d]) | (uint32_t(b[d]) << 16);
        }
        gemm_bf16_vnni(nbp, H, Dp, reinterpret_cast<const at::BFloat16*>(kg.data()), Dp,
                       reinterpret_cast<const at::BFloat16*>(qv.data()), H, st.data(), H, false);
        const PrefetchNextBlock<uint16_t> next{kv16, keys.data() + j0 + nb, std::min(kKeyBlock, nv - j0 - nb), D};
        softmax_block(st.data(), nb, nbp, H, scale, m.data(), l.data(), tmp.data(), p.data(), acc.data(), dv, j0 == 0,
                      next);
        gemm_bf16_vnni(H, dv, nbp, p.data(), nbp, reinterpret_cast<const at::BFloat16*>(vv.data()), dv, acc.data(),
                       dv, j0 > 0);
      }
      finalize_query<at::BFloat16, float>(acc.data(), m.data(), l.data(), H, dv, nv == 0, out + t * H * dv,
                                          lse + t * H);
    }
    at::native::cpublas::brgemm_release(true);
  });
}

// ---------------------------------------------------------------------------------------------
// Backward: ct = float (fp32, bf16, fp16) or double (fp64)
// ---------------------------------------------------------------------------------------------

// Gradients of one query: dq[t] directly, the key-gradient rows of its valid slots (in slot
// order, padded to a multiple of kRowAlign) into rows [row0, ...) of the chunk buffer dk_rows.
// Per key block, one [nbp, 2H] buffer holds scale * dS^T (columns [0, H)) and P^T ([H, 2H)), so
// that dK and dV are one GEMM against [q_t; dO_t padded to D] [2H, D].
template <typename scalar_t, typename ct>
struct BwdQuery {
  const scalar_t *q, *kv, *dout, *out;
  const ct* lse;
  const Dims& dm;
  ct scale;
  // per-thread workspace
  std::vector<int32_t> keys;
  std::vector<ct> qdo, qt, dot, kg, sp, ds, dqa, delta;

  BwdQuery(const scalar_t* q_, const scalar_t* kv_, const scalar_t* dout_, const scalar_t* out_, const ct* lse_,
           const Dims& dm_, ct scale_)
      : q(q_), kv(kv_), dout(dout_), out(out_), lse(lse_), dm(dm_), scale(scale_), keys(dm_.K),
        qdo(2 * dm_.H * dm_.D), qt(dm_.D * dm_.H), dot(dm_.dv * dm_.H), kg(kKeyBlock * dm_.D),
        sp(kKeyBlock * 2 * dm_.H), ds(dm_.H * kKeyBlock), dqa(dm_.H * dm_.D), delta(dm_.H) {}

  void gather(int64_t j0, int64_t nb, int64_t nbp, int64_t nv) {
    const int64_t D = dm.D;
    for (int64_t j = 0; j < nbp; ++j) {
      ct* dst = kg.data() + j * D;
      if (j < nb) {
        if (j0 + j + kPrefetchAhead < nv)
          prefetch_row(kv + int64_t(keys[j0 + j + kPrefetchAhead]) * D, D * int64_t(sizeof(scalar_t)));
        const scalar_t* src = kv + int64_t(keys[j0 + j]) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<ct>(src[d]);
      } else {
        std::fill(dst, dst + D, ct(0));
      }
    }
  }

  void run(int64_t t, int64_t nv, const int32_t* idx_row, ct* dk_rows, scalar_t* dq_t) {
    const int64_t H = dm.H, D = dm.D, dv = dm.dv, H2 = 2 * dm.H;
    if (nv == 0) {  // no key: P = 0, so every gradient of this query is 0
      std::fill(dq_t, dq_t + H * D, scalar_t(0));
      return;
    }
    compact_keys(idx_row, dm.K, keys.data());
    const scalar_t* q_t = q + t * H * D;
    const scalar_t* do_t = dout + t * H * dv;
    const scalar_t* o_t = out + t * H * dv;
    const ct* lse_t = lse + t * H;
    for (int64_t h = 0; h < H; ++h) {  // qdo = [q_t; dO_t | 0], qt = q_t^T, dot = dO_t^T
      ct* qrow = qdo.data() + h * D;
      ct* grow = qdo.data() + (H + h) * D;
      for (int64_t d = 0; d < D; ++d) qrow[d] = static_cast<ct>(q_t[h * D + d]);
      ct dl = 0;
      for (int64_t d = 0; d < dv; ++d) {
        grow[d] = static_cast<ct>(do_t[h * dv + d]);
        dl += grow[d] * static_cast<ct>(o_t[h * dv + d]);
      }
      std::fill(grow + dv, grow + D, ct(0));
      delta[h] = dl;  // Delta = rowsum(dO * O) = sum_j P_j dP_j
    }
    transpose_any(qdo.data(), H, D, D, qt.data(), H);
    transpose_any(qdo.data() + H * D, H, dv, D, dot.data(), H);
    for (int64_t j0 = 0; j0 < nv; j0 += kKeyBlock) {
      const int64_t nb = std::min(kKeyBlock, nv - j0), nbp = round_up(nb, kRowAlign);
      gather(j0, nb, nbp, nv);
      gemm(nbp, H, D, kg.data(), D, qt.data(), H, sp.data() + H, H2, false);  // S^T
      gemm(nbp, H, dv, kg.data(), D, dot.data(), H, sp.data(), H2, false);    // dP^T = V dO^T
      const PrefetchNextBlock<scalar_t> next{kv, keys.data() + j0 + nb, std::min(kKeyBlock, nv - j0 - nb), D};
      for (int64_t j = 0; j < nbp; ++j) {  // [dP^T | S^T] <- [scale * dS^T | P^T]
        ct* g = sp.data() + j * H2;
        ct* s = g + H;
        if (j >= nb) {
          std::fill(g, g + H2, ct(0));
          continue;
        }
        next(j);
        for (int64_t h = 0; h < H; ++h) {
          const ct pr = fast_exp(s[h] * scale - lse_t[h]);
          s[h] = pr;
          g[h] = pr * (g[h] - delta[h]) * scale;
        }
      }
      transpose_any(sp.data(), nbp, H, H2, ds.data(), nbp);
      gemm(H, D, nbp, ds.data(), nbp, kg.data(), D, dqa.data(), D, j0 > 0);  // dq += scale dS K
      gemm(nbp, D, H2, sp.data(), H2, qdo.data(), D, dk_rows + j0 * D, D, false);  // dK|dV rows
    }
    for (int64_t i = 0; i < H * D; ++i) dq_t[i] = static_cast<scalar_t>(dqa[i]);
  }
};

// The budget of the backward's chunk buffer; GLM5_SPARSE_MLA_BWD_CHUNK_BYTES overrides it (tests
// shrink it to exercise many chunks on small inputs).
int64_t bwd_chunk_bytes() {
  const char* env = std::getenv("GLM5_SPARSE_MLA_BWD_CHUNK_BYTES");
  return env != nullptr ? std::max<int64_t>(std::atoll(env), 1) : kBwdChunkBytes;
}

template <typename scalar_t, typename ct>
void bwd_impl(const scalar_t* dout, const scalar_t* q, const scalar_t* kv, const int32_t* indices,
              const scalar_t* out, const ct* lse, scalar_t* dq, ct* dkv_acc, const Dims& dm, ct scale) {
  const int64_t T = dm.T, K = dm.K, D = dm.D, S = dm.S;
  // Queries per chunk: the chunk's key-gradient rows take at most kBwdChunkBytes (but at least one
  // query per thread). Sums per key run in global (t, slot) order, so the chunking (which depends
  // on the thread count) does not change any result bit.
  const int64_t rows_per_query = std::max<int64_t>(round_up(K, kRowAlign), 1);
  const int64_t by_memory = bwd_chunk_bytes() / (rows_per_query * D * int64_t(sizeof(ct)));
  const int64_t chunk = std::min(std::max<int64_t>(by_memory, at::get_num_threads()), std::max<int64_t>(T, 1));
  std::vector<int64_t> nv(chunk), row0(chunk + 1), key_start(S + 1), order;
  std::vector<ct> rows;
  for (int64_t c0 = 0; c0 < T; c0 += chunk) {
    const int64_t c1 = std::min(T, c0 + chunk), n = c1 - c0;
    row0[0] = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int32_t* idx = indices + (c0 + i) * K;
      int64_t c = 0;
      for (int64_t k = 0; k < K; ++k) c += idx[k] >= 0;
      nv[i] = c;
      row0[i + 1] = row0[i] + round_up(c, kRowAlign);
    }
    rows.resize(row0[n] * D);
    at::parallel_for(c0, c1, 1, [&](int64_t b, int64_t e) {
      BwdQuery<scalar_t, ct> w(q, kv, dout, out, lse, dm, scale);
      for (int64_t t = b; t < e; ++t)
        w.run(t, nv[t - c0], indices + t * K, rows.data() + row0[t - c0] * D, dq + t * dm.H * D);
    });
    // Counting sort of the chunk's valid slots by key, stable in (t, slot) order.
    std::fill(key_start.begin(), key_start.end(), 0);
    for (int64_t i = c0 * K; i < c1 * K; ++i)
      if (indices[i] >= 0) ++key_start[indices[i] + 1];
    for (int64_t s = 0; s < S; ++s) key_start[s + 1] += key_start[s];
    order.resize(key_start[S]);
    {
      std::vector<int64_t> fill(key_start.begin(), key_start.end() - 1);
      for (int64_t i = 0; i < n; ++i) {
        const int32_t* idx = indices + (c0 + i) * K;
        int64_t r = row0[i];
        for (int64_t k = 0; k < K; ++k)
          if (idx[k] >= 0) order[fill[idx[k]]++] = r++;
      }
    }
    at::parallel_for(0, S, 64, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        ct* acc = dkv_acc + s * D;
        for (int64_t i = key_start[s]; i < key_start[s + 1]; ++i) {
          const ct* r = rows.data() + order[i] * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += r[d];
        }
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Host wrappers
// ---------------------------------------------------------------------------------------------

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// indices must be -1 (empty slot) or a key in [0, S); anything else is a caller bug.
void check_indices(const at::Tensor& indices, int64_t S) {
  const int32_t* p = indices.data_ptr<int32_t>();
  const int64_t n = indices.numel();
  int32_t lo = -1, hi = -1;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, p[i]);
    hi = std::max(hi, p[i]);
  }
  TORCH_CHECK_INDEX(lo >= -1 && hi < S, "indices out of range: values must be -1 (empty) or in [0, ", S,
                    "), got min ", lo, ", max ", hi);
}

std::tuple<at::Tensor, at::Tensor> sparse_mla_fwd(const at::Tensor& q_in, const at::Tensor& kv_in,
                                                  const at::Tensor& indices_in, double sm_scale, int64_t d_v) {
  const Dims dm = glm5::sparse_mla_checks::fwd_args(q_in, kv_in, indices_in, sm_scale, d_v, at::kCPU);
  const at::Tensor q = q_in.contiguous(), kv = kv_in.contiguous(), indices = indices_in.contiguous();
  check_indices(indices, dm.S);
  at::Tensor out = at::empty({dm.T, dm.H, d_v}, q.options());
  at::Tensor lse = at::empty({dm.T, dm.H}, q.options().dtype(acc_dtype(q.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  const int32_t* idx = indices.data_ptr<int32_t>();
  if (q.scalar_type() == at::kBFloat16 && bf16_brgemm_available()) {
    fwd_bf16_vnni(q.data_ptr<at::BFloat16>(), kv.data_ptr<at::BFloat16>(), idx, out.data_ptr<at::BFloat16>(),
                  lse.data_ptr<float>(), dm, static_cast<float>(sm_scale));
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "sparse_mla_fwd", [&] {
    using ct = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    fwd_plain<scalar_t, ct>(q.data_ptr<scalar_t>(), kv.data_ptr<scalar_t>(), idx, out.data_ptr<scalar_t>(),
                            lse.data_ptr<ct>(), dm, static_cast<ct>(sm_scale));
  });
  return {out, lse};
}

// The backward on contiguous, checked inputs.
std::tuple<at::Tensor, at::Tensor> sparse_mla_bwd_contiguous(const at::Tensor& grad_out, const at::Tensor& q,
                                                             const at::Tensor& kv, const at::Tensor& indices,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             double sm_scale, const Dims& dm) {
  check_indices(indices, dm.S);
  at::Tensor dq = at::empty_like(q);
  const bool acc_is_out = q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble;
  at::Tensor dkv = at::zeros_like(kv);
  at::Tensor dkv_acc = acc_is_out ? dkv : at::zeros(kv.sizes(), kv.options().dtype(at::kFloat));
  if (dm.T == 0 || dm.H == 0 || dm.D == 0) return {dq, dkv};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "sparse_mla_bwd", [&] {
    using ct = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    bwd_impl<scalar_t, ct>(grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), kv.data_ptr<scalar_t>(),
                           indices.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<ct>(),
                           dq.data_ptr<scalar_t>(), dkv_acc.data_ptr<ct>(), dm, static_cast<ct>(sm_scale));
  });
  if (!acc_is_out) dkv.copy_(dkv_acc);
  return {dq, dkv};
}

std::tuple<at::Tensor, at::Tensor> sparse_mla_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                                  const at::Tensor& kv, const at::Tensor& indices,
                                                  const at::Tensor& out, const at::Tensor& lse, double sm_scale,
                                                  int64_t d_v) {
  const Dims dm = glm5::sparse_mla_checks::fwd_args(q, kv, indices, sm_scale, d_v, at::kCPU);
  glm5::sparse_mla_checks::bwd_args(grad_out, out, lse, q, dm, acc_dtype(q.scalar_type()));
  return sparse_mla_bwd_contiguous(grad_out.contiguous(), q.contiguous(), kv.contiguous(), indices.contiguous(),
                                   out.contiguous(), lse.contiguous(), sm_scale, dm);
}

}  // namespace

TORCH_LIBRARY_IMPL(glm5, CPU, m) {
  m.impl("sparse_mla_fwd", &sparse_mla_fwd);
  m.impl("sparse_mla_bwd", &sparse_mla_bwd);
}
