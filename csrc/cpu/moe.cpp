// Mixture of experts on the CPU: routing, token permutation, the weighted combine, grouped GEMMs.
//
// Semantics: glm5/ops/reference.py (moe_route, moe_permute, moe_unpermute, grouped_gemm,
// grouped_gemm_wgrad). Design:
// - moe_route: the sigmoid scores come from at::sigmoid on the whole [N, E] tensor, the very call the
//   reference makes, so the selection sees bitwise the same scores; per token a partial sort under
//   the strict total order (biased score descending, expert index ascending) picks the groups and the
//   experts, so the choice is exact and independent of threads.
// - moe_permute: two serial O(N*k) integer passes (counts, then each slot's row: a counting sort,
//   stable in token order) and a parallel row copy; padding rows are zeroed.
// - moe_unpermute(_bwd): parallel over tokens; each token owns its output row (forward) or its k
//   source rows (backward; rows are unique), so there is no cross-thread reduction; sums run in slot
//   order (forward) or in a fixed 16-lane order (dot products), so results do not depend on threads.
// - grouped_gemm(_wgrad): one at::mm_out per expert into its row block of the output (MKL for fp32
//   and fp64, oneDNN for bf16, both accumulating in fp32; fp16, which has no fast CPU GEMM in ATen,
//   is converted to fp32 per expert). With many small experts (few rows each) the experts run in
//   parallel, one thread each; with big ones every GEMM uses all threads. The choice depends only on
//   the shapes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <glm5/checks.h>
#include <glm5/moe_checks.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

