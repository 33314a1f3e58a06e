// Indexer training loss of DeepSeek Sparse Attention (the DeepSeek-V3.2 recipe), CPU kernels.
//
// indexer_kl_loss_fwd -> per-query KL(p_t || softmax(I_t)) [T], over the key set of query t:
//   dense (indices None): every visible key ks[t] <= s < ke[t];
//   sparse: the slots of indices[t] holding a visible key (-1 and invisible keys are dropped; a key
//   repeated in two slots counts twice, as in the reference).
//   p_t[s] = sum_h exp(sm_scale * q[t,h] . kv[s] - lse[t,h]) over the set, divided by
//   max(sum, tiny) (the main attention's head-summed probabilities, recomputed from its saved lse);
//   I_t[s] = sum_j w[t,j] * relu(q_idx[t,j] . k_idx[s]) (the lightning indexer's logits).
//   KL = sum_{s: p > 0} p (log p - log_softmax(I)). An empty set, or an all-zero p (lse = +inf on
//   every head: the main attention saw nothing), gives 0.
// indexer_kl_loss_bwd -> (dq_idx, dk_idx, dw): dI = grad[t] * (mass * softmax(I) - p) on the set
//   (mass = sum p: 1, or 0 for an all-zero p), then through the ReLU-weighted head sum. q, kv and
//   lse are the detached target: no gradient.
// Specification: glm5/ops/reference.py, indexer_kl_loss.
//
// Layout of the work:
// - Every input is converted once to acc_t (fp32; fp64 when the indexer inputs are fp64) and all
//   arithmetic, GEMMs included (at::mm on fp32 = MKL sgemm), runs in acc_t.
// - Queries go in blocks. Dense: per key chunk, one [nb*H, D] x [D, chunk] GEMM for the target and
//   one [nb*HI, DI] x [DI, chunk] GEMM for the indexer; the block keeps two rows per query (p and I)
//   over the block's key span: O(block * S) scratch, never [T, S] or [S, S, H]. Sparse: per query,
//   the selected rows of kv and k_idx are gathered and multiplied the same way.
// - dk_idx is a reduction over queries. Blocks are dealt round-robin to a fixed number of groups
//   (a function of the shapes only); each group accumulates into its own [S, DI] partial, in block
//   order, and the partials are summed in group order. Every GEMM runs single-threaded inside its
//   worker. Results are therefore bitwise independent of the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "glm5/checks.h"
#include "glm5/indexer_loss_checks.h"

// MKL (inside libtorch_cpu) lets a thread pin its own BLAS calls to one thread; absent elsewhere.
// (The C entry point: the lower-case mkl_set_num_threads_local symbol is the Fortran one, by pointer.)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace {

constexpr int64_t kBlockQ = 16;           // queries per block (dense: GEMM rows = kBlockQ * H)
constexpr int64_t kMaxBlockRows = 1024;   // ... capped at this many GEMM rows for large H
constexpr int64_t kChunk = 256;           // keys per dense GEMM chunk
constexpr int64_t kMaxGroups = 16;        // dk_idx partial buffers, at most
constexpr int64_t kPartialBytes = int64_t(256) << 20;  // ... and at most this much memory for them

// Each worker's GEMMs run single-threaded: the parallelism is ours, and MKL threading inside a call
// that happens to run outside a parallel region would tie the rounding to the thread count.
struct SerialBlasGuard {
  int prev = 0;
  SerialBlasGuard() {
    if (MKL_Set_Num_Threads_Local) prev = MKL_Set_Num_Threads_Local(1);
  }
  ~SerialBlasGuard() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev);
  }
  SerialBlasGuard(const SerialBlasGuard&) = delete;
  SerialBlasGuard& operator=(const SerialBlasGuard&) = delete;
};

// ---- element-wise math ------------------------------------------------------------------------
// Everything here is branch-free (integer blends, quiet comparisons), so the loops that call it
// vectorise (AVX2) even without -fno-trapping-math: a float `c ? a : b` whose operands need
// computing would become a branch.

template <typename acc_t>
inline acc_t select(bool c, acc_t a, acc_t b) {
  using I = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;
  const I m = -static_cast<I>(c);
  return std::bit_cast<acc_t>((std::bit_cast<I>(a) & m) | (std::bit_cast<I>(b) & ~m));
}

