"""Mixture of experts: routing, token permutation, grouped GEMM and the routed SwiGLU experts.

Precise semantics: see `glm5.ops.reference.moe_route`, `moe_permute`, `moe_unpermute`,
`grouped_gemm`, `grouped_gemm_wgrad` and `moe_experts`. Loss-free balancing (`expert_load`,
`update_router_bias`) and the sequence-wise balance loss are plain PyTorch here.

Legend: N tokens, k slots per token, E experts, D model width, F expert width, M sorted rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import glm5

from . import reference
from ._dispatch import use_kernel

__all__ = [
    "moe_route",
    "moe_permute",
    "moe_unpermute",
    "grouped_gemm",
    "grouped_gemm_wgrad",
    "moe_experts",
    "expert_load",
    "update_router_bias",
    "sequence_balance_loss",
]


def moe_route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    topk: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid top-k routing with a selection-only bias (optionally group-limited).

    Args:
        logits [N, E]: router logits, float (fp32 in GLM-5). bias [E] float or None.
        topk <= E; n_group divides E; 1 <= topk_group <= n_group; topk_group * E / n_group >= topk.
    Returns:
        topk_idx [N, topk] int32 ordered by descending biased score (ties: smaller expert first);
        topk_w [N, topk] fp32 (fp64 for fp64 logits). Differentiable in logits through topk_w.
    """
    if not use_kernel():
        return reference.moe_route(logits, bias, topk, n_group, topk_group, norm_topk_prob, routed_scaling_factor)
    return torch.ops.glm5.moe_route(logits, bias, topk, n_group, topk_group, norm_topk_prob, routed_scaling_factor)


def moe_permute(
    x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, alignment: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of x grouped by expert (stable: token order), each expert's segment aligned.

    Args:
        x [N, D] float; topk_idx [N, k] int32 in [-1, num_experts) (-1: dropped slot);
        alignment >= 1 (1 on CPU; the GPU tile height for padded layouts).
    Returns:
        x_sorted [N*k + E*(alignment-1), D]: expert e's rows at offsets[e] : offsets[e] + count[e],
            zero padding up to offsets[e+1] and after offsets[E];
        row_map [N, k] int32 (x_sorted[row_map[n, j]] == x[n]; -1 for dropped slots);
        offsets [E+1] int64, offsets[e+1] = offsets[e] + align_up(count[e], alignment).
    Differentiable in x.
    """
    if not use_kernel():
        return reference.moe_permute(x, topk_idx, num_experts, alignment)
    return torch.ops.glm5.moe_permute(x, topk_idx, num_experts, alignment)


def moe_unpermute(y_sorted: torch.Tensor, row_map: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
    """out[n] = sum_j topk_w[n, j] * y_sorted[row_map[n, j]], fp32 accumulation in slot order.

    Args: y_sorted [M, D] float; row_map [N, k] int32 in [-1, M), no row twice; topk_w [N, k] float.
    Returns: [N, D] in y_sorted's dtype. Differentiable in y_sorted and topk_w.
    """
    if not use_kernel():
        return reference.moe_unpermute(y_sorted, row_map, topk_w)
    return torch.ops.glm5.moe_unpermute(y_sorted, row_map, topk_w)


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, trans_w: bool = False) -> torch.Tensor:
    """y[offsets[e]:offsets[e+1]] = x[...] @ w[e]^T (x[...] @ w[e] with trans_w); zero elsewhere.

    Args: x [M, K]; w [E, N, K] ([E, K, N] with trans_w), x's dtype; offsets [E+1] int64,
        non-decreasing, 0 <= offsets[0], offsets[E] <= M.
    Returns: y [M, N] in x's dtype. Differentiable in x and w.
    """
    if not use_kernel():
        return reference.grouped_gemm(x, w, offsets, trans_w)
    return torch.ops.glm5.grouped_gemm(x, w, offsets, trans_w)


def grouped_gemm_wgrad(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """dw[e] = dy[offsets[e]:offsets[e+1]]^T @ x[offsets[e]:offsets[e+1]]: [M,N], [M,K] -> [E,N,K]."""
    if not use_kernel():
        return reference.grouped_gemm_wgrad(dy, x, offsets)
    return torch.ops.glm5.grouped_gemm_wgrad(dy, x, offsets)


def moe_experts(
    x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """The routed SwiGLU experts: permute -> grouped GEMM -> SwiGLU -> grouped GEMM -> weighted combine.

    Args:
        x [N, D]; topk_idx [N, k] int32 in [-1, E); topk_w [N, k] fp32;
        w_gate_up [E, 2F, D] (gate = first F rows, up = next F); w_down [E, D, F]; x's dtype.
    Returns:
        [N, D] in x's dtype, equal to the per-expert loop of transformers' glm_moe_dsa
        (reference.moe_experts). Differentiable in x, topk_w, w_gate_up and w_down.
    """
    if not use_kernel():
        return reference.moe_experts(x, topk_idx, topk_w, w_gate_up, w_down)
    reference.check_experts_shapes(x, topk_idx, topk_w, w_gate_up, w_down)
    E, two_f, _ = w_gate_up.shape
    x_sorted, row_map, offsets = torch.ops.glm5.moe_permute(x, topk_idx, E, 1)
    gate, up = torch.ops.glm5.grouped_gemm(x_sorted, w_gate_up, offsets, False).split(two_f // 2, dim=-1)
    y_sorted = torch.ops.glm5.grouped_gemm(F.silu(gate) * up, w_down, offsets, False)
    return torch.ops.glm5.moe_unpermute(y_sorted, row_map, topk_w)


# ---- loss-free load balancing -----------------------------------------------------------------


def expert_load(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64: how many (token, slot) pairs chose each expert (-1 slots are not counted)."""
    if not torch.compiler.is_compiling():  # the value check reads the tensor: eager only
        reference.check_expert_idx(topk_idx, num_experts)
    # Static shapes (no boolean mask, no bincount) so a compiled MoE layer traces without a break:
    # -1 slots land in bin 0, which is dropped.
    flat = topk_idx.reshape(-1).long() + 1
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=topk_idx.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))[1:]


