"""Tiny configs and shared checks for the model tests."""

from __future__ import annotations

import torch

import glm5
from glm5.model import ModelConfig
from glm5.ops import reference


def tiny_config(**kw) -> ModelConfig:
    """A few-thousand-parameter GLM-5: 3 layers (1 dense), 4 heads, 8 experts, top-16 indexer."""
    base = dict(
        vocab_size=128, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=96,
        num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, index_n_heads=8, index_head_dim=32, index_topk=16, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=256, rope_theta=10000.0,
        eos_token_id=1, pad_token_id=None, torch_dtype="float32",
    )
    base.update(kw)
    return ModelConfig(**base)


def hf_kwargs(cfg: ModelConfig) -> dict:
    """GlmMoeDsaConfig keyword arguments for the same model (eager attention, fp32)."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
        n_routed_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim, index_topk=cfg.index_topk,
        index_head_dim=cfg.index_head_dim, index_n_heads=cfg.index_n_heads,
        first_k_dense_replace=cfg.first_k_dense_replace, indexer_types=list(cfg.indexer_types),
        n_group=cfg.n_group, topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling_factor,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, attn_implementation="eager",
    )


class TopkTieProbe:
    """Wraps glm5.ops.indexer_topk to record, per call, whether any query has a tie at the top-k
    boundary (the K-th and (K+1)-th best visible keys score the same): there the choice is
    arbitrary and transformers' torch.topk may pick another key than glm5 (../shared/BUILD_NOTES.md)."""

    def __init__(self, monkeypatch) -> None:
        self.ties: list[int] = []
        self.calls = 0
        inner = glm5.ops.indexer_topk

        def probe(q, k, w, ks, ke, topk):
            self.calls += 1
            logits = reference.indexer_logits(q, k, w, ks, ke)
            vals = logits.sort(dim=1, descending=True).values
            if vals.shape[1] > topk:
                boundary = (vals[:, topk - 1] == vals[:, topk]) & torch.isfinite(vals[:, topk])
                self.ties.append(int(boundary.sum()))
            return inner(q, k, w, ks, ke, topk)

        monkeypatch.setattr(glm5.ops, "indexer_topk", probe)

    def assert_no_ties(self) -> None:
        assert self.calls > 0, "the indexer never ran"
        assert sum(self.ties) == 0, f"the draw has top-k boundary ties {self.ties}: choose another seed"