// exp for float: Cephes' polynomial on |r| <= ln2/2 after x = n ln2 + r, with 2^n applied in two
// halves so subnormal results come out right. Max error 1 ulp against exp in double (measured over
// [-110, 90]); exactly 0 below -103.97 (where expf rounds to 0), +inf above 88.72, NaN stays NaN.
inline float exp_acc(float x) {
  constexpr float kHi = 88.72283935546875f, kLo = -103.97208404541015625f;
  const bool below = std::isless(x, kLo), above = std::isgreater(x, kHi);
  const float xc = select(below, kLo, select(above, kHi, x));
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float z = std::fma(xc, 1.44269504088896341f, kMagic);
  const float n = z - kMagic;
  float r = std::fma(n, -0.693359375f, xc);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p * r, r, r) + 1.0f;
  const int32_t ni = std::bit_cast<int32_t>(z) - std::bit_cast<int32_t>(kMagic);  // n in [-150, 128]
  const int32_t n1 = ni >> 1, n2 = ni - n1;
  const float y = p * std::bit_cast<float>((n1 + 127) << 23) * std::bit_cast<float>((n2 + 127) << 23);
  return select(below, 0.0f, select(above, std::numeric_limits<float>::infinity(), y));
}

// log for float x > 0 (subnormals included): Cephes' logf. Max error 0.8 ulp (measured); callers
// mask x <= 0 themselves.
inline float log_acc(float x) {
  const bool sub = std::isless(x, std::numeric_limits<float>::min());
  x = select(sub, x * 33554432.0f, x);  // 2^25
  const int32_t bits = std::bit_cast<int32_t>(x);
  const int32_t e0 = ((bits >> 23) & 0xff) - 126 - (sub ? 25 : 0);  // x = m 2^e0, m in [0.5, 1)
  float m = std::bit_cast<float>((bits & 0x007fffff) | 0x3f000000);
  const bool small = std::isless(m, 0.707106781186547524f);
  const float fe = static_cast<float>(e0 - (small ? 1 : 0));
  m = select(small, m + m, m) - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = std::fma(y, m, -1.1514610310e-1f);
  y = std::fma(y, m, 1.1676998740e-1f);
  y = std::fma(y, m, -1.2420140846e-1f);
  y = std::fma(y, m, 1.4249322787e-1f);
  y = std::fma(y, m, -1.6668057665e-1f);
  y = std::fma(y, m, 2.0000714765e-1f);
  y = std::fma(y, m, -2.4999993993e-1f);
  y = std::fma(y, m, 3.3333331174e-1f);
  y = y * m * z;
  y = std::fma(fe, -2.12194440e-4f, y);
  y = std::fma(-0.5f, z, y);
  return std::fma(fe, 0.693359375f, m + y);
}

// fp64 (gradcheck) favours accuracy over speed.
inline double exp_acc(double x) { return std::exp(x); }
inline double log_acc(double x) { return std::log(x); }

template <typename acc_t>
inline acc_t relu(acc_t x) {
  return select(std::isless(x, acc_t(0)), acc_t(0), x);  // NaN stays NaN, like torch.relu
}

// Sums and maxima in a fixed lane order (vectorised; a plain float reduction would stay scalar).
constexpr int kLanes = 16;

template <typename acc_t>
acc_t sum_lanes(const acc_t* x, int64_t n) {
  acc_t acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[k + l];
  for (int l = 0; k < n; ++k, ++l) acc[l] += x[k];
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

template <typename acc_t>
acc_t max_lanes(const acc_t* x, int64_t n) {
  acc_t acc[kLanes];
  std::fill(acc, acc + kLanes, -std::numeric_limits<acc_t>::infinity());
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] = std::max(acc[l], x[k + l]);
  for (int l = 0; k < n; ++k, ++l) acc[l] = std::max(acc[l], x[k]);
  return *std::max_element(acc, acc + kLanes);
}

// ---- one query's key set ------------------------------------------------------------------------

