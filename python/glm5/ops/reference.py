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