namespace {

namespace moe_checks = glm5::moe_checks;

constexpr double kRouteNormEps = 1e-20;  // reference.ROUTE_NORM_EPS (transformers' glm_moe_dsa)

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

// Argument and value checks shared with the CUDA wrappers: glm5/moe_checks.h.

std::vector<int64_t> check_offsets(const at::Tensor& offsets, const at::Tensor& like, int64_t E, int64_t M) {
  moe_checks::offsets_shape(offsets, like, E);
  const at::Tensor oc = offsets.contiguous();
  const int64_t* p = oc.data_ptr<int64_t>();
  moe_checks::offsets_values(p, E, M);
  return std::vector<int64_t>(p, p + E + 1);
}

// ---------------------------------------------------------------------------------------------
// moe_route
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
void route_kernel(const acc_t* scores, const acc_t* bias, int64_t N, int64_t E, int64_t topk, int64_t n_group,
                  int64_t topk_group, bool norm, acc_t scale, int32_t* out_idx, acc_t* out_w,
                  std::atomic<bool>& saw_nan) {
  const int64_t gs = E / n_group;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(E, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> choice(E), gscore(n_group);
    std::vector<int32_t> cand(E), groups(n_group);
    for (int64_t n = begin; n < end; ++n) {
      const acc_t* s = scores + n * E;
      bool nan = false;
      for (int64_t e = 0; e < E; ++e) {
        choice[e] = bias ? s[e] + bias[e] : s[e];
        nan |= std::isnan(choice[e]);
      }
      int32_t* idx = out_idx + n * topk;
      acc_t* w = out_w + n * topk;
      if (nan) {
        saw_nan.store(true, std::memory_order_relaxed);
        std::fill(idx, idx + topk, 0);
        std::fill(w, w + topk, acc_t(0));
        continue;
      }
      // Strict total order: larger value first, then the smaller index.
      auto by_expert = [&](int32_t a, int32_t b) { return choice[a] > choice[b] || (choice[a] == choice[b] && a < b); };
      int64_t n_cand = 0;
      if (n_group > 1) {
        for (int64_t g = 0; g < n_group; ++g) {  // group score: sum of its top-2 biased scores
          acc_t m1 = -INFINITY, m2 = -INFINITY;
          for (int64_t e = g * gs; e < (g + 1) * gs; ++e) {
            const acc_t v = choice[e];
            if (v > m1) {
              m2 = m1;
              m1 = v;
            } else if (v > m2) {
              m2 = v;
            }
          }
          gscore[g] = gs >= 2 ? m1 + m2 : m1;
        }
        std::iota(groups.begin(), groups.end(), 0);
        auto by_group = [&](int32_t a, int32_t b) { return gscore[a] > gscore[b] || (gscore[a] == gscore[b] && a < b); };
        std::partial_sort(groups.begin(), groups.begin() + topk_group, groups.end(), by_group);
        for (int64_t i = 0; i < topk_group; ++i) {
          for (int64_t e = groups[i] * gs; e < (groups[i] + 1) * gs; ++e) cand[n_cand++] = static_cast<int32_t>(e);
        }
      } else {
        std::iota(cand.begin(), cand.end(), 0);
        n_cand = E;
      }
      std::partial_sort(cand.begin(), cand.begin() + topk, cand.begin() + n_cand, by_expert);
      acc_t sum = 0;
      for (int64_t j = 0; j < topk; ++j) {
        idx[j] = cand[j];
        w[j] = s[cand[j]];
        sum += w[j];
      }
      const acc_t den = sum + static_cast<acc_t>(kRouteNormEps);
      for (int64_t j = 0; j < topk; ++j) w[j] = (norm ? w[j] / den : w[j]) * scale;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> moe_route_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                                 int64_t topk, int64_t n_group, int64_t topk_group,
                                                 bool norm_topk_prob, double routed_scaling_factor) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls below record no graph
  GLM5_CHECK_DEVICE_TYPE(logits, at::kCPU);
  moe_checks::route_args(logits, bias, topk, n_group, topk_group);
  const int64_t N = logits.size(0), E = logits.size(1);

  const at::ScalarType acc = acc_type(logits.scalar_type());
  const at::Tensor scores = at::sigmoid(logits.to(acc)).contiguous();  // as the reference: bitwise equal
  const at::Tensor b = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  at::Tensor topk_idx = at::empty({N, topk}, logits.options().dtype(at::kInt));
  at::Tensor topk_w = at::empty({N, topk}, logits.options().dtype(acc));
  std::atomic<bool> saw_nan{false};
  AT_DISPATCH_FLOATING_TYPES(acc, "moe_route", [&] {
    route_kernel<scalar_t>(scores.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr, N, E, topk,
                           n_group, topk_group, norm_topk_prob, static_cast<scalar_t>(routed_scaling_factor),
                           topk_idx.data_ptr<int32_t>(), topk_w.data_ptr<scalar_t>(), saw_nan);
  });
  TORCH_CHECK_VALUE(!saw_nan.load(), "moe_route: NaN in logits or bias");
  return {topk_idx, topk_w};
}

// ---------------------------------------------------------------------------------------------
// moe_permute
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_cpu(const at::Tensor& x, const at::Tensor& topk_idx,
                                                               int64_t num_experts, int64_t alignment) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls below record no graph
  GLM5_CHECK_DEVICE_TYPE(x, at::kCPU);
  GLM5_CHECK_NDIM(x, 2);
  GLM5_CHECK_FLOAT(x);
  GLM5_CHECK_SAME_DEVICE(topk_idx, x);
  GLM5_CHECK_NDIM(topk_idx, 2);
  GLM5_CHECK_DTYPE(topk_idx, at::kInt);
  GLM5_CHECK_SIZE(topk_idx, 0, x.size(0));
  TORCH_CHECK_VALUE(num_experts >= 1, "num_experts must be positive, got ", num_experts);
  TORCH_CHECK_VALUE(alignment >= 1, "alignment must be positive, got ", alignment);
  const int64_t N = x.size(0), D = x.size(1), k = topk_idx.size(1), E = num_experts, A = alignment;
  const at::Tensor xc = x.contiguous(), idx = topk_idx.contiguous();
  moe_checks::expert_idx_values(idx, E);

  const int64_t capacity = N * k + E * (A - 1);
  at::Tensor x_sorted = at::empty({capacity, D}, x.options());
  at::Tensor row_map = at::empty({N, k}, idx.options());
  at::Tensor offsets = at::empty({E + 1}, idx.options().dtype(at::kLong));
  const int32_t* ip = idx.data_ptr<int32_t>();
  int32_t* rm = row_map.data_ptr<int32_t>();
  int64_t* off = offsets.data_ptr<int64_t>();

  // Counting sort: counts, aligned segment starts, then each slot's row in (token, slot) order.
  std::vector<int64_t> count(E, 0), cursor(E);
  for (int64_t i = 0; i < N * k; ++i) {
    if (ip[i] >= 0) ++count[ip[i]];
  }
  off[0] = 0;
  for (int64_t e = 0; e < E; ++e) off[e + 1] = off[e] + align_up(count[e], A);
  std::copy(off, off + E, cursor.begin());
  for (int64_t i = 0; i < N * k; ++i) {
    rm[i] = ip[i] >= 0 ? glm5::checked_int32(cursor[ip[i]]++, "moe_permute row") : -1;
  }

  const int64_t row_bytes = D * x.element_size();
  const char* src = static_cast<const char*>(xc.data_ptr());
  char* dst = static_cast<char*>(x_sorted.data_ptr());
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, k * row_bytes));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t j = 0; j < k; ++j) {
        const int32_t r = rm[n * k + j];
        if (r >= 0) std::memcpy(dst + r * row_bytes, src + n * row_bytes, row_bytes);
      }
    }
  });
  // Zero the padding: the tail of every expert's segment, and everything after offsets[E].
  at::parallel_for(0, E + 1, 1, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t from = e < E ? off[e] + count[e] : off[E];
      const int64_t to = e < E ? off[e + 1] : capacity;
      if (to > from) std::memset(dst + from * row_bytes, 0, (to - from) * row_bytes);
    }
  });
  return {x_sorted, row_map, offsets};
}