// P[k] = sum_h exp(sm * s[h, k] - lse[h]) for k < n (s: H rows of stride ld). A head with lse = +inf
// saw no key and contributes exp(-inf) = 0: it is skipped.
template <typename acc_t>
void target_row(acc_t* P, const acc_t* s, int64_t ld, int64_t n, const acc_t* lse, int64_t H, acc_t sm) {
  bool first = true;
  for (int64_t h = 0; h < H; ++h) {
    const acc_t l = lse[h];
    if (l == std::numeric_limits<acc_t>::infinity()) continue;
    const acc_t* x = s + h * ld;
    if (first) {
      for (int64_t k = 0; k < n; ++k) P[k] = exp_acc(std::fma(sm, x[k], -l));
      first = false;
    } else {
      for (int64_t k = 0; k < n; ++k) P[k] += exp_acc(std::fma(sm, x[k], -l));
    }
  }
  if (first) std::fill(P, P + n, acc_t(0));
}

// I[k] = sum_j w[j] * relu(s[j, k]) for k < n (s: HI rows of stride ld).
template <typename acc_t>
void logits_row(acc_t* I, const acc_t* s, int64_t ld, int64_t n, const acc_t* w, int64_t HI) {
  std::fill(I, I + n, acc_t(0));
  for (int64_t j = 0; j < HI; ++j) {
    const acc_t wj = w[j];
    const acc_t* x = s + j * ld;
    for (int64_t k = 0; k < n; ++k) I[k] += wj * relu(x[k]);
  }
}

template <typename acc_t>
struct RowStats {
  acc_t norm;   // max(sum P, tiny): the reference's normaliser, p = P / norm
  acc_t mass;   // sum p: 1, or less for a (sub)normal-underflowed target, 0 for an all-zero one
  acc_t lse_i;  // logsumexp of I over the set
};

template <typename acc_t>
RowStats<acc_t> row_stats(const acc_t* P, const acc_t* I, int64_t n, acc_t* tmp) {
  const acc_t z = sum_lanes(P, n);
  const acc_t norm = std::max(z, std::numeric_limits<acc_t>::min());
  const acc_t m = max_lanes(I, n);
  for (int64_t k = 0; k < n; ++k) tmp[k] = exp_acc(I[k] - m);
  const acc_t lse_i = m + std::log(sum_lanes(tmp, n));
  return {norm, z / norm, lse_i};
}

// sum_{k: p > 0} p (log p - I + lse_i), p = P / norm.
template <typename acc_t>
acc_t kl_row(const acc_t* P, const acc_t* I, int64_t n, const RowStats<acc_t>& st, acc_t* tmp) {
  for (int64_t k = 0; k < n; ++k) {
    const acc_t p = P[k] / st.norm;
    tmp[k] = select(std::isgreater(p, acc_t(0)), p * (log_acc(p) - I[k] + st.lse_i), acc_t(0));
  }
  return sum_lanes(tmp, n);
}

// I[k] <- g * (mass * softmax(I)[k] - p[k]): dLoss/dI, in place.
template <typename acc_t>
void grad_row(const acc_t* P, acc_t* I, int64_t n, const RowStats<acc_t>& st, acc_t g) {
  const acc_t gm = g * st.mass;
  for (int64_t k = 0; k < n; ++k) I[k] = gm * exp_acc(I[k] - st.lse_i) - g * (P[k] / st.norm);
}

// Through the ReLU-weighted head sum, in place on s (HI rows of stride ld, n columns):
// s[j, k] <- dI[k] * w[j] * 1[s[j, k] > 0], and dw[j] += sum_k dI[k] * relu(s[j, k]).
template <typename acc_t>
void relu_grad_rows(acc_t* s, int64_t ld, int64_t n, const acc_t* dI, const acc_t* w, acc_t* dw, int64_t HI,
                    acc_t* tmp) {
  for (int64_t j = 0; j < HI; ++j) {
    acc_t* x = s + j * ld;
    const acc_t wj = w[j];
    for (int64_t k = 0; k < n; ++k) {
      const acc_t v = x[k];
      tmp[k] = dI[k] * relu(v);
      x[k] = select(std::isgreater(v, acc_t(0)), dI[k] * wj, acc_t(0));
    }
    dw[j] += sum_lanes(tmp, n);
  }
}

// ---- the problem ----------------------------------------------------------------------------------

