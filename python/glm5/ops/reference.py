"""Plain-PyTorch references for every glm5 op: the specification.

Each function here defines the exact semantics of the op of the same name in `glm5.ops`; the C++
and CUDA kernels are tested against these, the benchmarks time against them, and the model falls
back to them when the compiled extension is missing or `glm5.ops.set_impl("reference")` is set.

Conventions shared by all ops:
- T query tokens (packed over the batch), S key tokens, H attention heads, HI indexer heads.
- Accumulation is fp32 (fp64 when the inputs are fp64, for gradcheck); results documented as
  "fp32" are fp64 for fp64 inputs.
- Index tensors are int32; -1 marks an empty slot.
- `ks`, `ke` [T] int32: query t sees keys ks[t] <= s < ke[t] (causal within its document).
"""

from __future__ import annotations

import torch

__all__ = [
    "indexer_logits",
    "indexer_topk",
    "sparse_mla",
    "indexer_kl_loss",
    "moe_route",
    "moe_permute",
    "moe_unpermute",
    "grouped_gemm",
    "grouped_gemm_wgrad",
    "moe_experts",
]

# Queries processed at once by the references that would otherwise build a [T, S, H] tensor.
_CHUNK_ELEMS = 1 << 24


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The accumulation (and fp32-output) dtype for inputs of t's dtype."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def visible_mask(ks: torch.Tensor, ke: torch.Tensor, S: int) -> torch.Tensor:
    """[T, S] bool: key s is visible to query t iff ks[t] <= s < ke[t]."""
    s = torch.arange(S, device=ks.device)
    return (s[None, :] >= ks[:, None].long()) & (s[None, :] < ke[:, None].long())


def check_ranges(ks: torch.Tensor, ke: torch.Tensor, T: int, S: int) -> None:
    """ks, ke: [T] int32 with 0 <= ks[t] <= ke[t] <= S (ks == ke: the query sees no key)."""
    for name, r in (("ks", ks), ("ke", ke)):
        if r.dtype != torch.int32 or r.shape != (T,):
            raise ValueError(f"{name} must be an int32 tensor of shape ({T},), got {r.dtype} {tuple(r.shape)}")
    if T and (int(ks.min()) < 0 or int(ke.max()) > S or bool((ks > ke).any())):
        raise ValueError(f"ks/ke must satisfy 0 <= ks <= ke <= S={S}")


def check_indices(indices: torch.Tensor, S: int, name: str = "indices") -> None:
    """Indices must lie in [-1, S); anything else is a caller bug, never silently clamped."""
    if indices.numel() and (int(indices.min()) < -1 or int(indices.max()) >= S):
        raise IndexError(
            f"{name} out of range: values must be -1 (empty) or in [0, {S}), "
            f"got min {int(indices.min())}, max {int(indices.max())}"
        )


# ---------------------------------------------------------------------------------------------
# Lightning indexer
# ---------------------------------------------------------------------------------------------


def indexer_logits(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor) -> torch.Tensor:
    """Lightning-indexer scores.

    Args:
        q:  [T, HI, DI] query heads of the indexer.
        k:  [S, DI] the single (MQA) indexer key head.
        w:  [T, HI] per-head weights (softmax scale and HI^-0.5 already folded in).
        ks, ke: [T] int32 visible key range of each query.
    Returns:
        logits [T, S] fp32: sum_j w[t,j] * relu(q[t,j] . k[s]) where visible, -inf elsewhere.
    """
    dt = acc_dtype(q)
    scores = torch.einsum("thd,sd->ths", q.to(dt), k.to(dt)).relu()
    logits = torch.einsum("ths,th->ts", scores, w.to(dt))
    return logits.masked_fill(~visible_mask(ks, ke, k.shape[0]), float("-inf"))


