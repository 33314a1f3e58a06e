"""GLM-5 model configuration: one kw-only dataclass, named presets, and the Hugging Face mapping.

Field names follow the Hugging Face `glm_moe_dsa` config (transformers 5.23 `GlmMoeDsaConfig`), so
`config.json` converts both ways without a renaming table. Numbers for `glm5-744b` are the released
ones (../shared/GLM5_REFERENCE.md section 1.1).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelConfig", "preset", "PRESETS", "config_from_hf", "config_to_hf", "indexer_types_from_pattern"]

MODEL_TYPE = "glm_moe_dsa"
ARCHITECTURE = "GlmMoeDsaForCausalLM"


def indexer_types_from_pattern(pattern: str) -> list[str]:
    """'FSFS...' -> ['full', 'shared', ...]: F layers run their own indexer, S layers reuse the top-k
    of the nearest earlier F layer (IndexCache / GLM-5.2 "IndexShare")."""
    table = {"F": "full", "S": "shared"}
    bad = sorted({c for c in pattern if c not in table})
    if bad:
        raise ValueError(f"indexer pattern may only hold 'F' and 'S', got {bad} in {pattern!r}")
    return [table[c] for c in pattern]


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Every number that shapes a GLM-5 model (MLA + DSA attention, sigmoid-routed MoE, MTP)."""

    # ---- sizes -----------------------------------------------------------------------------------
    vocab_size: int = 154880
    hidden_size: int = 6144
    num_hidden_layers: int = 78
    first_k_dense_replace: int = 3  # the first k layers use a dense MLP, the rest MoE
    intermediate_size: int = 12288  # dense MLP width
    # ---- MLA attention ---------------------------------------------------------------------------
    num_attention_heads: int = 64
    q_lora_rank: int = 2048
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 192
    qk_rope_head_dim: int = 64
    v_head_dim: int = 256
    # ---- DSA lightning indexer -------------------------------------------------------------------
    index_n_heads: int = 32
    index_head_dim: int = 128
    index_topk: int = 2048
    # Per layer "full" (own indexer) or "shared" (reuse the previous full layer's top-k); None = all full.
    indexer_types: list[str] | None = None
    # ---- MoE -------------------------------------------------------------------------------------
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2048
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # Per layer "dense" or "sparse"; None = first_k_dense_replace dense layers, then sparse.
    mlp_layer_types: list[str] | None = None
    # ---- MTP -------------------------------------------------------------------------------------
    num_nextn_predict_layers: int = 1  # MTP blocks stored in the checkpoint (layer index num_hidden_layers)
    mtp_steps: int = 3  # GLM-5 applies its one MTP block this many times with shared weights
    # GLM-5.2: MTP steps after the first reuse the first step's indexer top-k (GLM-5: False).
    index_share_for_mtp_iteration: bool = False
    # ---- positions, norms, misc ------------------------------------------------------------------
    max_position_embeddings: int = 202752
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = field(default_factory=lambda: [154820, 154827, 154829])
    pad_token_id: int | None = 154820
    torch_dtype: str = "bfloat16"  # the dtype a checkpoint is written in
    # ---- derived (set in __post_init__) ----------------------------------------------------------
    qk_head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        L = self.num_hidden_layers
        if self.indexer_types is None:
            self.indexer_types = ["full"] * L
        elif isinstance(self.indexer_types, str):
            self.indexer_types = indexer_types_from_pattern(self.indexer_types)
        self.indexer_types = list(self.indexer_types)
        if self.mlp_layer_types is None:
            n_dense = min(self.first_k_dense_replace, L)
            self.mlp_layer_types = ["dense"] * n_dense + ["sparse"] * (L - n_dense)
        self.mlp_layer_types = list(self.mlp_layer_types)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        L = self.num_hidden_layers

        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"ModelConfig.{name}: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "index_n_heads",
                     "index_head_dim", "index_topk", "intermediate_size"):
            need(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", f"must be even, got {self.qk_rope_head_dim}")
        need(self.qk_rope_head_dim <= self.index_head_dim, "index_head_dim",
             f"the indexer ropes its first qk_rope_head_dim={self.qk_rope_head_dim} dims, so it needs at least "
             f"that many, got {self.index_head_dim}")
        need(len(self.indexer_types) == L, "indexer_types", f"needs {L} entries, got {len(self.indexer_types)}")
        need(set(self.indexer_types) <= {"full", "shared"}, "indexer_types",
             f"entries must be 'full' or 'shared', got {sorted(set(self.indexer_types))}")
        need(self.indexer_types[0] == "full", "indexer_types", "layer 0 has no earlier layer to share with: must be 'full'")
        need(len(self.mlp_layer_types) == L, "mlp_layer_types", f"needs {L} entries, got {len(self.mlp_layer_types)}")
        need(set(self.mlp_layer_types) <= {"dense", "sparse"}, "mlp_layer_types",
             f"entries must be 'dense' or 'sparse', got {sorted(set(self.mlp_layer_types))}")
        if "sparse" in self.mlp_layer_types or self.num_nextn_predict_layers:
            need(self.n_routed_experts > 0, "n_routed_experts", "MoE layers need at least one expert")
            need(0 < self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                 f"must be in [1, n_routed_experts={self.n_routed_experts}], got {self.num_experts_per_tok}")
            need(self.n_routed_experts % self.n_group == 0, "n_group",
                 f"n_routed_experts={self.n_routed_experts} must divide into n_group={self.n_group} groups")
            need(0 < self.topk_group <= self.n_group, "topk_group", f"must be in [1, n_group={self.n_group}]")
            per_group = self.n_routed_experts // self.n_group
            need(self.n_group == 1 or per_group >= 2, "n_group", "group scores sum the top 2 experts: groups need >= 2")
            need(self.num_experts_per_tok <= self.topk_group * per_group, "num_experts_per_tok",
                 f"cannot pick {self.num_experts_per_tok} experts from topk_group={self.topk_group} groups of {per_group}")
        need(self.num_nextn_predict_layers in (0, 1), "num_nextn_predict_layers",
             f"GLM-5 has 0 or 1 MTP block, got {self.num_nextn_predict_layers}")
        need(self.mtp_steps >= 0, "mtp_steps", f"must be >= 0, got {self.mtp_steps}")

    # ---- derived quantities -----------------------------------------------------------------------
    @property
    def mqa_qk_dim(self) -> int:
        """Key width of the absorbed (MQA) form: latent + rope (576 in GLM-5)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5

    @property
    def mtp_mlp_type(self) -> str:
        """The MTP block is the layer after the last one: MoE when that index is past the dense layers."""
        return "sparse" if self.num_hidden_layers >= self.first_k_dense_replace else "dense"

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed; per-layer lists are re-derived unless given."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        if "num_hidden_layers" in changes or "first_k_dense_replace" in changes:
            d["mlp_layer_types"] = None
            if "num_hidden_layers" in changes:
                d["indexer_types"] = None
        d.update(changes)
        return ModelConfig(**d)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# ---------------------------------------------------------------------------------------------------
# Presets: functions returning full configs (STYLE practice 23). Exact-name lookup only.
# ---------------------------------------------------------------------------------------------------


def _glm5_744b() -> ModelConfig:
    """The released GLM-5 (zai-org/GLM-5 config.json): 744B total, ~40B active."""
    return ModelConfig()


def _glm5_medium() -> ModelConfig:
    """GLM-5's per-head shapes (MQA 576/512, indexer 128-d, top-2048) at ~1/3 width and depth."""
    return ModelConfig(
        hidden_size=2048, num_hidden_layers=24, first_k_dense_replace=2, intermediate_size=6144,
        num_attention_heads=16, q_lora_rank=1024, kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64,
        v_head_dim=256, index_n_heads=16, index_head_dim=128, index_topk=2048,
        n_routed_experts=64, num_experts_per_tok=8, moe_intermediate_size=1024,
        max_position_embeddings=131072,
    )


def _glm5_small() -> ModelConfig:
    """A single-GPU research size with the real vocabulary and every GLM-5 mechanism."""
    return ModelConfig(
        hidden_size=1024, num_hidden_layers=16, first_k_dense_replace=1, intermediate_size=2816,
        num_attention_heads=8, q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, index_n_heads=8, index_head_dim=64, index_topk=512,
        n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
        max_position_embeddings=32768,
    )


def _debug() -> ModelConfig:
    """Trains in minutes on 2 CPU cores; index_topk=64 so DSA really sparsifies at sequence 256."""
    return ModelConfig(
        vocab_size=4096, hidden_size=256, num_hidden_layers=4, first_k_dense_replace=1, intermediate_size=768,
        num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, index_n_heads=4, index_head_dim=32, index_topk=64,
        n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=128,
        max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, pad_token_id=1, torch_dtype="float32",
    )


def _debug_shared() -> ModelConfig:
    """The debug model with IndexCache-style indexer sharing (layers F S F S)."""
    return _debug().replace(indexer_types="FSFS")


PRESETS = {
    "debug": _debug,
    "debug-shared": _debug_shared,
    "glm5-small": _glm5_small,
    "glm5-medium": _glm5_medium,
    "glm5-744b": _glm5_744b,
}


def preset(name: str) -> ModelConfig:
    """A fresh config for a named preset: one of PRESETS (exact names, no fuzzy matching)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None


# ---------------------------------------------------------------------------------------------------
# Hugging Face config.json <-> ModelConfig
# ---------------------------------------------------------------------------------------------------

# HF fields glm5 reads directly (same name, same meaning).
_SAME = (
    "vocab_size", "hidden_size", "num_hidden_layers", "first_k_dense_replace", "intermediate_size",
    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
    "moe_intermediate_size", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor",
    "num_nextn_predict_layers", "index_share_for_mtp_iteration", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
)
# HF fields whose value glm5 does not model: accepted only at these values (anything else is an error).
_FIXED = {
    "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "attention_dropout": 0.0,
    "rope_interleave": True, "indexer_rope_interleave": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    "moe_layer_freq": 1, "moe_router_dtype": "float32",
}
# HF fields that carry no information for glm5 (derived, runtime or bookkeeping).
_IGNORED = {
    "architectures", "model_type", "transformers_version", "use_cache", "layer_types", "head_dim", "qk_head_dim",
    "num_key_value_heads", "output_router_logits", "keys_to_ignore_at_inference", "quantization_config",
    "auto_map", "_name_or_path", "output_attentions", "output_hidden_states", "return_dict", "dtype", "torch_dtype",
    "index_topk_pattern", "index_topk_freq", "index_skip_topk_offset", "rope_parameters", "rope_theta",
    "rope_scaling", "partial_rotary_factor", "indexer_types", "mlp_layer_types", "num_local_experts", "num_experts",
    "ep_size", "pretraining_tp", "generation_config", "chunk_size_feed_forward", "is_encoder_decoder", "tie_encoder_decoder",
    "id2label", "label2id", "problem_type", "tokenizer_class", "pruned_heads", "torchscript", "task_specific_params",
    "add_cross_attention", "cross_attention_hidden_size", "finetuning_task", "prefix", "sep_token_id",
    "decoder_start_token_id", "is_decoder", "tf_legacy_loss", "use_bfloat16", "bad_words_ids",
}


def _hf_indexer_types(d: dict[str, Any], L: int) -> list[str]:
    """Per-layer indexer mode exactly as transformers 5.23 derives it."""
    if d.get("indexer_types") is not None:
        return list(d["indexer_types"])
    pattern = d.get("index_topk_pattern")
    if pattern is not None:
        return indexer_types_from_pattern(pattern) if isinstance(pattern, str) else list(pattern)
    freq = max(int(d.get("index_topk_freq", 1)), 1)
    offset = int(d.get("index_skip_topk_offset", 2))
    return ["full" if (max(i - offset + 1, 0) % freq) == 0 else "shared" for i in range(L)]


def _hf_rope_theta(d: dict[str, Any]) -> float:
    rp = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    rope_type = rp.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise ValueError(f"config.json: rope type {rope_type!r} is not supported (GLM-5 uses 'default' RoPE)")
    theta = rp.get("rope_theta", d.get("rope_theta"))
    if theta is None:
        raise ValueError("config.json: missing field 'rope_theta' (or rope_parameters.rope_theta)")
    return float(theta)


def config_from_hf(d: dict[str, Any], *, strict: bool = False) -> ModelConfig:
    """ModelConfig from a parsed `glm_moe_dsa` config.json. Errors name the offending field.

    Fields glm5 does not know are an error with strict=True and a warning otherwise (a newer
    transformers may add bookkeeping fields); fields that would change the math are always checked.
    """
    if d.get("model_type") != MODEL_TYPE:
        raise ValueError(f"config.json: model_type must be {MODEL_TYPE!r}, got {d.get('model_type')!r}")
    for name, want in _FIXED.items():
        if name in d and d[name] != want:
            raise ValueError(f"config.json: {name}={d[name]!r} is not supported (glm5 implements {name}={want!r})")
    heads, kv_heads = d.get("num_attention_heads"), d.get("num_key_value_heads")
    if kv_heads is not None and heads is not None and kv_heads != heads:
        raise ValueError(f"config.json: num_key_value_heads={kv_heads} must equal num_attention_heads={heads} (MLA)")
    unknown = sorted(k for k in d if k not in _SAME and k not in _FIXED and k not in _IGNORED)
    if unknown:
        if strict:
            raise ValueError(f"config.json: unknown field(s) {unknown}")
        warnings.warn(f"config.json: ignoring field(s) glm5 does not model: {unknown}", stacklevel=2)
    kw: dict[str, Any] = {k: d[k] for k in _SAME if k in d}
    for alias in ("num_local_experts", "num_experts"):  # transformers' aliases of n_routed_experts
        if d.get(alias) is not None:
            kw["n_routed_experts"] = d[alias]
    kw.setdefault("num_nextn_predict_layers", 0)
    L = int(kw.get("num_hidden_layers", ModelConfig.__dataclass_fields__["num_hidden_layers"].default))
    kw["indexer_types"] = _hf_indexer_types(d, L)
    if d.get("mlp_layer_types") is not None:
        kw["mlp_layer_types"] = list(d["mlp_layer_types"])
    kw["rope_theta"] = _hf_rope_theta(d)
    dtype = d.get("dtype", d.get("torch_dtype"))
    if dtype is not None:
        kw["torch_dtype"] = str(dtype).removeprefix("torch.")
    try:
        return ModelConfig(**kw)
    except ValueError as e:
        raise ValueError(f"config.json: {e}") from None


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The `glm_moe_dsa` config.json dict for cfg (loads in transformers 5.23 as GlmMoeDsaConfig)."""
    d: dict[str, Any] = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE}
    d.update({k: getattr(cfg, k) for k in _SAME})
    d.update(_FIXED)
    d["num_key_value_heads"] = cfg.num_attention_heads
    d["head_dim"] = cfg.qk_rope_head_dim  # what transformers derives; kept for readers that expect it
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    d["indexer_types"] = list(cfg.indexer_types)
    d["mlp_layer_types"] = list(cfg.mlp_layer_types)
    d["dtype"] = cfg.torch_dtype
    return d