template <typename acc_t>
struct Problem {
  // acc_t, contiguous. q_idx2 [T*HI, DI], k_idx [S, DI], w [T, HI], q2 [T*H, D], kv [S, D], lse [T, H].
  at::Tensor q_idx2, k_idx, w, q2, kv, lse;
  at::Tensor ks_t, ke_t, indices_t;  // int32, contiguous (indices_t undefined in dense mode)
  const int32_t* ks = nullptr;
  const int32_t* ke = nullptr;
  const int32_t* indices = nullptr;  // [T, K] (may be null when K = 0)
  bool sparse = false;               // indices given (even with K = 0: every set is then empty)
  int64_t T = 0, S = 0, HI = 0, DI = 0, H = 0, D = 0, K = 0;
  acc_t sm_scale = 0;
  int64_t block_q = kBlockQ;
  int64_t num_blocks() const { return (T + block_q - 1) / block_q; }
};

// Backward outputs in acc_t: dq [T*HI, DI] and dw [T, HI] (rows owned by their query's block), and
// the dk partial of the calling group.
template <typename acc_t>
struct Grads {
  const acc_t* grad = nullptr;  // [T]
  at::Tensor dq2;               // [T*HI, DI], zeroed
  acc_t* dw = nullptr;          // [T, HI], zeroed
};

// Per-worker scratch, grown on demand.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> P, I, tmp;
  std::vector<int32_t> keys;
  at::Tensor buf_main, buf_idx, buf_kv, buf_k, buf_dk;

  static void grow(std::vector<acc_t>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  }
  static at::Tensor view(at::Tensor& buf, int64_t rows, int64_t cols) {
    if (!buf.defined() || buf.numel() < rows * cols) {
      buf = at::empty({rows * cols}, at::dtype(c10::CppTypeToScalarType<acc_t>::value));
    }
    return buf.narrow(0, 0, rows * cols).view({rows, cols});
  }
};