// ---------------------------------------------------------------------------------------------
// moe_unpermute and its backward
// ---------------------------------------------------------------------------------------------

// sum_d a[d] * b[d] in a fixed order (16 lanes, then the lanes in order, then the tail).
template <typename scalar_t, typename acc_t>
acc_t dot_fixed_order(const acc_t* a, const scalar_t* b, int64_t D) {
  constexpr int kLanes = 16;
  acc_t lane[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) lane[l] += a[d + l] * static_cast<acc_t>(b[d + l]);
  }
  acc_t s = 0;
  for (int l = 0; l < kLanes; ++l) s += lane[l];
  for (; d < D; ++d) s += a[d] * static_cast<acc_t>(b[d]);
  return s;
}

at::Tensor moe_unpermute_cpu(const at::Tensor& y_sorted, const at::Tensor& row_map, const at::Tensor& topk_w) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls below record no graph
  moe_checks::unpermute_args(y_sorted, row_map, topk_w, at::kCPU);
  const int64_t M = y_sorted.size(0), D = y_sorted.size(1), N = row_map.size(0), k = row_map.size(1);
  const at::Tensor yc = y_sorted.contiguous(), rmc = row_map.contiguous();
  moe_checks::row_map_values(rmc, M);
  const at::ScalarType acc = acc_type(y_sorted.scalar_type());
  const at::Tensor wc = topk_w.to(acc).contiguous();
  at::Tensor out = at::empty({N, D}, y_sorted.options());
  const int32_t* rm = rmc.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y_sorted.scalar_type(), "moe_unpermute", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* y = yc.data_ptr<scalar_t>();
    const acc_t* w = wc.data_ptr<acc_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, k * D / 16));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(D);
      for (int64_t n = begin; n < end; ++n) {
        std::fill(buf.begin(), buf.end(), acc_t(0));
        for (int64_t j = 0; j < k; ++j) {  // slot order: deterministic
          const int32_t r = rm[n * k + j];
          if (r < 0) continue;
          const acc_t wj = w[n * k + j];
          const scalar_t* yr = y + r * D;
          for (int64_t d = 0; d < D; ++d) buf[d] += wj * static_cast<acc_t>(yr[d]);
        }
        scalar_t* on = o + n * D;
        for (int64_t d = 0; d < D; ++d) on[d] = static_cast<scalar_t>(buf[d]);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_bwd_cpu(const at::Tensor& grad, const at::Tensor& y_sorted,
                                                         const at::Tensor& row_map, const at::Tensor& topk_w) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls below record no graph
  moe_checks::unpermute_args(y_sorted, row_map, topk_w, at::kCPU);
  GLM5_CHECK_SAME_DEVICE(grad, y_sorted);
  GLM5_CHECK_NDIM(grad, 2);
  GLM5_CHECK_SAME_DTYPE(grad, y_sorted);
  GLM5_CHECK_SIZE(grad, 0, row_map.size(0));
  GLM5_CHECK_SIZE(grad, 1, y_sorted.size(1));
  const int64_t M = y_sorted.size(0), D = y_sorted.size(1), N = row_map.size(0), k = row_map.size(1);
  const at::Tensor gc = grad.contiguous(), yc = y_sorted.contiguous(), rmc = row_map.contiguous();
  const std::vector<uint8_t> used = moe_checks::row_map_values(rmc, M);
  const at::ScalarType acc = acc_type(y_sorted.scalar_type());
  const at::Tensor wc = topk_w.to(acc).contiguous();
  at::Tensor dy = at::empty({M, D}, y_sorted.options());
  at::Tensor dw = at::empty({N, k}, wc.options());
  const int32_t* rm = rmc.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y_sorted.scalar_type(), "moe_unpermute_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = gc.data_ptr<scalar_t>();
    const scalar_t* y = yc.data_ptr<scalar_t>();
    const acc_t* w = wc.data_ptr<acc_t>();
    scalar_t* dyp = dy.data_ptr<scalar_t>();
    acc_t* dwp = dw.data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, k * D / 16));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> gn(D);
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t d = 0; d < D; ++d) gn[d] = static_cast<acc_t>(g[n * D + d]);
        for (int64_t j = 0; j < k; ++j) {
          const int32_t r = rm[n * k + j];
          if (r < 0) {
            dwp[n * k + j] = 0;
            continue;
          }
          dwp[n * k + j] = dot_fixed_order(gn.data(), y + r * D, D);
          const acc_t wj = w[n * k + j];
          scalar_t* dr = dyp + r * D;
          for (int64_t d = 0; d < D; ++d) dr[d] = static_cast<scalar_t>(wj * gn[d]);
        }
      }
    });
    // Rows no slot points at (padding, dropped capacity) get no gradient.
    at::parallel_for(0, M, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (!used[r]) std::fill(dyp + r * D, dyp + (r + 1) * D, scalar_t(0));
      }
    });
  });
  return {dy, dw.to(topk_w.scalar_type())};
}