def indexer_topk(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `topk` visible keys of each query with the largest indexer score.

    Returns:
        indices [T, topk] int32, sorted by descending score, ties broken by the smaller key index,
        padded with -1 when fewer than `topk` keys are visible;
        scores [T, topk] fp32, the matching logits, -inf in padded slots.
    NaN scores raise ValueError (a NaN would make the selection meaningless).
    """
    if topk <= 0:
        raise ValueError(f"topk must be positive, got {topk}")
    T, S = q.shape[0], k.shape[0]
    dt = acc_dtype(q)
    out_idx = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    out_val = torch.full((T, topk), float("-inf"), dtype=dt, device=q.device)
    chunk = max(1, _CHUNK_ELEMS // max(1, S * q.shape[1]))
    for t0 in range(0, T, chunk):
        sl = slice(t0, min(T, t0 + chunk))
        logits = indexer_logits(q[sl], k, w[sl], ks[sl], ke[sl])
        if torch.isnan(logits).any():
            raise ValueError("indexer_topk: NaN in the indexer scores (check q, k and w)")
        # A stable descending sort keeps equal scores in key order: the smaller index wins.
        vals, idx = torch.sort(logits, dim=1, descending=True, stable=True)
        n = min(topk, S)
        vals, idx = vals[:, :n], idx[:, :n].to(torch.int32)
        idx = idx.masked_fill(vals == float("-inf"), -1)
        out_idx[sl, :n], out_val[sl, :n] = idx, vals
    return out_idx, out_val


# ---------------------------------------------------------------------------------------------
# Sparse MLA attention (MQA / absorbed form)
# ---------------------------------------------------------------------------------------------


def sparse_mla(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every head of query t over the keys kv[indices[t]] only.

    Args:
        q:       [T, H, D_qk] queries (absorbed MLA form: D_qk = 576 in GLM-5).
        kv:      [S, D_qk] latent keys shared by all heads; the value is kv[:, :d_v].
        indices: [T, K] int32 selected keys; -1 slots are skipped (a repeated index counts twice).
        sm_scale: softmax scale applied to q . k.
        d_v:     value width (512 in GLM-5), <= D_qk.
    Returns:
        out [T, H, d_v] in q's dtype and lse [T, H] fp32 (natural-log log-sum-exp of the scaled
        scores). A query with no valid index gets out = 0 and lse = +inf (so exp(s - lse) = 0).
        lse is an auxiliary output: gradients flow through `out` only.
    """
    check_indices(indices, kv.shape[0])
    dt = acc_dtype(q)
    valid = indices >= 0  # [T, K]
    kv_g = kv.to(dt)[indices.clamp(min=0).long()]  # [T, K, D]
    scores = torch.einsum("thd,tkd->thk", q.to(dt), kv_g) * sm_scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    empty = ~valid.any(dim=1)  # [T]
    lse = torch.logsumexp(scores, dim=-1)
    lse_safe = torch.where(empty[:, None], torch.zeros_like(lse), lse)
    p = torch.exp(scores - lse_safe[..., None])  # exp(-inf) = 0 on invalid slots and empty rows
    out = torch.einsum("thk,tkd->thd", p, kv_g[..., :d_v])
    lse = torch.where(empty[:, None], torch.full_like(lse, float("inf")), lse)
    return out.to(q.dtype), lse.detach()


def head_summed_probs(q, kv, lse, keys, sm_scale):
    """p[t, j] = sum_h exp(sm_scale * q[t,h] . kv[keys[t,j]] - lse[t,h]) over a key set (-1 = none).

    The main attention's probabilities recomputed from its saved lse: what the indexer imitates.
    """
    dt = acc_dtype(q)
    kv_g = kv.to(dt)[keys.clamp(min=0).long()]  # [T, J, D]
    scores = torch.einsum("thd,tjd->thj", q.to(dt), kv_g) * sm_scale
    p = torch.exp(scores - lse.to(dt)[..., None]).sum(dim=1)
    return p.masked_fill(keys < 0, 0.0)


# ---------------------------------------------------------------------------------------------
# Indexer training loss (DeepSeek-V3.2 recipe)
# ---------------------------------------------------------------------------------------------


def indexer_kl_loss(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    w: torch.Tensor,
    q: torch.Tensor,
    kv: torch.Tensor,
    lse: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    sm_scale: float,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_t KL(p_t || softmax(I_t)) over each query's key set.

    Args:
        q_idx [T, HI, DI], k_idx [S, DI], w [T, HI]: the indexer's inputs (see indexer_logits).
        q [T, H, D_qk], kv [S, D_qk], lse [T, H]: the main attention's queries, latent keys and the
            lse it saved (sparse_mla's, or a dense attention's over all visible keys).
        ks, ke [T] int32: visible key ranges.
        indices [T, K] int32 or None: None = dense warm-up, the key set of query t is every visible
            key; otherwise the sparse stage, the set is the valid selected keys that are visible.
    Returns:
        scalar fp32 loss. p_t is the head-summed attention probability over the set, L1-normalised;
        softmax(I_t) is taken over the same set. Queries with an empty set contribute 0.
        Gradients flow to q_idx, k_idx and w only: q, kv and lse are treated as constants.
    """
    q, kv, lse = q.detach(), kv.detach(), lse.detach()
    T, S = q_idx.shape[0], k_idx.shape[0]
    dt = acc_dtype(q_idx)
    if indices is not None:
        check_indices(indices, S)
    total = torch.zeros((), dtype=dt, device=q_idx.device)
    width = S if indices is None else indices.shape[1]
    chunk = max(1, _CHUNK_ELEMS // max(1, width * max(q.shape[1], q_idx.shape[1])))
    for t0 in range(0, T, chunk):
        sl = slice(t0, min(T, t0 + chunk))
        if indices is None:
            keys = torch.arange(S, device=q.device, dtype=torch.int32).expand(sl.stop - sl.start, S)
        else:
            keys = indices[sl]
        inside = (keys >= ks[sl, None]) & (keys < ke[sl, None]) & (keys >= 0)
        keys = keys.masked_fill(~inside, -1)
        # Indexer logits on the key set.
        k_g = k_idx.to(dt)[keys.clamp(min=0).long()]  # [t, J, DI]
        s = torch.einsum("thd,tjd->thj", q_idx[sl].to(dt), k_g).relu()
        logits = torch.einsum("thj,th->tj", s, w[sl].to(dt)).masked_fill(~inside, float("-inf"))
        # Target distribution from the main attention.
        p = head_summed_probs(q[sl], kv, lse[sl], keys, sm_scale)
        p = p / p.sum(dim=1, keepdim=True).clamp_min(torch.finfo(dt).tiny)
        has_keys = inside.any(dim=1, keepdim=True)
        log_q = torch.log_softmax(logits.masked_fill(~has_keys, 0.0), dim=1)
        kl = torch.where(p > 0, p * (torch.log(p.clamp_min(torch.finfo(dt).tiny)) - log_q), torch.zeros_like(p))
        total = total + kl.sum()
    return total


# ---------------------------------------------------------------------------------------------
# Mixture of experts
# ---------------------------------------------------------------------------------------------
#
# Legend: N tokens, k = topk slots per token, E experts, D model width, F expert width,
# M rows of an expert-sorted buffer. An expert index of -1 in topk_idx marks a dropped slot: it gets
# no row (row_map = -1) and contributes nothing to the combine. Routing never produces -1.

# Added to the sum of the chosen scores before renormalising (as transformers' glm_moe_dsa router).
ROUTE_NORM_EPS = 1e-20


def check_route_args(E: int, topk: int, n_group: int, topk_group: int) -> None:
    """The routing hyper-parameters must describe a possible selection (errors name the argument)."""
    if not 1 <= topk <= E:
        raise ValueError(f"topk must be in [1, num_experts={E}], got {topk}")
    if n_group < 1 or E % n_group:
        raise ValueError(f"n_group must be a positive divisor of num_experts={E}, got {n_group}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
    if topk_group * (E // n_group) < topk:
        raise ValueError(
            f"topk_group={topk_group} groups of {E // n_group} experts hold fewer than topk={topk} experts"
        )


def check_expert_idx(topk_idx: torch.Tensor, E: int, name: str = "topk_idx") -> None:
    """Expert indices must lie in [-1, E) (-1: dropped slot); anything else is a caller bug."""
    if topk_idx.dtype != torch.int32 or topk_idx.dim() != 2:
        raise ValueError(f"{name} must be a 2-D int32 tensor, got {topk_idx.dtype} {tuple(topk_idx.shape)}")
    if topk_idx.numel() and (int(topk_idx.min()) < -1 or int(topk_idx.max()) >= E):
        raise IndexError(
            f"{name} out of range: expert indices must be -1 (dropped) or in [0, {E}), "
            f"got min {int(topk_idx.min())}, max {int(topk_idx.max())}"
        )


def check_offsets(offsets: torch.Tensor, E: int, M: int) -> list[int]:
    """offsets [E+1] int64, non-decreasing, 0 <= offsets[0], offsets[E] <= M; returns them as a list."""
    if offsets.dtype != torch.int64 or tuple(offsets.shape) != (E + 1,):
        raise ValueError(f"offsets must be an int64 tensor of shape ({E + 1},), got {offsets.dtype} {tuple(offsets.shape)}")
    off = offsets.tolist()
    if off[0] < 0 or off[-1] > M or any(b < a for a, b in zip(off, off[1:])):
        raise ValueError(f"offsets must be non-decreasing with 0 <= offsets[0] and offsets[E] <= M={M}, got {off}")
    return off


def moe_route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    topk: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid top-k router (DeepSeek-V3 / GLM-5, transformers' GlmMoeDsaTopkRouter).

    Args:
        logits [N, E]: router logits (x @ Wg^T), any float dtype; scores s = sigmoid(logits) in fp32.
        bias [E] or None: e_score_correction_bias; it only chooses (s + bias), never weights.
        topk: experts per token. n_group / topk_group: group-limited routing (n_group > 1): the E
            experts form n_group groups of E/n_group; a group's score is the sum of its top-2 biased
            scores (its only score when a group has one expert); the topk_group best groups are kept
            and the topk experts are chosen among their experts only.
        norm_topk_prob: divide the chosen scores by (their sum + 1e-20).
        routed_scaling_factor: multiplies the weights (2.5 in GLM-5).
    Returns:
        topk_idx [N, topk] int32: the chosen experts, ordered by descending biased score; equal
            scores (and equal group scores) are broken by the smaller index, so the choice is exact
            and deterministic.
        topk_w [N, topk] fp32: the weights. Gradients reach logits through topk_w only.
    NaN in logits or bias raises ValueError.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, E], got shape {tuple(logits.shape)}")
    N, E = logits.shape
    check_route_args(E, topk, n_group, topk_group)
    if bias is not None and tuple(bias.shape) != (E,):
        raise ValueError(f"bias must have shape ({E},), got {tuple(bias.shape)}")
    dt = acc_dtype(logits)
    scores = logits.to(dt).sigmoid()
    choice = scores.detach() if bias is None else scores.detach() + bias.detach().to(dt)
    if torch.isnan(choice).any():
        raise ValueError("moe_route: NaN in logits or bias")
    if n_group > 1:
        gs = E // n_group
        group_scores = choice.view(N, n_group, gs).topk(min(2, gs), dim=-1).values.sum(dim=-1)
        keep = torch.sort(group_scores, dim=1, descending=True, stable=True).indices[:, :topk_group]
        group_mask = torch.zeros(N, n_group, dtype=torch.bool, device=logits.device).scatter_(1, keep, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(gs, dim=1), float("-inf"))
    # A stable descending sort keeps equal scores in expert order: the smaller index wins.
    idx = torch.sort(choice, dim=1, descending=True, stable=True).indices[:, :topk]
    w = scores.gather(1, idx)
    if norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + ROUTE_NORM_EPS)
    return idx.to(torch.int32), w * routed_scaling_factor


def moe_permute(
    x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, alignment: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the (token, slot) rows of x by expert into one buffer (the contiguous grouped-GEMM layout).

    Args:
        x [N, D]: tokens. topk_idx [N, k] int32: expert of each slot, in [-1, num_experts).
        alignment >= 1: every expert's segment starts at (and spans) a multiple of this many rows.
    Returns:
        x_sorted [N*k + E*(alignment-1), D] (x's dtype): a fixed capacity, so the shape does not
            depend on the routing. Expert e's rows are x_sorted[offsets[e] : offsets[e] + count[e]],
            in token order (then slot order); rows offsets[e] + count[e] .. offsets[e+1] are zero
            padding, and so is every row from offsets[E] to the end.
        row_map [N, k] int32: x_sorted[row_map[n, j]] == x[n]; -1 for dropped slots.
        offsets [E+1] int64: offsets[0] = 0, offsets[e+1] = offsets[e] + align_up(count[e], alignment)
            (so with alignment 1, offsets = [0, cumsum(count)] and offsets[E] = number of valid slots).
    Differentiable in x (the backward sums each token's rows: moe_unpermute with unit weights).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [N, D], got shape {tuple(x.shape)}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be positive, got {num_experts}")
    if alignment < 1:
        raise ValueError(f"alignment must be positive, got {alignment}")
    check_expert_idx(topk_idx, num_experts)
    N, D = x.shape
    if topk_idx.shape[0] != N:
        raise ValueError(f"topk_idx must have N={N} rows, got shape {tuple(topk_idx.shape)}")
    E, A, k = num_experts, alignment, topk_idx.shape[1]
    flat = topk_idx.reshape(-1).long()
    valid = flat >= 0
    counts = torch.bincount(flat[valid], minlength=E)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum((counts + A - 1) // A * A, 0)])
    key = torch.where(valid, flat, E)  # dropped slots sort last
    order = torch.sort(key, stable=True).indices
    e_sorted = key[order]
    ok = e_sorted < E
    order, e_sorted = order[ok], e_sorted[ok]
    compact_start = torch.cumsum(counts, 0) - counts  # where expert e starts in the unpadded order
    rank = torch.arange(order.numel(), device=x.device) - compact_start[e_sorted]
    dest = offsets[e_sorted] + rank
    row_map = torch.full((N * k,), -1, dtype=torch.int32, device=x.device)
    row_map[order] = dest.to(torch.int32)
    x_sorted = x.new_zeros((N * k + E * (A - 1), D)).index_copy(0, dest, x[order // k])
    return x_sorted, row_map.view(N, k), offsets


def check_row_map(row_map: torch.Tensor, M: int) -> None:
    """row_map [N, k] int32 with values in [-1, M) and no row repeated."""
    if row_map.dtype != torch.int32 or row_map.dim() != 2:
        raise ValueError(f"row_map must be a 2-D int32 tensor, got {row_map.dtype} {tuple(row_map.shape)}")
    valid = row_map[row_map >= 0]
    if row_map.numel() and (int(row_map.min()) < -1 or int(row_map.max()) >= M):
        raise IndexError(f"row_map out of range: rows must be -1 or in [0, {M}), got min {int(row_map.min())}, max {int(row_map.max())}")
    if valid.numel() != torch.unique(valid).numel():
        raise ValueError("row_map repeats a row: each row of y_sorted belongs to one (token, slot)")


def moe_unpermute(y_sorted: torch.Tensor, row_map: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
    """Weighted combine: out[n] = sum_j topk_w[n, j] * y_sorted[row_map[n, j]] (slots with row -1 skipped).

    Args:
        y_sorted [M, D]: expert outputs in the layout of moe_permute. row_map [N, k] int32 (values
            in [-1, M), no row twice). topk_w [N, k]: float weights (fp32 from moe_route).
    Returns:
        out [N, D] in y_sorted's dtype, accumulated in fp32 (fp64 for fp64) in slot order.
    Differentiable in y_sorted and topk_w.
    """
    if y_sorted.dim() != 2:
        raise ValueError(f"y_sorted must be 2-D [M, D], got shape {tuple(y_sorted.shape)}")
    check_row_map(row_map, y_sorted.shape[0])
    if topk_w.shape != row_map.shape:
        raise ValueError(f"topk_w must have row_map's shape {tuple(row_map.shape)}, got {tuple(topk_w.shape)}")
    dt = acc_dtype(y_sorted)
    N, k = row_map.shape
    out = y_sorted.new_zeros((N, y_sorted.shape[1]), dtype=dt)
    for j in range(k):
        rows = row_map[:, j]
        term = topk_w[:, j, None].to(dt) * y_sorted.to(dt)[rows.clamp(min=0).long()]
        out = out + torch.where((rows >= 0)[:, None], term, torch.zeros_like(term))
    return out.to(y_sorted.dtype)


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, trans_w: bool = False) -> torch.Tensor:
    """M-grouped GEMM over contiguous row groups (DeepGEMM's "contiguous" layout).

    Args:
        x [M, K]; w [E, N, K] (or [E, K, N] with trans_w), x's dtype; offsets [E+1] int64,
            non-decreasing, 0 <= offsets[0], offsets[E] <= M. Experts with no rows are legal.
    Returns:
        y [M, N] in x's dtype: y[offsets[e]:offsets[e+1]] = x[...] @ w[e]^T (x[...] @ w[e] with
        trans_w), computed as one torch.matmul per expert (fp32 accumulation); rows outside
        [offsets[0], offsets[E]) are zero.
    Differentiable in x and w: dx = grouped_gemm(dy, w, offsets, not trans_w), dw = grouped_gemm_wgrad.
    """
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"x must be 2-D and w 3-D, got shapes {tuple(x.shape)} and {tuple(w.shape)}")
    E = w.shape[0]
    K = w.shape[1] if trans_w else w.shape[2]
    if x.shape[1] != K:
        raise ValueError(f"x.shape[1]={x.shape[1]} must equal w's K={K} (w shape {tuple(w.shape)}, trans_w={trans_w})")
    M, N = x.shape[0], (w.shape[2] if trans_w else w.shape[1])
    off = check_offsets(offsets, E, M)
    pieces = [x.new_zeros((off[0], N))]
    for e in range(E):
        if off[e + 1] > off[e]:
            pieces.append(x[off[e] : off[e + 1]] @ (w[e] if trans_w else w[e].T))
    pieces.append(x.new_zeros((M - off[E], N)))
    return torch.cat(pieces)


def grouped_gemm_wgrad(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """K-grouped GEMM: dw[e] = dy[offsets[e]:offsets[e+1]]^T @ x[offsets[e]:offsets[e+1]].

    Args: dy [M, N], x [M, K] (one dtype), offsets [E+1] int64 as in grouped_gemm.
    Returns: dw [E, N, K] in dy's dtype; zero for experts with no rows.
    """
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy [M, N] and x [M, K] must share M, got shapes {tuple(dy.shape)} and {tuple(x.shape)}")
    if offsets.dim() != 1 or offsets.shape[0] < 2:
        raise ValueError(f"offsets must be 1-D [E+1] with E >= 1, got shape {tuple(offsets.shape)}")
    E = offsets.shape[0] - 1
    off = check_offsets(offsets, E, dy.shape[0])
    return torch.stack([dy[off[e] : off[e + 1]].T @ x[off[e] : off[e + 1]] for e in range(E)])


def check_experts_shapes(x, topk_idx, topk_w, w_gate_up, w_down) -> None:
    """x [N, D], topk_idx / topk_w [N, k], w_gate_up [E, 2F, D], w_down [E, D, F] (reads no data)."""
    if x.dim() != 2 or w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError("x must be [N, D], w_gate_up [E, 2F, D] and w_down [E, D, F]")
    E, two_f, D = w_gate_up.shape
    if x.shape[1] != D or two_f % 2 or tuple(w_down.shape) != (E, D, two_f // 2):
        raise ValueError(
            f"shapes do not match: x {tuple(x.shape)}, w_gate_up {tuple(w_gate_up.shape)} [E, 2F, D], "
            f"w_down {tuple(w_down.shape)} [E, D, F]"
        )
    if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0] or topk_w.shape != topk_idx.shape:
        raise ValueError(f"topk_idx and topk_w must be [N={x.shape[0]}, k], got {tuple(topk_idx.shape)}, {tuple(topk_w.shape)}")


def moe_experts(
    x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """The routed SwiGLU experts, as the per-expert loop of transformers' GlmMoeDsaExperts.

    Args:
        x [N, D]; topk_idx [N, k] int32 in [-1, E); topk_w [N, k] (fp32);
        w_gate_up [E, 2F, D] (gate = rows 0..F-1, up = rows F..2F-1); w_down [E, D, F]; x's dtype.
    Returns:
        [N, D] in x's dtype: sum_j topk_w[n,j] * down_e(silu(gate_e(x[n])) * up_e(x[n])) with
        e = topk_idx[n, j]. GEMMs and SwiGLU run in x's dtype, the weighted sum in fp32.
    """
    check_experts_shapes(x, topk_idx, topk_w, w_gate_up, w_down)
    E = w_gate_up.shape[0]
    check_expert_idx(topk_idx, E)
    dt = acc_dtype(x)
    out = x.new_zeros(x.shape, dtype=dt)
    for e in range(E):
        tok, slot = torch.where(topk_idx == e)
        if tok.numel() == 0:
            continue
        gate, up = (x[tok] @ w_gate_up[e].T).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ w_down[e].T
        out = out.index_add(0, tok, y.to(dt) * topk_w[tok, slot, None].to(dt))
    return out.to(x.dtype)