@torch.no_grad()
def update_router_bias(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """Loss-free balancing step (DeepSeek-V3): bias += rate * sign(mean(load) - load), in place.

    Args: bias [E] float (the router's e_score_correction_bias); load [E] (expert_load, summed over
    the step, any numeric dtype); rate: the update speed (GLM-4.5: 1e-3). Returns bias.
    """
    if load.shape != bias.shape:
        raise ValueError(f"load must have bias's shape {tuple(bias.shape)}, got {tuple(load.shape)}")
    load = load.to(torch.float64)
    bias.add_(torch.sign(load.mean() - load).to(bias.dtype), alpha=rate)
    return bias


def sequence_balance_loss(
    logits: torch.Tensor, topk_idx: torch.Tensor, seq_lens: list[int] | None = None
) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, averaged over the sequences.

    For each sequence of T tokens: L = sum_e f_e * P_e with f_e = E / (k T) * #{tokens choosing e}
    and P_e = mean_t s'[t, e], s' = sigmoid scores normalised over all experts per token. Multiply by
    the loss weight (alpha; GLM-4.5: 1e-4) yourself.

    Args:
        logits [N, E]: router logits (the gradient flows through P into them).
        topk_idx [N, k] int32: the chosen experts (f carries no gradient; -1 slots are ignored).
        seq_lens: lengths of the packed sequences (sum N); None = one sequence.
    Returns: scalar fp32 (fp64 for fp64 logits).
    """
    N, E = logits.shape
    k = topk_idx.shape[1]
    seq_lens = [N] if seq_lens is None else list(seq_lens)
    if sum(seq_lens) != N or min(seq_lens, default=1) < 1:
        raise ValueError(f"seq_lens must be positive and sum to N={N}, got {seq_lens}")
    scores = logits.to(reference.acc_dtype(logits)).sigmoid()
    probs = scores / scores.sum(dim=-1, keepdim=True)
    dev = logits.device
    seq_id = torch.repeat_interleave(torch.arange(len(seq_lens), device=dev), torch.tensor(seq_lens, device=dev))
    chosen = torch.zeros(len(seq_lens), E, dtype=scores.dtype, device=dev)  # [S, E] slots per expert
    valid = topk_idx >= 0
    one = torch.ones((), dtype=scores.dtype, device=dev)
    chosen.index_put_((seq_id[:, None].expand(N, k)[valid], topk_idx[valid].long()), one, accumulate=True)
    lens = torch.tensor(seq_lens, dtype=scores.dtype, device=dev)[:, None]
    f = chosen * E / (k * lens)
    P = torch.zeros_like(chosen).index_add(0, seq_id, probs) / lens
    return (f * P).sum(dim=1).mean()


# ---- fake kernels and autograd ------------------------------------------------------------------


if glm5.HAS_EXT:

    @torch.library.register_fake("glm5::moe_route")
    def _(logits, bias, topk, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0):
        torch._check(logits.dim() == 2, lambda: f"logits must be 2-D, got {logits.dim()}-D")
        torch._check(1 <= topk <= logits.shape[1], lambda: f"topk must be in [1, num_experts], got {topk}")
        N = logits.shape[0]
        return (
            logits.new_empty((N, topk), dtype=torch.int32),
            logits.new_empty((N, topk), dtype=reference.acc_dtype(logits)),
        )

    @torch.library.register_fake("glm5::moe_permute")
    def _(x, topk_idx, num_experts, alignment=1):
        torch._check(x.dim() == 2 and topk_idx.dim() == 2, lambda: "moe_permute: x and topk_idx must be 2-D")
        torch._check(num_experts >= 1 and alignment >= 1, lambda: "num_experts and alignment must be positive")
        N, k = topk_idx.shape
        return (
            x.new_empty((N * k + num_experts * (alignment - 1), x.shape[1])),
            topk_idx.new_empty((N, k), dtype=torch.int32),
            topk_idx.new_empty((num_experts + 1,), dtype=torch.int64),
        )

    @torch.library.register_fake("glm5::moe_unpermute")
    def _(y_sorted, row_map, topk_w):
        torch._check(y_sorted.dim() == 2 and row_map.dim() == 2, lambda: "moe_unpermute: y_sorted and row_map must be 2-D")
        return y_sorted.new_empty((row_map.shape[0], y_sorted.shape[1]))

    @torch.library.register_fake("glm5::moe_unpermute_bwd")
    def _(grad, y_sorted, row_map, topk_w):
        return torch.empty_like(y_sorted), torch.empty_like(topk_w)

    @torch.library.register_fake("glm5::grouped_gemm")
    def _(x, w, offsets, trans_w=False):
        torch._check(x.dim() == 2 and w.dim() == 3, lambda: "grouped_gemm: x must be 2-D and w 3-D")
        torch._check(offsets.shape[0] == w.shape[0] + 1, lambda: "offsets must have E+1 entries")
        return x.new_empty((x.shape[0], w.shape[2] if trans_w else w.shape[1]))

    @torch.library.register_fake("glm5::grouped_gemm_wgrad")
    def _(dy, x, offsets):
        torch._check(dy.dim() == 2 and x.dim() == 2, lambda: "grouped_gemm_wgrad: dy and x must be 2-D")
        return dy.new_empty((offsets.shape[0] - 1, dy.shape[1], x.shape[1]))

    # moe_route: gradient to logits through the weights only (the bias and the choice carry none).
    def _route_setup(ctx, inputs, output):
        logits, _bias, _topk, _n_group, _topk_group, norm, scale = inputs
        ctx.norm, ctx.scale = norm, scale
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits, output[0])

    def _route_backward(ctx, _grad_idx, grad_w):
        if not ctx.needs_input_grad[0] or grad_w is None:
            return None, None, None, None, None, None, None
        logits, topk_idx = ctx.saved_tensors
        idx = topk_idx.long()
        s = logits.to(reference.acc_dtype(logits)).gather(1, idx).sigmoid()
        g = grad_w.to(s.dtype) * ctx.scale
        if ctx.norm:  # w = s / (sum(s) + eps): ds_i = g_i / den - sum_j g_j s_j / den^2
            den = s.sum(dim=-1, keepdim=True) + reference.ROUTE_NORM_EPS
            g = g / den - (g * s).sum(dim=-1, keepdim=True) / (den * den)
        dlogits = torch.zeros(logits.shape, dtype=s.dtype, device=logits.device).scatter(1, idx, g * s * (1 - s))
        return dlogits.to(logits.dtype), None, None, None, None, None, None

    torch.library.register_autograd("glm5::moe_route", _route_backward, setup_context=_route_setup)

    # moe_permute: each token's gradient is the sum of its rows' gradients (unit-weight combine).
    def _permute_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])

    def _permute_backward(ctx, grad_sorted, _grad_row_map, _grad_offsets):
        (row_map,) = ctx.saved_tensors
        if grad_sorted is None:
            return None, None, None, None
        ones = torch.ones(row_map.shape, dtype=reference.acc_dtype(grad_sorted), device=row_map.device)
        return torch.ops.glm5.moe_unpermute(grad_sorted.contiguous(), row_map, ones), None, None, None

    torch.library.register_autograd("glm5::moe_permute", _permute_backward, setup_context=_permute_setup)

    def _unpermute_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _unpermute_backward(ctx, grad):
        y_sorted, row_map, topk_w = ctx.saved_tensors
        dy, dw = torch.ops.glm5.moe_unpermute_bwd(grad.contiguous(), y_sorted, row_map, topk_w)
        return dy, None, dw

    torch.library.register_autograd("glm5::moe_unpermute", _unpermute_backward, setup_context=_unpermute_setup)

    # grouped_gemm: dx is the grouped GEMM with the other weight orientation, dw the k-grouped GEMM.
    def _gemm_setup(ctx, inputs, output):
        x, w, offsets, trans_w = inputs
        ctx.trans_w = trans_w
        ctx.save_for_backward(
            x if ctx.needs_input_grad[1] else None, w if ctx.needs_input_grad[0] else None, offsets
        )

    def _gemm_backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.glm5.grouped_gemm(dy, w, offsets, not ctx.trans_w)
        if ctx.needs_input_grad[1]:
            # trans_w (y = x @ w[e]): dw[e] = x^T dy; else (y = x @ w[e]^T): dw[e] = dy^T x
            a, b = (x, dy) if ctx.trans_w else (dy, x)
            dw = torch.ops.glm5.grouped_gemm_wgrad(a, b, offsets)
        return dx, dw, None, None

    torch.library.register_autograd("glm5::grouped_gemm", _gemm_backward, setup_context=_gemm_setup)
