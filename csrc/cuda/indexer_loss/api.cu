// CUDA host wrappers of glm5::indexer_kl_loss_fwd / glm5::indexer_kl_loss_bwd (kernels: kernels.cuh).
// Same checks and error messages as the CPU path (glm5/indexer_loss_checks.h, shared with
// csrc/cpu/indexer_loss.cpp) for dtypes, ranks, shapes and devices, with one documented difference:
// the VALUES of ks, ke and indices are not validated on the host (that would sync the stream). The
// kernels clamp ks/ke to [0, S] (ks > ke: an empty set) and treat a slot outside the clamped visible
// range, out-of-range values included, like -1 (not in the set); nothing is read out of bounds.
// Accumulation in fp32 (fp64 for fp64 indexer inputs); q/kv in another dtype than the indexer's are
// converted to that accumulation dtype first (as on the CPU). Deterministic: no float atomics. With
// bf16/fp16 main attention inputs on Hopper, the target P of every query's set (sparse or dense) comes
// from one warpgroup-MMA pass per chunk of queries (probs_wgmma.cu) instead of being recomputed on CUDA
// cores in every pass of the tile kernels.
// Status: compiled for sm_90a, not yet verified on a GPU.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/cub.cuh>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "glm5/checks.h"
#include "glm5/indexer_loss_checks.h"
#include "../common/host_utils.h"
#include "kernels.cuh"
#include "probs_wgmma.h"

