"""glm5.model: the GLM-5 architecture (MLA + DSA attention, MoE, MTP) and its Hugging Face checkpoints.

    cfg = glm5.model.preset("debug")
    model = glm5.model.GLM5ForCausalLM(cfg)
    logits = model(input_ids).logits                  # [B, S, vocab]
    model = glm5.from_pretrained("path/to/GLM-5", dtype=torch.bfloat16)
    glm5.model.count_parameters(glm5.model.preset("glm5-744b"))   # {"total": ~744e9, ...}
"""

from __future__ import annotations

import torch

from .attention import ATTN_MODES, Indexer, MLAttention, RMSNorm, apply_rope, mha_attention, rope_cos_sin
from .checkpoint import CheckpointError, from_pretrained, load_config, save_pretrained
from .config import PRESETS, ModelConfig, config_from_hf, config_to_hf, preset
from .moe import MLP, MoE
from .mtp import MTPBlock
from .transformer import CausalLMOutput, DecoderLayer, GLM5ForCausalLM, GLM5Model, pack_ranges

__all__ = [
    "ModelConfig", "preset", "PRESETS", "config_from_hf", "config_to_hf", "count_parameters",
    "GLM5ForCausalLM", "GLM5Model", "DecoderLayer", "CausalLMOutput", "MLAttention", "Indexer", "MoE", "MLP",
    "MTPBlock", "RMSNorm", "rope_cos_sin", "apply_rope", "mha_attention", "pack_ranges", "ATTN_MODES",
    "from_pretrained", "save_pretrained", "load_config", "CheckpointError",
]


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of a config, built on the meta device (no memory, no init).

    Returns:
        total: main layers + embedding + output head + final norm, without the MTP block (the
            convention behind GLM-5's "744B", as DeepSeek's "671B").
        active: parameters that multiply each token's activations in the main model: total minus
            the routed experts a token does not visit (E - k per MoE layer) and minus the embedding
            table (a row lookup, not a matmul); the output head counts.
        mtp: the MTP block (its embedding and head are shared with the main model).
        embedding, lm_head, experts_per_layer: the pieces used above.
    """
    with torch.device("meta"):
        model = GLM5ForCausalLM(cfg, init=False)
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    mtp = sum(p.numel() for p in model.mtp.parameters()) if model.mtp is not None else 0
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    n_moe = cfg.mlp_layer_types.count("sparse")
    inactive = n_moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    embedding = cfg.vocab_size * cfg.hidden_size
    lm_head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    return {
        "total": main,
        "active": main - inactive - embedding,
        "mtp": mtp,
        "embedding": embedding,
        "lm_head": lm_head,
        "experts_per_layer": cfg.n_routed_experts * per_expert,
    }
