"""The GLM-5 decoder: embedding, MLA+DSA / MoE layers, final norm, LM head, and the MTP block.

Suffixes: B batch, S sequence, T = B*S packed tokens, D hidden, V vocab.
Module names mirror transformers' GlmMoeDsaForCausalLM (`model.embed_tokens`, `model.layers.{i}.*`,
`model.norm`, `lm_head`), so checkpoint names map one to one (the experts aside, see checkpoint.py).
The MTP block lives at `mtp.*` here and at `model.layers.{num_hidden_layers}.*` in the checkpoint.

Sequences are processed packed: T tokens over the batch, with per-token key ranges ks/ke
(causal within a document). `position_ids` that restart at 0 mark document starts inside a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import ATTN_MODES, MLAttention, RMSNorm, rope_cos_sin
from .config import ModelConfig
from .moe import MLP, MoE, Experts, Router

__all__ = ["DecoderLayer", "GLM5Model", "GLM5ForCausalLM", "CausalLMOutput", "pack_ranges", "KEEP_FP32"]

# Tensors kept in fp32 whatever the model dtype (transformers' _keep_in_fp32_modules(_strict)).
KEEP_FP32 = ("indexer.weights_proj.weight", "gate.e_score_correction_bias")
IGNORE_INDEX = -100


def pack_ranges(
    B: int, S: int, device: torch.device, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """positions [T] int64, ks [T] int32, ke [T] int32 for B rows of S tokens packed into T = B*S.

    Without position_ids each row is one document at positions 0..S-1. With position_ids [B, S],
    a document starts wherever the position is 0 and positions must count up by one inside it.
    """
    s = torch.arange(S, device=device)
    if position_ids is None:
        pos_BS = s.expand(B, S)
    else:
        pos_BS = position_ids.to(device=device, dtype=torch.long)
        if pos_BS.shape != (B, S):
            raise ValueError(f"position_ids must have shape {(B, S)}, got {tuple(pos_BS.shape)}")
        if S and bool(((pos_BS[:, 1:] != pos_BS[:, :-1] + 1) & (pos_BS[:, 1:] != 0)).any() | (pos_BS[:, 0] != 0).any()):
            raise ValueError("position_ids must start each row at 0 and count up by one within a document (0 = new document)")
    t = torch.arange(B * S, device=device)
    positions = pos_BS.reshape(-1)
    ks = (t - positions).to(torch.int32)
    return positions, ks, (t + 1).to(torch.int32)


def _init_weights(module: nn.Module, std: float) -> None:
    """transformers' init: N(0, std) matrices and embeddings, unit norms, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, (RMSNorm, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, Router):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.e_score_correction_bias)
        elif isinstance(m, Experts):
            nn.init.normal_(m.gate_up_proj, std=std)
            nn.init.normal_(m.down_proj, std=std)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)). mlp is dense or MoE per config."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, mlp_type: str, has_indexer: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, layer_idx, has_indexer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if mlp_type == "sparse" else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h_TD, cos, sin, ks, ke, *, prev_topk_TK=None, reuse_topk=False, mode="sparse",
                indexer_loss=None, cache=None):
        """Returns (h_TD, topk_TK, indexer_loss or None)."""
        a = self.self_attn(
            self.input_layernorm(h_TD), cos, sin, ks, ke, prev_topk_TK=prev_topk_TK, reuse_topk=reuse_topk,
            mode=mode, indexer_loss=indexer_loss, cache=cache,
        )
        h_TD = h_TD + a.out_TD
        h_TD = h_TD + self.mlp(self.post_attention_layernorm(h_TD))
        return h_TD, a.topk_TK, a.indexer_loss


class GLM5Model(nn.Module):
    """The backbone (`model.*` in the checkpoint): embedding, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        # _weight skips nn.Embedding's own normal_ init (slow on the meta device); _init_weights inits it.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, mlp_type=cfg.mlp_layer_types[i], has_indexer=cfg.indexer_types[i] == "full")
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h_TD, cos, sin, ks, ke, *, mode="sparse", indexer_loss=None, cache=None):
        """Returns the final-normed hidden [T, D] and the summed indexer loss (or None)."""
        topk = None
        losses = []
        for layer in self.layers:
            h_TD, topk, loss = layer(h_TD, cos, sin, ks, ke, prev_topk_TK=topk, mode=mode,
                                     indexer_loss=indexer_loss, cache=cache)
            if loss is not None:
                losses.append(loss)
        return self.norm(h_TD), (torch.stack(losses).sum() if losses else None)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, S, V]
    hidden_states: torch.Tensor  # [B, S, D], after the final norm (the MTP block's input)
    loss: torch.Tensor | None = None  # lm_loss + mtp_loss_weight * mtp_loss + indexer_loss_weight * indexer_loss
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None  # mean over the MTP steps
    mtp_losses: list[torch.Tensor] | None = None  # one per step (step k predicts token t+k+1)
    indexer_loss: torch.Tensor | None = None  # summed over layers (and MTP steps when training MTP), per token


def shifted_targets(labels_T: torch.Tensor, ks: torch.Tensor, ke_doc: torch.Tensor, shift: int) -> torch.Tensor:
    """target[t] = labels[t + shift] when that token is in t's document, else IGNORE_INDEX."""
    T = labels_T.shape[0]
    t = torch.arange(T, device=labels_T.device)
    src = t + shift
    ok = src < ke_doc
    return torch.where(ok, labels_T[src.clamp(max=max(T - 1, 0))], torch.full_like(labels_T, IGNORE_INDEX))


