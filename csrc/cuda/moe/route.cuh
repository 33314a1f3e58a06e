// moe_route on the GPU: one warp per token.
//
// The choice order is the strict total order of the CPU kernel and the reference: larger biased score
// first, then the smaller index (experts and groups alike). Selecting the best element strictly below
// the previous pick, topk times, walks that order without a "taken" set; every lane recomputes its
// experts' scores on the fly (sigmoid as ATen's CUDA sigmoid: 1 / (1 + exp(-x)) in the accumulator
// type, so the choice sees bitwise the scores of reference.moe_route on the same device). Butterfly
// shuffles give every lane the same winner, so the result does not depend on scheduling.
#pragma once
#include "../common/device_utils.cuh"
#include "common.cuh"

namespace glm5::moe {

template <typename acc_t>
struct Pick {
  acc_t v;
  int32_t i;  // -1: nothing
};

// a comes before b in the choice order (a valid pick beats "nothing").
template <typename acc_t>
__device__ __forceinline__ bool before(const Pick<acc_t>& a, const Pick<acc_t>& b) {
  if (a.i < 0) return false;
  if (b.i < 0) return true;
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

template <typename acc_t>
__device__ __forceinline__ Pick<acc_t> warp_best(Pick<acc_t> p) {
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) {
    Pick<acc_t> o{__shfl_xor_sync(0xffffffffu, p.v, s), __shfl_xor_sync(0xffffffffu, p.i, s)};
    if (before(o, p)) p = o;
  }
  return p;
}

__device__ __forceinline__ float sigmoid_acc(float x) { return 1.0f / (1.0f + ::expf(-x)); }
__device__ __forceinline__ double sigmoid_acc(double x) { return 1.0 / (1.0 + ::exp(-x)); }

template <typename in_t, typename acc_t>
__global__ void moe_route_kernel(RouteParams<in_t, acc_t> p) {
  unsigned char* route_smem = glm5::cuda::dynamic_smem();  // [warps][n_group] group scores
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * warps + warp;
  if (n >= p.N) return;  // whole warps leave together
  acc_t* gscore = reinterpret_cast<acc_t*>(route_smem) + static_cast<int64_t>(warp) * p.n_group;
  const in_t* lg = p.logits + n * p.E;
  auto score = [&](int e) { return sigmoid_acc(to_acc(lg[e])); };
  auto choice = [&](int e) { return p.bias ? score(e) + p.bias[e] : score(e); };

  int32_t* idx = p.topk_idx + n * p.topk;
  acc_t* w = p.topk_w + n * p.topk;
  bool nan = false;
  for (int e = lane; e < p.E; e += 32) nan |= isnan(choice(e));
  if (__any_sync(0xffffffffu, nan)) {  // as the CPU kernel: expert 0, weight 0 (the host may raise)
    for (int j = lane; j < p.topk; j += 32) {
      idx[j] = 0;
      w[j] = acc_t(0);
    }
    return;
  }

  // Group-limited routing: group score = sum of its top-2 biased scores; keep the topk_group best.
  const int gs = p.E / p.n_group;
  Pick<acc_t> last_group{acc_t(0), -1};
  if (p.n_group > 1) {
    for (int g = lane; g < p.n_group; g += 32) {
      acc_t m1 = -INFINITY, m2 = -INFINITY;
      for (int e = g * gs; e < (g + 1) * gs; ++e) {
        const acc_t v = choice(e);
        if (v > m1) {
          m2 = m1;
          m1 = v;
        } else if (v > m2) {
          m2 = v;
        }
      }
      gscore[g] = gs >= 2 ? m1 + m2 : m1;
    }
    __syncwarp();
    for (int r = 0; r < p.topk_group; ++r) {
      Pick<acc_t> best{acc_t(0), -1};
      for (int g = lane; g < p.n_group; g += 32) {
        const Pick<acc_t> c{gscore[g], g};
        if ((r == 0 || before(last_group, c)) && before(c, best)) best = c;
      }
      last_group = warp_best(best);
    }
  }
  // kept(g): g is at or before the last kept group in the order
  auto candidate = [&](int e) {
    if (p.n_group <= 1) return true;
    const int g = e / gs;
    const Pick<acc_t> c{gscore[g], g};
    return !before(last_group, c);
  };

  Pick<acc_t> last{acc_t(0), -1};
  acc_t sum = 0;
  for (int r = 0; r < p.topk; ++r) {
    Pick<acc_t> best{acc_t(0), -1};
    for (int e = lane; e < p.E; e += 32) {
      if (!candidate(e)) continue;
      const Pick<acc_t> c{choice(e), e};
      if ((r == 0 || before(last, c)) && before(c, best)) best = c;
    }
    last = warp_best(best);
    if (lane == 0) {
      const acc_t s = score(last.i);
      idx[r] = last.i;
      w[r] = s;
      sum += s;  // slot order, as the CPU kernel
    }
  }
  if (lane == 0) {
    const acc_t den = sum + p.norm_eps;
    for (int j = 0; j < p.topk; ++j) w[j] = (p.norm ? w[j] / den : w[j]) * p.scale;
  }
}

}  // namespace glm5::moe