// ---------------------------------------------------------------------------------------------
// Grouped GEMMs
// ---------------------------------------------------------------------------------------------

// Schedule of the per-expert GEMMs. An expert with at least kBigExpertRows rows gets a GEMM of its
// own on all threads (MKL / oneDNN parallelise it well); the smaller ones are split into one
// contiguous run of experts per thread, of about equal rows, and the runs execute in parallel with
// single-threaded GEMMs (no barrier per tiny GEMM, and no weight packing split across threads).
// GLM5_MOE_GEMM_SCHEDULE=serial|experts forces one of the two for every expert (for benchmarks).
constexpr int64_t kBigExpertRows = 256;

enum class Schedule { kAuto, kSerial, kExperts };

Schedule schedule_override() {
  const char* v = std::getenv("GLM5_MOE_GEMM_SCHEDULE");
  if (v == nullptr || std::strcmp(v, "auto") == 0 || v[0] == '\0') return Schedule::kAuto;
  if (std::strcmp(v, "serial") == 0) return Schedule::kSerial;
  if (std::strcmp(v, "experts") == 0) return Schedule::kExperts;
  TORCH_CHECK_VALUE(false, "GLM5_MOE_GEMM_SCHEDULE must be auto, serial or experts, got '", v, "'");
}

// out = a @ b for 2-D (possibly transposed) views; fp16 goes through fp32 (ATen's fp16 CPU GEMM is
// a naive loop). `out` is a contiguous row block of the result.
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  if (out.scalar_type() == at::kHalf) {
    out.copy_(at::mm(a.to(at::kFloat), b.to(at::kFloat)));
  } else {
    at::mm_out(out, a, b);
  }
}

// Runs task(e) once for every expert (rows = off[e+1] - off[e], possibly 0), on the schedule above.
template <typename F>
void for_each_expert(const std::vector<int64_t>& off, const F& task) {
  const int64_t E = static_cast<int64_t>(off.size()) - 1;
  const int64_t threads = at::get_num_threads();
  const Schedule mode = schedule_override();
  std::vector<int64_t> small;
  int64_t small_work = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = off[e + 1] - off[e];
    const bool alone = threads == 1 || mode == Schedule::kSerial || (mode == Schedule::kAuto && rows >= kBigExpertRows);
    if (alone) {
      task(e);
    } else {
      small.push_back(e);
      small_work += std::max<int64_t>(rows, 1);
    }
  }
  if (small.empty()) return;
  // Cut the small experts into `threads` runs of about small_work / threads rows each.
  std::vector<size_t> cut{0};
  int64_t acc = 0;
  for (size_t i = 0; i < small.size(); ++i) {
    acc += std::max<int64_t>(off[small[i] + 1] - off[small[i]], 1);
    if (static_cast<int64_t>(cut.size()) < threads && acc * threads >= small_work * static_cast<int64_t>(cut.size())) {
      cut.push_back(i + 1);
    }
  }
  if (cut.back() != small.size()) cut.push_back(small.size());
  at::parallel_for(0, static_cast<int64_t>(cut.size()) - 1, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // dispatch TLS is per thread
    for (int64_t c = begin; c < end; ++c) {
      for (size_t i = cut[c]; i < cut[c + 1]; ++i) task(small[i]);
    }
  });
}