def cross_entropy(logits_TV: torch.Tensor, targets_T: torch.Tensor) -> torch.Tensor:
    """Mean fp32 cross-entropy over the targets that are not IGNORE_INDEX (0 when there are none)."""
    n = (targets_T != IGNORE_INDEX).sum()
    total = F.cross_entropy(logits_TV.float(), targets_T, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / n.clamp(min=1)


def doc_ends(ks: torch.Tensor) -> torch.Tensor:
    """[T] int64: one past the last token of each token's document (documents are runs of equal ks)."""
    T = ks.shape[0]
    ks = ks.long()
    starts = torch.unique_consecutive(ks)
    ends = torch.cat([starts[1:], torch.tensor([T], device=ks.device)])
    return ends[torch.searchsorted(starts, ks)]


class GLM5ForCausalLM(nn.Module):
    """GLM-5: `model(input_ids)` -> CausalLMOutput with `.logits` [B, S, vocab]."""

    def __init__(self, cfg: ModelConfig, *, init: bool = True) -> None:
        super().__init__()
        from .mtp import MTPBlock

        self.config = cfg
        self.model = GLM5Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = MTPBlock(cfg) if cfg.num_nextn_predict_layers else None
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.attn_mode = "sparse"  # default for forward(); see attention.ATTN_MODES
        if init and self.lm_head.weight.device.type != "meta":
            _init_weights(self, cfg.initializer_range)
            if cfg.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight

    # ---- helpers ----------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def cast_(self, dtype: torch.dtype) -> "GLM5ForCausalLM":
        """Cast every floating tensor to dtype in place, except KEEP_FP32 (kept fp32)."""
        for name, t in list(self.named_parameters()) + list(self.named_buffers()):
            if t.is_floating_point():
                t.data = t.data.to(torch.float32 if name.endswith(KEEP_FP32) else dtype)
        return self

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, self.config.qk_rope_head_dim, self.config.rope_theta, self.dtype)

    # ---- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        attn_mode: str | None = None,
        indexer_loss: str | None = None,
        mtp_steps: int | None = None,
        mtp_loss_weight: float = 0.1,
        indexer_loss_weight: float = 1.0,
    ) -> CausalLMOutput:
        """Logits of every position; losses when labels are given.

        Args:
            input_ids [B, S] int64 (a 1-D tensor is one row).
            position_ids [B, S]: optional; 0 starts a new packed document (default: one per row).
            labels [B, S]: aligned with input_ids (transformers convention, shifted here): position t
                is trained to predict labels[t+1] of the same document; IGNORE_INDEX (-100) skips.
            attn_mode: one of attention.ATTN_MODES (default self.attn_mode, "sparse").
            indexer_loss: None, "sparse" or "dense" (DSA's two training stages; "dense" implies
                attn_mode "dense"). Its gradient reaches only the indexers (their inputs are detached).
            mtp_steps: MTP depth for the loss (default config.mtp_steps when labels are given and the
                model has an MTP block; 0 disables).
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            position_ids = None if position_ids is None else position_ids[None]
            labels = None if labels is None else labels[None]
        B, S = input_ids.shape
        mode = attn_mode or ("dense" if indexer_loss == "dense" else self.attn_mode)
        if mode not in ATTN_MODES:
            raise ValueError(f"attn_mode must be one of {ATTN_MODES}, got {mode!r}")
        positions, ks, ke = pack_ranges(B, S, input_ids.device, position_ids)
        cos, sin = self.rope(positions)
        ids_T = input_ids.reshape(-1)
        h_TD, idx_loss = self.model(self.model.embed_tokens(ids_T), cos, sin, ks, ke, mode=mode, indexer_loss=indexer_loss)
        logits_TV = self.lm_head(h_TD)
        out = CausalLMOutput(logits=logits_TV.view(B, S, -1), hidden_states=h_TD.view(B, S, -1))
        if idx_loss is not None:
            out.indexer_loss = idx_loss / max(1, B * S)
        if labels is None:
            return out
        labels_T = labels.reshape(-1).to(ids_T.device)
        ends = doc_ends(ks)
        out.lm_loss = cross_entropy(logits_TV, shifted_targets(labels_T, ks, ends, 1))
        loss = out.lm_loss
        steps = self.config.mtp_steps if mtp_steps is None else mtp_steps
        if self.mtp is not None and steps > 0:
            from .mtp import mtp_losses

            out.mtp_losses, mtp_idx_loss = mtp_losses(self, h_TD, ids_T, labels_T, cos, sin, ks, ke, ends, steps,
                                                      mode=mode, indexer_loss=indexer_loss)
            out.mtp_loss = torch.stack(out.mtp_losses).mean()
            loss = loss + mtp_loss_weight * out.mtp_loss
            if mtp_idx_loss is not None:  # the MTP block's indexer trains like the main layers'
                out.indexer_loss = out.indexer_loss + mtp_idx_loss / max(1, B * S)
        if out.indexer_loss is not None:
            loss = loss + indexer_loss_weight * out.indexer_loss
        out.loss = loss
        return out

    # ---- generation -------------------------------------------------------------------------------
    def generate(self, prompts, max_new_tokens, temperature=0.0, top_p=1.0, stop=None, seed=None, **kw):
        """Continue each prompt (a list of token ids): see glm5.model.generate.generate."""
        from .generate import generate

        return generate(self, prompts, max_new_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed, **kw)

    # ---- checkpoints ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device="cpu", **kw) -> "GLM5ForCausalLM":
        from .checkpoint import from_pretrained

        return from_pretrained(path, dtype=dtype, device=device, **kw)

    def save_pretrained(self, path, **kw) -> None:
        from .checkpoint import save_pretrained

        save_pretrained(self, path, **kw)