// Dense mode, queries [t0, t1): the loss (loss != null) or the gradients of the block.
template <typename acc_t>
void dense_block(const Problem<acc_t>& pb, int64_t t0, int64_t t1, Scratch<acc_t>& sc, acc_t* loss,
                 const Grads<acc_t>* gr, at::Tensor* dk_part) {
  const int64_t nb = t1 - t0, H = pb.H, HI = pb.HI;
  int64_t lo = pb.S, hi = 0;
  for (int64_t t = t0; t < t1; ++t) {
    if (pb.ks[t] < pb.ke[t]) lo = std::min<int64_t>(lo, pb.ks[t]), hi = std::max<int64_t>(hi, pb.ke[t]);
  }
  if (loss) std::fill(loss + t0, loss + t1, acc_t(0));
  if (lo >= hi) return;  // no query of the block sees a key
  const int64_t span = hi - lo;
  Scratch<acc_t>::grow(sc.P, nb * span);
  Scratch<acc_t>::grow(sc.I, nb * span);
  Scratch<acc_t>::grow(sc.tmp, std::max(span, kChunk));
  acc_t* P = sc.P.data();
  acc_t* I = sc.I.data();
  // Visible columns of query i in the chunk [c0, c0 + cn): [r0, r1) (empty when r0 >= r1).
  auto visible = [&](int64_t i, int64_t c0, int64_t cn) {
    return std::pair<int64_t, int64_t>(std::max<int64_t>(pb.ks[t0 + i], c0), std::min<int64_t>(pb.ke[t0 + i], c0 + cn));
  };
  auto chunk_seen = [&](int64_t c0, int64_t cn) {
    for (int64_t i = 0; i < nb; ++i) {
      const auto [r0, r1] = visible(i, c0, cn);
      if (r0 < r1) return true;
    }
    return false;
  };
  const at::Tensor q_b = pb.q2.narrow(0, t0 * H, nb * H);
  const at::Tensor qi_b = pb.q_idx2.narrow(0, t0 * HI, nb * HI);

  // Pass 1: the rows p~ (target, unnormalised) and I (indexer logits) over each query's visible keys.
  for (int64_t c0 = lo; c0 < hi; c0 += kChunk) {
    const int64_t cn = std::min(kChunk, hi - c0);
    if (!chunk_seen(c0, cn)) continue;  // a gap between the block's documents
    at::Tensor s_main = Scratch<acc_t>::view(sc.buf_main, nb * H, cn);
    at::mm_out(s_main, q_b, pb.kv.narrow(0, c0, cn).t());
    at::Tensor s_idx = Scratch<acc_t>::view(sc.buf_idx, nb * HI, cn);
    at::mm_out(s_idx, qi_b, pb.k_idx.narrow(0, c0, cn).t());
    const acc_t* sm = s_main.data_ptr<acc_t>();
    const acc_t* si = s_idx.data_ptr<acc_t>();
    const acc_t* lse = pb.lse.template data_ptr<acc_t>();
    const acc_t* w = pb.w.template data_ptr<acc_t>();
    for (int64_t i = 0; i < nb; ++i) {
      const auto [r0, r1] = visible(i, c0, cn);
      if (r0 >= r1) continue;
      const int64_t t = t0 + i;
      target_row(P + i * span + (r0 - lo), sm + i * H * cn + (r0 - c0), cn, r1 - r0, lse + t * H, H, pb.sm_scale);
      logits_row(I + i * span + (r0 - lo), si + i * HI * cn + (r0 - c0), cn, r1 - r0, w + t * HI, HI);
    }
  }

  // Per query: the loss, or dI written over the I row.
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t t = t0 + i, n = pb.ke[t] - pb.ks[t];
    if (n <= 0) continue;
    const acc_t* Pi = P + i * span + (pb.ks[t] - lo);
    acc_t* Ii = I + i * span + (pb.ks[t] - lo);
    const RowStats<acc_t> st = row_stats(Pi, Ii, n, sc.tmp.data());
    if (loss) {
      loss[t] = kl_row(Pi, Ii, n, st, sc.tmp.data());
    } else {
      grad_row(Pi, Ii, n, st, gr->grad[t]);
    }
  }
  if (loss) return;

  // Pass 2 (backward): per chunk, G = dI * w * 1[q_idx . k_idx > 0] ([nb*HI, cn], over the recomputed
  // indexer scores), dw += sum dI * relu(q.k), dq += G @ k_idx[chunk], dk[chunk] += G^T @ q_idx[block].
  at::Tensor dq_b = gr->dq2.narrow(0, t0 * HI, nb * HI);
  const acc_t* w = pb.w.template data_ptr<acc_t>();
  for (int64_t c0 = lo; c0 < hi; c0 += kChunk) {
    const int64_t cn = std::min(kChunk, hi - c0);
    if (!chunk_seen(c0, cn)) continue;
    const at::Tensor k_c = pb.k_idx.narrow(0, c0, cn);
    at::Tensor g = Scratch<acc_t>::view(sc.buf_idx, nb * HI, cn);
    at::mm_out(g, qi_b, k_c.t());
    acc_t* gp = g.data_ptr<acc_t>();
    for (int64_t i = 0; i < nb; ++i) {
      const int64_t t = t0 + i;
      acc_t* rows = gp + i * HI * cn;
      const auto [r0, r1] = visible(i, c0, cn);
      if (r0 >= r1) {
        std::fill(rows, rows + HI * cn, acc_t(0));
        continue;
      }
      for (int64_t j = 0; j < HI; ++j) {  // columns this query does not see carry no gradient
        std::fill(rows + j * cn, rows + j * cn + (r0 - c0), acc_t(0));
        std::fill(rows + j * cn + (r1 - c0), rows + (j + 1) * cn, acc_t(0));
      }
      relu_grad_rows(rows + (r0 - c0), cn, r1 - r0, I + i * span + (r0 - lo), w + t * HI, gr->dw + t * HI, HI,
                     sc.tmp.data());
    }
    dq_b.addmm_(g, k_c);
    dk_part->narrow(0, c0, cn).addmm_(g.t(), qi_b);
  }
}

