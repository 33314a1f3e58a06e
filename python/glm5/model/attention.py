"""MLA attention with DeepSeek Sparse Attention (the lightning indexer + top-k sparse attention).

Tensor-name suffixes (torchtitan style): T query tokens (packed over the batch), S key tokens,
D hidden, H heads, N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, L kv_lora_rank,
C = L + R (the absorbed/MQA key width, 576 in GLM-5), Q q_lora_rank, I indexer heads,
J indexer head dim, K top-k.

Two equivalent forms of the same attention (../shared/GLM5_REFERENCE.md section 1.2):
- absorbed (MQA) form: q_nope is absorbed through kv_b's key part into the latent, every head attends
  to the one shared key kv[s] = [c_s | k_rope_s] (C wide), the output (L wide) goes through kv_b's
  value part. This is what `glm5.ops.sparse_mla` computes over the indexer's top-k keys.
- expanded (MHA) form: k_h = [c W_UK_h^T | k_rope], v_h = c W_UV_h^T per head (transformers'
  `GlmMoeDsaAttention`). It serves as the dense path and as the check of the absorbed form.
Both read the same latent `kv_TC`, so a KV cache of C values per token per layer serves either.

RoPE follows transformers exactly: interleaved pairs (x0,x1),(x2,x3)... rotated, written back in
half-split order [evens' | odds'] (bit-identical to transformers' `apply_rotary_pos_emb_interleave`;
q and k share the layout, so dot products are those of interleaved RoPE). The indexer ropes the
first R of its J dims ([rope | nope] order); the main heads are [nope | rope].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

import glm5.ops

from .config import ModelConfig

__all__ = [
    "RMSNorm",
    "rope_cos_sin",
    "apply_rope",
    "Indexer",
    "MLAttention",
    "AttnOutput",
    "ATTN_MODES",
    "mha_attention",
]

# "sparse": absorbed form + glm5.ops.sparse_mla over the indexer's top-k (GLM-5 as served and trained).
# "sparse_mha": expanded form masked to the same top-k (transformers' formulation; a check).
# "dense": expanded form over every visible key, no top-k (dense MLA; DSA's dense warm-up stage).
ATTN_MODES = ("sparse", "sparse_mha", "dense")
# Scores held at once by the chunked expanded-form attention.
_MHA_CHUNK_ELEMS = 1 << 24
# Queries per chunk at most: a chunk's key window runs from its earliest document start to its last
# query, so short chunks over packed rows skip the other rows' keys (8 rows of 128: ~4x less work).
_MHA_MAX_CHUNK = 128


class RMSNorm(nn.Module):
    """weight * x / rms(x), normalised in fp32 and cast back before the weight (as transformers)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, dim/2] for positions [T] (one angle per rotated pair), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=positions.device) / dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE on the last dim of x (2*P wide); cos/sin broadcast to x[..., :P].

    The result is in half-split order [x_even' | x_odd'] (transformers' layout, see the module doc).
    """
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class KVCacheLike(Protocol):
    """What a KV cache offers the attention: append this step's keys, get every key of the layer."""

    def update(self, layer_idx: int, kv_TC: torch.Tensor, k_idx_TJ: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class Indexer(nn.Module):
    """The lightning indexer of one layer (DeepSeek-V3.2 eq. 1, GLM-5 interleaved RoPE).

    Parameter names and shapes are transformers' (`self_attn.indexer.*`). weights_proj is kept in fp32
    by the model's dtype casts (as transformers' `_keep_in_fp32_modules`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)

    def forward(
        self, x_TD: torch.Tensor, q_lat_TQ: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, I, J], k [T, J] (roped, [rope | nope]) and w [T, I] (fp32, scales folded in).

        Callers pass detached x and q_lat: the indexer learns from its KL loss only.
        """
        T = x_TD.shape[0]
        R = self.rope_dim
        q_TIJ = self.wq_b(q_lat_TQ).view(T, self.n_heads, self.head_dim)
        q_TIJ = torch.cat([apply_rope(q_TIJ[..., :R], cos[:, None], sin[:, None]), q_TIJ[..., R:]], dim=-1)
        k_TJ = self.k_norm(self.wk(x_TD))
        k_TJ = torch.cat([apply_rope(k_TJ[..., :R], cos, sin), k_TJ[..., R:]], dim=-1)
        w_TI = self.weights_proj(x_TD.to(self.weights_proj.weight.dtype)).float()
        w_TI = w_TI * (self.n_heads**-0.5 * self.head_dim**-0.5)
        return q_TIJ, k_TJ, w_TI


@dataclass
class MLAProjections:
    """The per-token projections of one attention layer (everything the cache-free forward needs)."""

    q_nope_THN: torch.Tensor
    q_rope_THR: torch.Tensor  # roped
    q_lat_TQ: torch.Tensor  # q_a_layernorm(q_a_proj(x)): also the indexer's query input
    kv_TC: torch.Tensor  # [kv_a_layernorm(c) | roped k_rope]: the latent the KV cache holds


@dataclass
class AttnOutput:
    out_TD: torch.Tensor
    topk_TK: torch.Tensor | None  # the selection this layer used (passed on to "shared" layers)
    indexer_loss: torch.Tensor | None


def mha_attention(
    q_THE: torch.Tensor,
    k_SHE: torch.Tensor,
    v_SHV: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    sm_scale: float,
    indices_TK: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expanded-form attention of query t over keys ks[t] <= s < ke[t] (and, if given, s in indices[t]).

    Returns out [T, H, V] in q's dtype and lse [T, H] fp32 (+inf and out = 0 for a query with no key),
    the same contract as glm5.ops.sparse_mla. Chunked over queries; fp32 softmax.
    """
    T, H, _ = q_THE.shape
    S = k_SHE.shape[0]
    dt = torch.float64 if q_THE.dtype == torch.float64 else torch.float32
    out = q_THE.new_zeros((T, H, v_SHV.shape[-1]))
    lse = torch.full((T, H), float("inf"), dtype=dt, device=q_THE.device)
    if T == 0 or S == 0:
        return out, lse
    chunk = max(1, min(_MHA_MAX_CHUNK, _MHA_CHUNK_ELEMS // max(1, S * H)))
    s_all = torch.arange(S, device=q_THE.device)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        lo, hi = int(ks[t0:t1].min()), int(ke[t0:t1].max())
        if hi <= lo:
            continue
        s = s_all[lo:hi]
        mask = (s[None, :] >= ks[t0:t1, None]) & (s[None, :] < ke[t0:t1, None])  # [t, s]
        if indices_TK is not None:
            sel = torch.zeros((t1 - t0, hi - lo + 1), dtype=torch.bool, device=q_THE.device)
            idx = indices_TK[t0:t1].long()
            idx = torch.where((idx >= lo) & (idx < hi), idx - lo, hi - lo)  # out of window -> spill column
            sel.scatter_(1, idx, True)
            mask &= sel[:, :-1]
        scores = torch.einsum("the,she->ths", q_THE[t0:t1].to(dt), k_SHE[lo:hi].to(dt)) * sm_scale
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        l_TH = torch.logsumexp(scores, dim=-1)
        has = mask.any(dim=1)[:, None]
        p = torch.exp(scores - torch.where(has, l_TH, torch.zeros_like(l_TH))[..., None])
        out[t0:t1] = torch.einsum("ths,shv->thv", p, v_SHV[lo:hi].to(dt)).to(out.dtype)
        lse[t0:t1] = torch.where(has, l_TH, torch.full_like(l_TH, float("inf")))
    return out, lse


class MLAttention(nn.Module):
    """Multi-head latent attention with a lightning indexer (or a shared one) — GLM-5's attention.

    Parameter names are transformers' `GlmMoeDsaAttention` names (`self_attn.*` in the checkpoint).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, has_indexer: bool) -> None:
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        H, D = cfg.num_attention_heads, cfg.hidden_size
        self.n_heads = H
        self.nope, self.rope, self.v_dim, self.kv_rank = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.sm_scale = cfg.softmax_scale
        self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)  # transformers' default eps, not rms_norm_eps
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=False)
        self.indexer = Indexer(cfg) if has_indexer else None

    # ---- pieces (kept separate so a cached decode step can reuse them) ----------------------------
    def project(self, x_TD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> MLAProjections:
        T = x_TD.shape[0]
        q_lat_TQ = self.q_a_layernorm(self.q_a_proj(x_TD))
        q = self.q_b_proj(q_lat_TQ).view(T, self.n_heads, self.nope + self.rope)
        q_rope_THR = apply_rope(q[..., self.nope:], cos[:, None], sin[:, None])
        ckv = self.kv_a_proj_with_mqa(x_TD)
        c_TL = self.kv_a_layernorm(ckv[:, : self.kv_rank])
        k_rope_TR = apply_rope(ckv[:, self.kv_rank:], cos, sin)
        return MLAProjections(q[..., : self.nope], q_rope_THR, q_lat_TQ, torch.cat([c_TL, k_rope_TR], dim=-1))

    def _kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, N, L] and W_UV [H, V, L]: the key and value parts of kv_b_proj, per head."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)
        return w[:, : self.nope], w[:, self.nope:]

    def absorbed_query(self, p: MLAProjections) -> torch.Tensor:
        """q_mqa [T, H, C] = [q_nope W_UK_h | q_rope]: the query of the absorbed form."""
        w_uk_HNL, _ = self._kv_b()
        q_abs_THL = torch.einsum("thn,hnl->thl", p.q_nope_THN, w_uk_HNL)
        return torch.cat([q_abs_THL, p.q_rope_THR], dim=-1)

    def expand_kv(self, kv_SC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys [S, H, N+R] and values [S, H, V] of the expanded form, from the latent."""
        S = kv_SC.shape[0]
        kv = self.kv_b_proj(kv_SC[:, : self.kv_rank]).view(S, self.n_heads, self.nope + self.v_dim)
        k_rope = kv_SC[:, None, self.kv_rank:].expand(S, self.n_heads, self.rope)
        return torch.cat([kv[..., : self.nope], k_rope], dim=-1), kv[..., self.nope:]

    def output(self, o_THV: torch.Tensor) -> torch.Tensor:
        return self.o_proj(o_THV.reshape(o_THV.shape[0], -1))

    def latent_output(self, o_THL: torch.Tensor) -> torch.Tensor:
        """The absorbed form's output [T, H, L] through W_UV per head, then o_proj."""
        _, w_uv_HVL = self._kv_b()
        return self.output(torch.einsum("thl,hvl->thv", o_THL, w_uv_HVL))

    # ---- the layer --------------------------------------------------------------------------------
    def forward(
        self,
        x_TD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ks: torch.Tensor,
        ke: torch.Tensor,
        *,
        prev_topk_TK: torch.Tensor | None = None,
        reuse_topk: bool = False,
        mode: str = "sparse",
        indexer_loss: str | None = None,
        cache: KVCacheLike | None = None,
    ) -> AttnOutput:
        """One attention layer over packed tokens.

        Args:
            x_TD: the normed layer input. cos, sin [T, R/2]: RoPE of each token's position.
            ks, ke [T] int32: query t sees keys ks[t] <= s < ke[t] (key indices into this call's
                tokens, or into the cache's when `cache` is given).
            prev_topk_TK: the selection of the previous "full" layer (required on "shared" layers
                in the sparse modes). reuse_topk: use it even though this layer has an indexer
                (GLM-5.2's MTP steps after the first).
            mode: one of ATTN_MODES.
            indexer_loss: None, "sparse" (KL over the selected keys) or "dense" (KL over every visible
                key; needs mode="dense"). The indexer's inputs are detached: it learns from this only.
            cache: optional KV cache; `update` appends this call's latent and indexer keys, and an
                `indexer_topk` method, when it has one, replaces glm5.ops.indexer_topk (same contract).
        """
        if mode not in ATTN_MODES:
            raise ValueError(f"attention mode must be one of {ATTN_MODES}, got {mode!r}")
        if indexer_loss == "dense" and mode != "dense":
            raise ValueError("the dense indexer loss needs the dense attention (mode='dense')")
        p = self.project(x_TD, cos, sin)
        idx_q = idx_k = idx_w = None
        own_topk = self.indexer is not None and not reuse_topk
        if self.indexer is not None and ((mode != "dense" and own_topk) or indexer_loss is not None):
            idx_q, idx_k, idx_w = self.indexer(x_TD.detach(), p.q_lat_TQ.detach(), cos, sin)
        kv_SC = p.kv_TC
        if cache is not None:
            kv_SC, idx_k = cache.update(self.layer_idx, kv_SC, idx_k)
        S = kv_SC.shape[0]

        topk_TK = None
        if mode != "dense":
            if own_topk:
                K = min(self.cfg.index_topk, S)
                # A cache may route the selection (PackedKVCache: one call per packed sequence).
                select = getattr(cache, "indexer_topk", None) or glm5.ops.indexer_topk
                topk_TK, _ = select(idx_q, idx_k, idx_w.to(idx_q.dtype), ks, ke, K)
            elif prev_topk_TK is None:
                raise ValueError(f"layer {self.layer_idx} shares its indexer but got no top-k from an earlier layer")
            else:
                topk_TK = prev_topk_TK

        q_mqa = None
        if mode == "sparse":
            q_mqa = self.absorbed_query(p)
            o_THL, lse = glm5.ops.sparse_mla(q_mqa, kv_SC, topk_TK, self.sm_scale, self.kv_rank)
            out = self.latent_output(o_THL)
        else:
            k_SHE, v_SHV = self.expand_kv(kv_SC)
            q_THE = torch.cat([p.q_nope_THN, p.q_rope_THR], dim=-1)
            o_THV, lse = mha_attention(q_THE, k_SHE, v_SHV, ks, ke, self.sm_scale, topk_TK)
            out = self.output(o_THV)

        loss = None
        if indexer_loss is not None and idx_q is not None:
            with torch.no_grad():
                q_mqa = self.absorbed_query(p) if q_mqa is None else q_mqa
            loss = glm5.ops.indexer_kl_loss(
                idx_q, idx_k, idx_w.to(idx_q.dtype), q_mqa.detach(), kv_SC.detach(), lse.detach(), ks, ke,
                self.sm_scale, topk_TK if indexer_loss == "sparse" else None,
            )
        return AttnOutput(out, topk_TK, loss)