// w with every w[e] a contiguous matrix is used as is (no copy of the weights: w may also be a view
// whose experts overlap or repeat); anything else is made contiguous.
at::Tensor experts_contiguous(const at::Tensor& w) {
  const bool ok = (w.size(2) <= 1 || w.stride(2) == 1) && (w.size(1) <= 1 || w.stride(1) == w.size(2));
  return ok ? w : w.contiguous();
}

at::Tensor grouped_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets, bool trans_w) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls below record no graph
  GLM5_CHECK_DEVICE_TYPE(x, at::kCPU);
  GLM5_CHECK_NDIM(x, 2);
  GLM5_CHECK_FLOAT(x);
  GLM5_CHECK_SAME_DEVICE(w, x);
  GLM5_CHECK_NDIM(w, 3);
  GLM5_CHECK_SAME_DTYPE(w, x);
  const int64_t M = x.size(0), K = x.size(1), E = w.size(0);
  const int64_t wK = trans_w ? w.size(1) : w.size(2), Nout = trans_w ? w.size(2) : w.size(1);
  TORCH_CHECK(wK == K, "x.size(1)=", K, " must equal w's K=", wK, " (w shape ", w.sizes(), ", trans_w=", trans_w, ")");
  const std::vector<int64_t> off = check_offsets(offsets, x, E, M);
  const at::Tensor xc = x.contiguous(), wc = experts_contiguous(w);
  at::Tensor y = at::empty({M, Nout}, x.options());
  if (off[0] > 0) y.narrow(0, 0, off[0]).zero_();
  if (off[E] < M) y.narrow(0, off[E], M - off[E]).zero_();
  for_each_expert(off, [&](int64_t e) {
    const int64_t rows = off[e + 1] - off[e];
    if (rows == 0) return;
    const at::Tensor we = wc.select(0, e);
    mm_into(y.narrow(0, off[e], rows), xc.narrow(0, off[e], rows), trans_w ? we : we.t());
  });
  return y;
}

at::Tensor grouped_gemm_wgrad_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& offsets) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls below record no graph
  GLM5_CHECK_DEVICE_TYPE(dy, at::kCPU);
  GLM5_CHECK_NDIM(dy, 2);
  GLM5_CHECK_FLOAT(dy);
  GLM5_CHECK_SAME_DEVICE(x, dy);
  GLM5_CHECK_NDIM(x, 2);
  GLM5_CHECK_SAME_DTYPE(x, dy);
  GLM5_CHECK_SIZE(x, 0, dy.size(0));
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) >= 2, "offsets must be 1-D [E+1] with E >= 1, got shape ",
                    offsets.sizes());
  const int64_t M = dy.size(0), N = dy.size(1), K = x.size(1), E = offsets.size(0) - 1;
  const std::vector<int64_t> off = check_offsets(offsets, dy, E, M);
  const at::Tensor dyc = dy.contiguous(), xc = x.contiguous();
  at::Tensor dw = at::empty({E, N, K}, dy.options());
  for_each_expert(off, [&](int64_t e) {
    const int64_t rows = off[e + 1] - off[e];
    if (rows == 0) {
      dw.select(0, e).zero_();
      return;
    }
    mm_into(dw.select(0, e), dyc.narrow(0, off[e], rows).t(), xc.narrow(0, off[e], rows));
  });
  return dw;
}

}  // namespace

TORCH_LIBRARY_IMPL(glm5, CPU, m) {
  m.impl("moe_route", &moe_route_cpu);
  m.impl("moe_permute", &moe_permute_cpu);
  m.impl("moe_unpermute", &moe_unpermute_cpu);
  m.impl("moe_unpermute_bwd", &moe_unpermute_bwd_cpu);
  m.impl("grouped_gemm", &grouped_gemm_cpu);
  m.impl("grouped_gemm_wgrad", &grouped_gemm_wgrad_cpu);
}