namespace {

using namespace glm5::cuda;
using glm5::indexer_loss_checks::Dims;

constexpr int64_t kSortEntries = int64_t(1) << 24;  // sparse dk: slots sorted per query chunk (~16 B each)
constexpr int64_t kTargetBytes = int64_t(256) << 20;  // the wgmma target's buffer per query chunk

at::ScalarType acc_type(const at::Tensor& q_idx) { return acc_dtype(q_idx.scalar_type()); }

// Calls f(Ti{}, Tm{}, ct{}): the indexer's storage type, the main attention's (its own when q has the
// indexer's dtype, else the compute type it was converted to), and the compute type.
template <typename F>
void dispatch_types(at::ScalarType indexer_dtype, bool main_same, const char* name, F&& f) {
  switch (indexer_dtype) {
    case at::kFloat: f(float{}, float{}, float{}); break;
    case at::kDouble: f(double{}, double{}, double{}); break;
    case at::kBFloat16:
      if (main_same) f(__nv_bfloat16{}, __nv_bfloat16{}, float{}); else f(__nv_bfloat16{}, float{}, float{});
      break;
    case at::kHalf:
      if (main_same) f(__half{}, __half{}, float{}); else f(__half{}, float{}, float{});
      break;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", indexer_dtype);
  }
}

// The shared checks, plus the int32 sizes the kernels index with.
Dims check_inputs(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w, const at::Tensor& q,
                  const at::Tensor& kv, const at::Tensor& lse, const at::Tensor& ks, const at::Tensor& ke,
                  double sm_scale, const std::optional<at::Tensor>& indices) {
  const Dims d = glm5::indexer_loss_checks::inputs(q_idx, k_idx, w, q, kv, lse, ks, ke, sm_scale, indices, at::kCUDA);
  glm5::checked_int32(d.HI, "q_idx.size(1) (HI)");
  glm5::checked_int32(d.DI, "q_idx.size(2) (DI)");
  glm5::checked_int32(d.H, "q.size(1) (H)");
  glm5::checked_int32(d.D, "q.size(2) (D)");
  glm5::checked_int32(d.K, "indices.size(1) (K)");
  TORCH_CHECK(d.T < (int64_t(1) << 31), "q_idx.size(0) (T) = ", d.T, " does not fit in int32");
  return d;
}

// Contiguous inputs in the dtypes the kernels read (kept alive while they run).
struct Inputs {
  at::Tensor q_idx, k_idx, w, q, kv, lse, ks, ke, indices;
  bool main_same = true;  // q/kv keep their own dtype (= the indexer's)
};

Inputs prepare(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w, const at::Tensor& q,
               const at::Tensor& kv, const at::Tensor& lse, const at::Tensor& ks, const at::Tensor& ke,
               const std::optional<at::Tensor>& indices) {
  const auto acc = acc_type(q_idx);
  Inputs in;
  in.main_same = q.scalar_type() == q_idx.scalar_type();
  in.q_idx = q_idx.contiguous();
  in.k_idx = k_idx.contiguous();
  in.w = w.contiguous();
  in.q = in.main_same ? q.contiguous() : q.to(acc).contiguous();
  in.kv = in.main_same ? kv.contiguous() : kv.to(acc).contiguous();
  in.lse = lse.to(acc).contiguous();
  in.ks = ks.contiguous();
  in.ke = ke.contiguous();
  if (indices.has_value()) in.indices = indices->contiguous();
  return in;
}

IndexerLossParams make_params(const Inputs& in, const Dims& d, double sm_scale) {
  IndexerLossParams p{};
  p.q_idx = in.q_idx.data_ptr();
  p.k_idx = in.k_idx.data_ptr();
  p.w = in.w.data_ptr();
  p.q = in.q.data_ptr();
  p.kv = in.kv.data_ptr();
  p.lse = in.lse.data_ptr();
  p.ks = in.ks.data_ptr<int32_t>();
  p.ke = in.ke.data_ptr<int32_t>();
  p.indices = in.indices.defined() ? in.indices.data_ptr<int32_t>() : nullptr;
  p.T = d.T;
  p.q0 = 0, p.q1 = d.T;
  p.S = int(d.S), p.HI = int(d.HI), p.DI = int(d.DI), p.H = int(d.H), p.D = int(d.D), p.K = int(d.K);
  p.sm_scale = sm_scale;
  p.ldm = odd_stride(p.D);
  p.ldi = odd_stride(p.DI);
  return p;
}

// loss_pick_tiling (kernels.cuh), or a clear error when even the smallest tiling does not fit.
template <typename SmemFn>
size_t pick_tiling(IndexerLossParams& p, size_t limit, const SmemFn& smem, const char* op) {
  const size_t bytes = loss_pick_tiling(p, limit, smem);
  TORCH_CHECK(bytes <= limit, op, ": these sizes (HI=", p.HI, ", DI=", p.DI, ", H=", p.H, ", D=", p.D, ") need ",
              bytes, " bytes of shared memory, more than this GPU's ", limit);
  return bytes;
}

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

// True when no query can have a key in its set: the loss and every gradient are zero.
bool nothing_to_do(const Dims& d, bool sparse) { return d.T == 0 || d.S == 0 || (sparse && d.K == 0); }

// The bytes of one query chunk's target buffer; GLM5_INDEXER_LOSS_TARGET_BYTES overrides (tests force tiny chunks).
int64_t target_bytes() {
  const char* env = std::getenv("GLM5_INDEXER_LOSS_TARGET_BYTES");
  return env != nullptr ? std::max<int64_t>(std::atoll(env), 1) : kTargetBytes;
}

// The target P on Hopper's tensor cores (probs_wgmma.h), read by the tile kernels instead of recomputing it
// from q, kv and lse in every pass: for fp32 accumulation with bf16/fp16 q and kv, in query chunks whose
// [chunk, width] fp32 buffer stays within target_bytes() (width = K sparse, S dense). P undefined: the
// tile kernels compute P themselves, in one launch over all queries.
struct Target {
  at::Tensor q, kv, P;
  int64_t chunk = 0;
};

Target plan_target(const Inputs& in, const Dims& d, const at::Tensor& q, const at::Tensor& kv) {
  Target tg;
  if (in.lse.scalar_type() != at::kFloat) return tg;
  tg.q = q.contiguous();
  tg.kv = kv.contiguous();
  if (!indexer_loss_target_wgmma_ok(tg.q, tg.kv, in.lse)) return {};
  const int64_t width = in.indices.defined() ? d.K : d.S;
  tg.chunk = std::clamp<int64_t>(target_bytes() / (4 * width), 1, d.T);
  tg.P = at::empty({tg.chunk, width}, tg.q.options().dtype(at::kFloat));
  return tg;
}

// Calls launch() with p's query range [q0, q1) set: per chunk after computing its target into tg.P, or
// once over every query without one.
template <typename F>
void for_query_chunks(IndexerLossParams& p, const Target& tg, const Inputs& in, const Dims& d, double sm_scale,
                      F&& launch) {
  if (!tg.P.defined()) {
    p.q0 = 0, p.q1 = d.T;
    launch();
    return;
  }
  at::Tensor P = tg.P;
  p.P_pre = P.data_ptr<float>();
  p.P_ld = P.size(1);
  for (int64_t q0 = 0; q0 < d.T; q0 += tg.chunk) {
    p.q0 = q0, p.q1 = std::min(d.T, q0 + tg.chunk);
    indexer_loss_target_wgmma(tg.q, tg.kv, in.lse, in.indices, in.ks, in.ke, sm_scale, p.q0, p.q1, P);
    launch();
  }
}

at::Tensor indexer_kl_loss_fwd_cuda(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w,
                                    const at::Tensor& q, const at::Tensor& kv, const at::Tensor& lse,
                                    const at::Tensor& ks, const at::Tensor& ke, double sm_scale,
                                    const std::optional<at::Tensor>& indices) {
  const Dims d = check_inputs(q_idx, k_idx, w, q, kv, lse, ks, ke, sm_scale, indices);
  const c10::cuda::CUDAGuard guard(q_idx.device());
  const auto acc = acc_type(q_idx);
  if (nothing_to_do(d, indices.has_value())) return at::zeros({d.T}, q_idx.options().dtype(acc));
  const Inputs in = prepare(q_idx, k_idx, w, q, kv, lse, ks, ke, indices);
  at::Tensor loss = at::empty({d.T}, q_idx.options().dtype(acc));  // every query's CTA writes its entry
  IndexerLossParams p = make_params(in, d, sm_scale);
  p.loss = loss.data_ptr();
  const Target tg = plan_target(in, d, q, kv);
  const size_t limit = max_smem_optin(q_idx.get_device());
  dispatch_types(q_idx.scalar_type(), in.main_same, "indexer_kl_loss_fwd", [&](auto ti, auto tm, auto tc) {
    using Ti = decltype(ti);
    using Tm = decltype(tm);
    using ct = decltype(tc);
    const size_t smem = pick_tiling(p, limit, loss_fwd_smem<ct>, "indexer_kl_loss_fwd");
    auto kernel = indexer_loss_fwd_kernel<Ti, Tm, ct>;
    allow_smem(kernel, smem);
    for_query_chunks(p, tg, in, d, sm_scale, [&] {
      kernel<<<unsigned(p.q1 - p.q0), kLossThreads, smem, at::cuda::getCurrentCUDAStream()>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return loss;
}

// The sort chunk (slots per launch); GLM5_INDEXER_LOSS_SORT_ENTRIES overrides it (tests force tiny chunks).
int64_t sort_entries() {
  const char* env = std::getenv("GLM5_INDEXER_LOSS_SORT_ENTRIES");
  return env != nullptr ? std::max<int64_t>(std::atoll(env), 1) : kSortEntries;
}

// Sparse dk_idx: per query chunk, sort its slots by key (stable: (t, slot) order within a key), then one CTA
// per key adds its slots' terms to p.dk in that order. Chunks run in increasing t, so every dk element is
// one sequential sum over (t, slot) whatever the chunk size.
template <typename Ti, typename ct>
void sparse_dk(IndexerLossParams p, const Dims& d, const at::TensorOptions& opts, cudaStream_t stream) {
  const int64_t chunk = std::clamp<int64_t>(sort_entries() / d.K, 1, d.T);
  const int64_t n_max = chunk * d.K;
  TORCH_CHECK(n_max < (int64_t(1) << 31), "indexer_kl_loss_bwd: a sort chunk of ", n_max,
              " slots does not fit in int32");
  const auto opts_i = opts.dtype(at::kInt);
  at::Tensor keys_in = at::empty({n_max}, opts_i), keys_out = at::empty({n_max}, opts_i);
  at::Tensor slots_in = at::empty({n_max}, opts_i), slots_out = at::empty({n_max}, opts_i);
  auto* kin = reinterpret_cast<uint32_t*>(keys_in.data_ptr<int32_t>());
  auto* kout = reinterpret_cast<uint32_t*>(keys_out.data_ptr<int32_t>());
  int end_bit = 1;
  while ((int64_t(1) << end_bit) <= d.S) ++end_bit;  // keys lie in [0, S]
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, kin, kout, slots_in.data_ptr<int32_t>(),
                                                 slots_out.data_ptr<int32_t>(), n_max, 0, end_bit, stream));
  at::Tensor temp = at::empty({int64_t(temp_bytes) + 1}, opts.dtype(at::kByte));
  const size_t smem = loss_dk_sparse_smem<ct>(p);
  TORCH_CHECK(smem <= max_smem_optin(opts.device().index()), "indexer_kl_loss_bwd: HI=", d.HI, ", DI=", d.DI,
              " need ", smem, " bytes of shared memory for the key reduction, more than this GPU's");
  auto reduce = indexer_loss_bwd_dk_sparse_kernel<Ti, ct>;
  allow_smem(reduce, smem);
  p.sorted_keys = kout;
  p.sorted_slots = slots_out.data_ptr<int32_t>();
  for (int64_t c0 = 0; c0 < d.T; c0 += chunk) {
    p.t0 = c0;
    p.n = (std::min(d.T, c0 + chunk) - c0) * d.K;
    const int blocks = int(std::min<int64_t>((p.n + 255) / 256, 4096));
    indexer_loss_slot_keys_kernel<<<blocks, 256, 0, stream>>>(p, kin, slots_in.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    size_t bytes = temp_bytes;
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.data_ptr(), bytes, kin, kout, slots_in.data_ptr<int32_t>(),
                                                   slots_out.data_ptr<int32_t>(), p.n, 0, end_bit, stream));
    reduce<<<unsigned(d.S), kLossReduceThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> indexer_kl_loss_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w, const at::Tensor& q,
    const at::Tensor& kv, const at::Tensor& lse, const at::Tensor& ks, const at::Tensor& ke, double sm_scale,
    const std::optional<at::Tensor>& indices) {
  const Dims d = check_inputs(q_idx, k_idx, w, q, kv, lse, ks, ke, sm_scale, indices);
  glm5::indexer_loss_checks::grad_arg(grad, q_idx, d.T, at::kCUDA);
  const c10::cuda::CUDAGuard guard(q_idx.device());
  const auto acc = acc_type(q_idx);
  const auto opts = q_idx.options().dtype(acc);
  // Zero-filled: rows of queries with an empty set and keys no query sees stay zero.
  at::Tensor dq = at::zeros({d.T, d.HI, d.DI}, opts);
  at::Tensor dk = at::zeros({d.S, d.DI}, opts);
  at::Tensor dw = at::zeros({d.T, d.HI}, opts);
  const bool sparse = indices.has_value();
  if (!nothing_to_do(d, sparse)) {
    const Inputs in = prepare(q_idx, k_idx, w, q, kv, lse, ks, ke, indices);
    const at::Tensor g = grad.to(acc).contiguous();
    at::Tensor stats = at::empty({d.T, 4}, opts);
    at::Tensor dI = sparse ? at::zeros({d.T, d.K}, opts) : at::Tensor();
    IndexerLossParams p = make_params(in, d, sm_scale);
    p.grad = g.data_ptr();
    p.dq = dq.data_ptr();
    p.dw = dw.data_ptr();
    p.dk = dk.data_ptr();
    p.stats = stats.data_ptr();
    p.dI = sparse ? dI.data_ptr() : nullptr;
    const Target tg = plan_target(in, d, q, kv);
    const size_t limit = max_smem_optin(q_idx.get_device());
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    dispatch_types(q_idx.scalar_type(), in.main_same, "indexer_kl_loss_bwd", [&](auto ti, auto tm, auto tc) {
      using Ti = decltype(ti);
      using Tm = decltype(tm);
      using ct = decltype(tc);
      // Both kernels' tilings first (the dk tiling may be smaller: the query kernel keeps its own).
      IndexerLossParams pk = p;
      const size_t smem_k = sparse ? 0 : pick_tiling(pk, limit, loss_dk_dense_smem<ct>, "indexer_kl_loss_bwd");
      const size_t smem = pick_tiling(p, limit, loss_bwd_query_smem<ct>, "indexer_kl_loss_bwd");
      auto kq = indexer_loss_bwd_query_kernel<Ti, Tm, ct>;
      auto kk = indexer_loss_bwd_dk_dense_kernel<Ti, Tm, ct>;
      allow_smem(kq, smem);
      if (!sparse) allow_smem(kk, smem_k);
      for_query_chunks(p, tg, in, d, sm_scale, [&] {
        kq<<<unsigned(p.q1 - p.q0), kLossThreads, smem, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (!sparse) {  // dk over this chunk's queries, added in t order to the previous chunks'
          pk.q0 = p.q0, pk.q1 = p.q1, pk.P_pre = p.P_pre, pk.P_ld = p.P_ld;
          kk<<<unsigned((d.S + pk.bs - 1) / pk.bs), kLossThreads, smem_k, stream>>>(pk);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
      if (sparse) sparse_dk<Ti, ct>(p, d, opts, stream);
    });
  }
  return {dq.to(q_idx.scalar_type()), dk.to(k_idx.scalar_type()), dw.to(w.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(glm5, CUDA, m) {
  m.impl("indexer_kl_loss_fwd", &indexer_kl_loss_fwd_cuda);
  m.impl("indexer_kl_loss_bwd", &indexer_kl_loss_bwd_cuda);
}
