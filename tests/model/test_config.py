"""Config presets, validation, the Hugging Face config.json mapping and parameter counts."""

from __future__ import annotations

import dataclasses

import pytest

import glm5.model as M
from glm5.model.config import config_from_hf, config_to_hf


def test_glm5_744b_has_the_released_numbers():
    c = M.preset("glm5-744b")
    assert (c.num_hidden_layers, c.first_k_dense_replace, c.hidden_size, c.num_attention_heads) == (78, 3, 6144, 64)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (2048, 512, 192, 64, 256)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts, c.moe_intermediate_size) == (256, 8, 1, 2048)
    assert c.intermediate_size == 12288
    assert (c.index_n_heads, c.index_head_dim, c.index_topk) == (32, 128, 2048)
    assert (c.vocab_size, c.max_position_embeddings, c.rope_theta) == (154880, 202752, 1e6)
    assert (c.routed_scaling_factor, c.n_group, c.topk_group, c.norm_topk_prob) == (2.5, 1, 1, True)
    assert c.qk_head_dim == 256 and c.softmax_scale == 1 / 16 and c.mqa_qk_dim == 576
    assert c.mlp_layer_types == ["dense"] * 3 + ["sparse"] * 75 and c.indexer_types == ["full"] * 78
    assert c.num_nextn_predict_layers == 1 and c.mtp_steps == 3 and c.mtp_mlp_type == "sparse"


def test_presets_are_fresh_and_exact_names_only():
    a, b = M.preset("debug"), M.preset("debug")
    a.indexer_types[0] = "changed"
    assert b.indexer_types[0] == "full"
    with pytest.raises(ValueError, match="unknown model preset 'glm5'"):
        M.preset("glm5")
    assert M.preset("debug-shared").indexer_types == ["full", "shared", "full", "shared"]


def test_debug_preset_really_sparsifies_at_256():
    c = M.preset("debug")
    assert c.index_topk < 256 and c.vocab_size <= 4096 and c.num_hidden_layers <= 4
    assert M.count_parameters(c)["total"] < 20e6


def test_parameter_counts():
    n = M.count_parameters(M.preset("glm5-744b"))
    assert abs(n["total"] / 744e9 - 1) < 0.02, n  # main layers + embeddings: "744B"
    assert abs(n["active"] / 40e9 - 1) < 0.05, n  # "40B active"
    assert 9e9 < n["mtp"] < 11e9, n  # one MTP block, ~10B (reference section 1.1)
    assert n["experts_per_layer"] == 256 * 3 * 6144 * 2048
    for name in M.PRESETS:
        c = M.count_parameters(M.preset(name))
        assert 0 < c["active"] < c["total"], name


def test_count_parameters_matches_a_real_model():
    cfg = M.preset("debug")
    model = M.GLM5ForCausalLM(cfg)
    real = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    assert M.count_parameters(cfg)["total"] == real
    assert M.count_parameters(cfg)["mtp"] == sum(p.numel() for p in model.mtp.parameters())


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(indexer_types="SFFF"), "indexer_types"),  # layer 0 cannot share
        (dict(indexer_types="FF"), "indexer_types"),  # wrong length
        (dict(indexer_types="FXFF"), "pattern"),
        (dict(n_group=3), "n_group"),  # 16 experts do not split into 3 groups
        (dict(topk_group=2), "topk_group"),  # more groups than exist
        (dict(num_experts_per_tok=17), "num_experts_per_tok"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(index_head_dim=8), "index_head_dim"),  # smaller than the rope part
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_nextn_predict_layers=2), "num_nextn_predict_layers"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()),
)
def test_validation_names_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        M.preset("debug").replace(**change)


def test_hf_config_round_trip():
    for name in M.PRESETS:
        c = M.preset(name)
        back = config_from_hf(config_to_hf(c))
        same = {f.name for f in dataclasses.fields(c)} - {"mtp_steps"}  # a glm5 training knob, not in HF
        assert {k: getattr(back, k) for k in same} == {k: getattr(c, k) for k in same}, name


def test_hf_config_errors_name_the_field():
    good = config_to_hf(M.preset("debug"))
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({**good, "model_type": "deepseek_v3"})
    with pytest.raises(ValueError, match="attention_bias"):
        config_from_hf({**good, "attention_bias": True})
    with pytest.raises(ValueError, match="hidden_act"):
        config_from_hf({**good, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        config_from_hf({**good, "num_key_value_heads": 1})
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        config_from_hf({**good, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})
    with pytest.raises(ValueError, match="indexer_rope_interleave"):
        config_from_hf({**good, "indexer_rope_interleave": False})  # DeepSeek-V3.2's half-split indexer RoPE
    with pytest.raises(ValueError, match="scoring_func"):
        config_from_hf({**good, "scoring_func": "softmax"})
    with pytest.raises(ValueError, match="mystery_knob"):
        config_from_hf({**good, "mystery_knob": 1}, strict=True)
    with pytest.warns(UserWarning, match="mystery_knob"):
        config_from_hf({**good, "mystery_knob": 1})
    with pytest.raises(ValueError, match="indexer_types"):
        config_from_hf({**good, "indexer_types": ["shared"] + good["indexer_types"][1:]})


def test_hf_legacy_rope_and_sharing_fields():
    d = config_to_hf(M.preset("debug"))
    for k in ("rope_parameters", "indexer_types", "mlp_layer_types"):
        del d[k]
    d.update(rope_theta=8e6, index_topk_freq=2, index_skip_topk_offset=1, num_experts=8, rope_interleave=True,
             index_share_for_mtp_iteration=True, scoring_func="sigmoid", topk_method="noaux_tc", ep_size=1)
    c = config_from_hf(d, strict=True)
    assert c.n_routed_experts == 8 and c.index_share_for_mtp_iteration
    assert c.rope_theta == 8e6
    assert c.indexer_types == ["full", "shared", "full", "shared"]
    assert c.mlp_layer_types == ["dense", "sparse", "sparse", "sparse"]