// Sparse mode, queries [t0, t1): per query, gather the selected rows and do the same.
template <typename acc_t>
void sparse_block(const Problem<acc_t>& pb, int64_t t0, int64_t t1, Scratch<acc_t>& sc, acc_t* loss,
                  const Grads<acc_t>* gr, at::Tensor* dk_part) {
  const int64_t H = pb.H, HI = pb.HI, D = pb.D, DI = pb.DI, K = pb.K;
  sc.keys.resize(std::max<int64_t>(K, 1));
  Scratch<acc_t>::grow(sc.P, K);
  Scratch<acc_t>::grow(sc.I, K);
  Scratch<acc_t>::grow(sc.tmp, K);
  const acc_t* kv = pb.kv.template data_ptr<acc_t>();
  const acc_t* k_idx = pb.k_idx.template data_ptr<acc_t>();
  const acc_t* lse = pb.lse.template data_ptr<acc_t>();
  const acc_t* w = pb.w.template data_ptr<acc_t>();
  for (int64_t t = t0; t < t1; ++t) {
    if (loss) loss[t] = 0;
    // The key set: slots holding a visible key (ks >= 0, so -1 is never visible), in slot order.
    int64_t n = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int32_t s = pb.indices[t * K + k];
      if (s >= pb.ks[t] && s < pb.ke[t]) sc.keys[n++] = s;
    }
    if (n == 0) continue;
    at::Tensor kv_g = Scratch<acc_t>::view(sc.buf_kv, n, D);
    at::Tensor k_g = Scratch<acc_t>::view(sc.buf_k, n, DI);
    acc_t* kvp = kv_g.data_ptr<acc_t>();
    acc_t* kp = k_g.data_ptr<acc_t>();
    for (int64_t k = 0; k < n; ++k) {
      std::copy_n(kv + int64_t(sc.keys[k]) * D, D, kvp + k * D);
      std::copy_n(k_idx + int64_t(sc.keys[k]) * DI, DI, kp + k * DI);
    }
    at::Tensor s_main = Scratch<acc_t>::view(sc.buf_main, H, n);
    at::mm_out(s_main, pb.q2.narrow(0, t * H, H), kv_g.t());
    const at::Tensor qi_t = pb.q_idx2.narrow(0, t * HI, HI);
    at::Tensor s_idx = Scratch<acc_t>::view(sc.buf_idx, HI, n);
    at::mm_out(s_idx, qi_t, k_g.t());
    acc_t* P = sc.P.data();
    acc_t* I = sc.I.data();
    target_row(P, s_main.data_ptr<acc_t>(), n, n, lse + t * H, H, pb.sm_scale);
    logits_row(I, s_idx.data_ptr<acc_t>(), n, n, w + t * HI, HI);
    const RowStats<acc_t> st = row_stats(P, I, n, sc.tmp.data());
    if (loss) {
      loss[t] = kl_row(P, I, n, st, sc.tmp.data());
      continue;
    }
    grad_row(P, I, n, st, gr->grad[t]);
    relu_grad_rows(s_idx.data_ptr<acc_t>(), n, n, I, w + t * HI, gr->dw + t * HI, HI, sc.tmp.data());
    at::Tensor dq_t = gr->dq2.narrow(0, t * HI, HI);
    at::mm_out(dq_t, s_idx, k_g);  // [HI, n] x [n, DI]
    at::Tensor dk_g = Scratch<acc_t>::view(sc.buf_dk, n, DI);
    at::mm_out(dk_g, s_idx.t(), qi_t);  // [n, HI] x [HI, DI]
    const acc_t* dkg = dk_g.data_ptr<acc_t>();
    acc_t* dk = dk_part->data_ptr<acc_t>();
    for (int64_t k = 0; k < n; ++k) {  // scatter-add in slot order
      acc_t* row = dk + int64_t(sc.keys[k]) * DI;
      const acc_t* src = dkg + k * DI;
      for (int64_t d = 0; d < DI; ++d) row[d] += src[d];
    }
  }
}

template <typename acc_t>
void run_block(const Problem<acc_t>& pb, int64_t b, Scratch<acc_t>& sc, acc_t* loss, const Grads<acc_t>* gr,
               at::Tensor* dk_part) {
  const int64_t t0 = b * pb.block_q, t1 = std::min(pb.T, t0 + pb.block_q);
  if (pb.sparse) {
    sparse_block(pb, t0, t1, sc, loss, gr, dk_part);
  } else {
    dense_block(pb, t0, t1, sc, loss, gr, dk_part);
  }
}

template <typename acc_t>
void loss_forward(const Problem<acc_t>& pb, acc_t* loss) {
  at::parallel_for(0, pb.num_blocks(), 1, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    SerialBlasGuard serial_blas;
    Scratch<acc_t> sc;
    for (int64_t b = b0; b < b1; ++b) run_block<acc_t>(pb, b, sc, loss, nullptr, nullptr);
  });
}

