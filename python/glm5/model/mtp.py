"""Multi-token prediction: GLM-5's one MTP block, applied `mtp_steps` (3) times with shared weights.

Step k (k = 1, 2, ...) at position t, with h^0 = the main model's final-normed hidden state:
    h^k_t = shared_head.norm( Block( eh_proj([enorm(emb(x_{t+k})) ; hnorm(h^{k-1}_t)]) ) )
    logits^k_t = lm_head(h^k_t)   predicts x_{t+k+1}
Block is a full decoder layer (MLA + DSA attention with its own indexer, MoE), causal within the
document. The embedding and the output head are the main model's. The concatenation order
[embedding ; hidden] is the released checkpoint's (vLLM/SGLang's DeepSeek MTP, Megatron's MTP);
carrying the normed output into the next step follows Megatron's MTP (the training side).
Checkpoint names: `model.layers.{num_hidden_layers}.{enorm,hnorm,eh_proj,shared_head.norm}` plus
the decoder layer's own names (`input_layernorm`, `self_attn.*`, `mlp.*`, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import RMSNorm
from .config import ModelConfig
from .transformer import DecoderLayer, cross_entropy, shifted_targets

__all__ = ["MTPBlock", "SharedHead", "mtp_losses", "cross_entropy"]


class SharedHead(nn.Module):
    """The MTP block's own final norm (the head matrix itself is the main model's lm_head)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPBlock(DecoderLayer):
    """One decoder layer plus the MTP input projection and its own output norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, cfg.num_hidden_layers, mlp_type=cfg.mtp_mlp_type, has_indexer=True)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def step(self, h_prev_TD, emb_TD, cos, sin, ks, ke, *, mode="sparse", indexer_loss=None, cache=None,
             prev_topk_TK=None):
        """One MTP step: (h^k [T, D] normed, the top-k it used, indexer loss or None).

        Logits: model.lm_head(h^k). With prev_topk_TK (GLM-5.2's index_share_for_mtp_iteration, steps
        after the first) the block reuses that selection instead of running its indexer.
        """
        x = self.eh_proj(torch.cat([self.enorm(emb_TD), self.hnorm(h_prev_TD)], dim=-1))
        h, topk, loss = DecoderLayer.forward(
            self, x, cos, sin, ks, ke, prev_topk_TK=prev_topk_TK, reuse_topk=prev_topk_TK is not None,
            mode=mode, indexer_loss=indexer_loss, cache=cache,
        )
        return self.shared_head.norm(h), topk, loss


def mtp_losses(
    model, h_TD, ids_T, labels_T, cos, sin, ks, ke, ends, steps: int, *, mode="sparse", indexer_loss=None
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Cross-entropy of each MTP step k = 1..steps (step k predicts labels[t+k+1] of the same document),
    and the MTP block's indexer loss summed over the steps (None unless indexer_loss is set).

    model: the GLM5ForCausalLM (for its embedding, MTP block and head); h_TD: its final-normed hidden;
    ends [T]: one past each token's document end. Inputs past the document end are masked out.
    """
    T = ids_T.shape[0]
    t = torch.arange(T, device=ids_T.device)
    share = model.config.index_share_for_mtp_iteration
    h, topk = h_TD, None
    out, idx_losses = [], []
    for k in range(1, steps + 1):
        src = t + k
        tok = torch.where(src < ends, ids_T[src.clamp(max=max(T - 1, 0))], torch.zeros_like(ids_T))
        h, first_topk, idx_loss = model.mtp.step(h, model.model.embed_tokens(tok), cos, sin, ks, ke, mode=mode,
                                                 indexer_loss=indexer_loss, prev_topk_TK=topk if share else None)
        topk = topk if topk is not None else first_topk
        if idx_loss is not None:
            idx_losses.append(idx_loss)
        out.append(cross_entropy(model.lm_head(h), shifted_targets(labels_T, ks, ends, k + 1)))
    return out, (torch.stack(idx_losses).sum() if idx_losses else None)