// The number of dk_idx partials: from the shapes only (never the thread count), so the summation
// order, and with it every bit of dk_idx, is the same on any machine.
int64_t num_groups(int64_t num_blocks, int64_t S, int64_t DI, int64_t elem_bytes) {
  const int64_t per_group = std::max<int64_t>(1, S * DI * elem_bytes);
  return std::max<int64_t>(1, std::min({num_blocks, kMaxGroups, kPartialBytes / per_group}));
}

template <typename acc_t>
void loss_backward(const Problem<acc_t>& pb, const Grads<acc_t>& gr, at::Tensor& dk) {
  const int64_t nblocks = pb.num_blocks();
  const int64_t G = num_groups(nblocks, pb.S, pb.DI, sizeof(acc_t));
  at::Tensor parts = G == 1 ? dk.unsqueeze(0) : at::zeros({G, pb.S, pb.DI}, dk.options());
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    SerialBlasGuard serial_blas;
    Scratch<acc_t> sc;
    for (int64_t g = g0; g < g1; ++g) {
      at::Tensor part = parts.select(0, g);
      for (int64_t b = g; b < nblocks; b += G) run_block<acc_t>(pb, b, sc, nullptr, &gr, &part);
    }
  });
  if (G == 1) return;
  const acc_t* pp = parts.data_ptr<acc_t>();
  acc_t* out = dk.data_ptr<acc_t>();
  const int64_t n = pb.S * pb.DI;
  at::parallel_for(0, n, 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t g = 0; g < G; ++g) {  // group order: fixed
      const acc_t* src = pp + g * n;
      for (int64_t e = e0; e < e1; ++e) out[e] += src[e];
    }
  });
}

// ---- host wrappers ------------------------------------------------------------------------------

struct Shapes {
  int64_t T, S, HI, DI, H, D, K;
  at::ScalarType acc;
};

// Checks every argument (each error names it; glm5/indexer_loss_checks.h, shared with the CUDA wrapper)
// and returns the sizes.
Shapes check_inputs(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w, const at::Tensor& q,
                    const at::Tensor& kv, const at::Tensor& lse, const at::Tensor& ks, const at::Tensor& ke,
                    double sm_scale, const std::optional<at::Tensor>& indices) {
  const auto d = glm5::indexer_loss_checks::inputs(q_idx, k_idx, w, q, kv, lse, ks, ke, sm_scale, indices, at::kCPU);
  return {d.T, d.S, d.HI, d.DI, d.H, d.D, d.K, q_idx.scalar_type() == at::kDouble ? at::kDouble : at::kFloat};
}

// Value checks on the (contiguous) index tensors: 0 <= ks[t] <= ke[t] <= S, indices in [-1, S).
void check_ranges(const at::Tensor& ks, const at::Tensor& ke, const at::Tensor* indices, int64_t T, int64_t S) {
  const int32_t* pks = ks.data_ptr<int32_t>();
  const int32_t* pke = ke.data_ptr<int32_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK_VALUE(pks[t] >= 0 && pks[t] <= S, "ks[", t, "] = ", pks[t], " is outside [0, S=", S, "]");
    TORCH_CHECK_VALUE(pke[t] >= pks[t] && pke[t] <= S, "ke[", t, "] = ", pke[t], " must lie in [ks[", t,
                      "] = ", pks[t], ", S=", S, "]");
  }
  if (indices && indices->numel()) {
    const int32_t* p = indices->data_ptr<int32_t>();
    const auto [mn, mx] = std::minmax_element(p, p + indices->numel());
    TORCH_CHECK_INDEX(*mn >= -1 && *mx < S, "indices out of range: values must be -1 (empty) or in [0, ", S,
                      "), got min ", *mn, ", max ", *mx);
  }
}

template <typename acc_t>
Problem<acc_t> make_problem(const Shapes& sh, const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w,
                            const at::Tensor& q, const at::Tensor& kv, const at::Tensor& lse, const at::Tensor& ks,
                            const at::Tensor& ke, double sm_scale, const std::optional<at::Tensor>& indices) {
  Problem<acc_t> pb;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  auto prep = [&](const at::Tensor& x) { return x.to(acc).contiguous(); };
  pb.T = sh.T, pb.S = sh.S, pb.HI = sh.HI, pb.DI = sh.DI, pb.H = sh.H, pb.D = sh.D, pb.K = sh.K;
  pb.q_idx2 = prep(q_idx).view({sh.T * sh.HI, sh.DI});
  pb.k_idx = prep(k_idx);
  pb.w = prep(w);
  pb.q2 = prep(q).view({sh.T * sh.H, sh.D});
  pb.kv = prep(kv);
  pb.lse = prep(lse);
  pb.ks_t = ks.contiguous();
  pb.ke_t = ke.contiguous();
  pb.ks = pb.ks_t.template data_ptr<int32_t>();
  pb.ke = pb.ke_t.template data_ptr<int32_t>();
  if (indices.has_value()) {
    pb.sparse = true;
    pb.indices_t = indices->contiguous();
    pb.indices = pb.indices_t.template data_ptr<int32_t>();
  }
  check_ranges(pb.ks_t, pb.ke_t, indices.has_value() ? &pb.indices_t : nullptr, sh.T, sh.S);
  pb.sm_scale = static_cast<acc_t>(sm_scale);
  const int64_t widest = std::max<int64_t>({sh.H, sh.HI, 1});
  pb.block_q = indices.has_value() ? kBlockQ : std::clamp<int64_t>(kMaxBlockRows / widest, 1, kBlockQ);
  return pb;
}

at::Tensor indexer_kl_loss_fwd_cpu(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w,
                                   const at::Tensor& q, const at::Tensor& kv, const at::Tensor& lse,
                                   const at::Tensor& ks, const at::Tensor& ke, double sm_scale,
                                   const std::optional<at::Tensor>& indices) {
  const Shapes sh = check_inputs(q_idx, k_idx, w, q, kv, lse, ks, ke, sm_scale, indices);
  at::Tensor loss = at::empty({sh.T}, q_idx.options().dtype(sh.acc));
  AT_DISPATCH_FLOATING_TYPES(sh.acc, "indexer_kl_loss_fwd", [&] {
    const Problem<scalar_t> pb = make_problem<scalar_t>(sh, q_idx, k_idx, w, q, kv, lse, ks, ke, sm_scale, indices);
    loss_forward<scalar_t>(pb, loss.data_ptr<scalar_t>());
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> indexer_kl_loss_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w, const at::Tensor& q,
    const at::Tensor& kv, const at::Tensor& lse, const at::Tensor& ks, const at::Tensor& ke, double sm_scale,
    const std::optional<at::Tensor>& indices) {
  const Shapes sh = check_inputs(q_idx, k_idx, w, q, kv, lse, ks, ke, sm_scale, indices);
  glm5::indexer_loss_checks::grad_arg(grad, q_idx, sh.T, at::kCPU);
  const auto opts = q_idx.options().dtype(sh.acc);
  at::Tensor dq = at::zeros({sh.T * sh.HI, sh.DI}, opts);
  at::Tensor dk = at::zeros({sh.S, sh.DI}, opts);
  at::Tensor dw = at::zeros({sh.T, sh.HI}, opts);
  AT_DISPATCH_FLOATING_TYPES(sh.acc, "indexer_kl_loss_bwd", [&] {
    const Problem<scalar_t> pb = make_problem<scalar_t>(sh, q_idx, k_idx, w, q, kv, lse, ks, ke, sm_scale, indices);
    const at::Tensor g = grad.to(sh.acc).contiguous();
    Grads<scalar_t> gr;
    gr.grad = g.data_ptr<scalar_t>();
    gr.dq2 = dq;
    gr.dw = dw.data_ptr<scalar_t>();
    loss_backward<scalar_t>(pb, gr, dk);
  });
  return {at::empty_like(q_idx).copy_(dq.view({sh.T, sh.HI, sh.DI})), at::empty_like(k_idx).copy_(dk),
          at::empty_like(w).copy_(dw)};
}

}  // namespace

TORCH_LIBRARY_IMPL(glm5, CPU, m) {
  m.impl("indexer_kl_loss_fwd", &indexer_kl_loss_fwd_cpu);
  m.impl("indexer_kl_loss_bwd", &indexer_kl_loss_bwd_cpu);
}
