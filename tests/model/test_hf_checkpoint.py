"""Hugging Face checkpoint I/O: exact round trips, the per-expert and MTP layout, FP8 block scales,
and clear errors for corrupt or mismatched checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

import glm5
from glm5.model import CheckpointError, GLM5ForCausalLM
from model_helpers import tiny_config

safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture
def saved(tmp_path):
    """A random tiny model with an MTP block, saved as one safetensors file."""
    cfg = tiny_config(indexer_types="FSF")
    torch.manual_seed(0)
    model = GLM5ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in list(model.model.layers[1:]) + [model.mtp]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    return model, path


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(safetensors_torch.load_file(f))
    return out


def _rewrite(path, fn, config_fn=None):
    """Apply fn to the single-file checkpoint's tensor dict (and config_fn to config.json)."""
    f = path / "model.safetensors"
    t = safetensors_torch.load_file(f)
    fn(t)
    safetensors_torch.save_file(t, f)
    if config_fn is not None:
        cfg = json.loads((path / "config.json").read_text())
        config_fn(cfg)
        (path / "config.json").write_text(json.dumps(cfg))


def test_round_trip_is_exact_and_sharded(saved, tmp_path):
    model, path = saved
    loaded = glm5.from_pretrained(path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # write again in small shards: the same tensors under the same names, plus the index file
    sharded = tmp_path / "sharded"
    loaded.save_pretrained(sharded, max_shard_bytes=64 * 1024)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    first, second = _tensors(path), _tensors(sharded)
    assert set(index["weight_map"]) == set(first) == set(second)
    for k in first:
        assert torch.equal(first[k], second[k]), k
    again = glm5.from_pretrained(sharded)
    ids = torch.randint(0, model.config.vocab_size, (2, 30))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_layout_per_expert_and_mtp_at_layer_n(saved):
    model, path = saved
    cfg, t = model.config, _tensors(path)
    Fi, N = cfg.moe_intermediate_size, cfg.num_hidden_layers
    gu = model.model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(t["model.layers.1.mlp.experts.3.gate_proj.weight"], gu[3, :Fi])
    assert torch.equal(t["model.layers.1.mlp.experts.3.up_proj.weight"], gu[3, Fi:])
    assert torch.equal(t["model.layers.1.mlp.experts.3.down_proj.weight"], model.model.layers[1].mlp.experts.down_proj[3])
    assert not any(".experts.gate_up_proj" in k for k in t)
    for k in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight",
              "self_attn.indexer.wk.weight", "mlp.experts.7.down_proj.weight", "mlp.gate.e_score_correction_bias"):
        assert f"model.layers.{N}.{k}" in t, k
    assert "model.layers.1.self_attn.indexer.wk.weight" not in t  # a shared-indexer layer has none
    assert t["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "glm_moe_dsa" and config["num_nextn_predict_layers"] == 1
    assert config["indexer_types"] == ["full", "shared", "full"]


def test_mtp_is_optional(saved):
    model, path = saved
    assert glm5.from_pretrained(path, mtp=False).mtp is None
    N = model.config.num_hidden_layers
    _rewrite(path, lambda t: [t.pop(k) for k in list(t) if k.startswith(f"model.layers.{N}.")])
    loaded = glm5.from_pretrained(path)  # num_nextn_predict_layers=1 but no MTP weights: loaded without it
    assert loaded.mtp is None


def _quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise e4m3 quantization as DeepSeek/GLM FP8 checkpoints store it."""
    O, I = w.shape
    bo, bi = block
    s = torch.empty(math.ceil(O / bo), math.ceil(I / bi))
    q = torch.empty(O, I, dtype=torch.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi]
            s[i, j] = blk.abs().max().clamp(min=1e-12) / 448.0
            q[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


@pytest.mark.parametrize("block", [(128, 128), (16, 32)], ids=str)
def test_fp8_block_scales_are_dequantized(saved, block):
    model, path = saved
    expected = {}

    def quantize(t):
        for k in [k for k in t if k.endswith("_proj.weight") and "weights_proj" not in k and ".layers." in k]:
            q, s = _quantize(t[k], block)
            t[k], t[k + "_scale_inv"] = q, s
            deq = torch.empty(q.shape)
            for i in range(s.shape[0]):  # the dequantised weight, block by block
                for j in range(s.shape[1]):
                    sl = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
                    deq[sl] = q[sl].float() * s[i, j]
            expected[k] = deq

    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    _rewrite(path, quantize, lambda c: c.update(quantization_config=qc))
    loaded = glm5.from_pretrained(path, dtype=torch.float32)
    Fi, N = model.config.moe_intermediate_size, model.config.num_hidden_layers
    assert torch.equal(loaded.model.layers[0].self_attn.q_a_proj.weight, expected["model.layers.0.self_attn.q_a_proj.weight"])
    assert torch.equal(loaded.model.layers[2].mlp.experts.gate_up_proj[5, Fi:], expected["model.layers.2.mlp.experts.5.up_proj.weight"])
    assert torch.equal(loaded.mtp.eh_proj.weight, expected[f"model.layers.{N}.eh_proj.weight"])
    err = (loaded.model.layers[0].self_attn.q_a_proj.weight - model.model.layers[0].self_attn.q_a_proj.weight).abs().max()
    assert 0 < err < 0.1 * model.model.layers[0].self_attn.q_a_proj.weight.abs().max()  # quantized, but close


def _drop(key):
    return lambda t: t.pop(key)


@pytest.mark.parametrize(
    "name, edit, config_edit, match",
    [
        ("missing-tensor", _drop("model.layers.0.self_attn.kv_b_proj.weight"), None, r"missing.*layers\.0\.self_attn\.kv_b_proj"),
        ("missing-expert", _drop("model.layers.2.mlp.experts.6.up_proj.weight"), None, r"missing.*experts\.6\.up_proj"),
        ("missing-mtp-part", _drop("model.layers.3.hnorm.weight"), None, r"missing.*layers\.3\.hnorm"),
        ("wrong-shape", lambda t: t.update({"model.norm.weight": torch.ones(65)}), None, r"model\.norm\.weight.*\(65,\).*\(64,\)"),
        ("unexpected-tensor", lambda t: t.update({"model.layers.1.mlp.extra.weight": torch.ones(2)}), None,
         r"unexpected tensor model\.layers\.1\.mlp\.extra\.weight"),
        ("extra-expert", lambda t: t.update({"model.layers.1.mlp.experts.8.up_proj.weight": torch.ones(32, 64)}), None,
         r"unexpected tensor model\.layers\.1\.mlp\.experts\.8"),
        ("unknown-model-type", lambda t: None, lambda c: c.update(model_type="deepseek_v32"), "model_type"),
        ("config-mismatch", lambda t: None, lambda c: c.update(q_lora_rank=40), r"q_a_proj\.weight.*shape"),
        ("mtp-without-config", lambda t: None, lambda c: c.update(num_nextn_predict_layers=0), r"unexpected tensor model\.layers\.3\."),
        ("fp8-without-scale", lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.float8_e4m3fn)}), None,
         r"model\.norm\.weight.*_scale_inv is missing"),
        ("bad-scale-shape", lambda t: t.update({
            "model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn),
            "model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(2, 2)}), None, r"up_proj\.weight_scale_inv has shape"),
        ("indexer-on-shared-layer", lambda t: t.update({"model.layers.1.self_attn.indexer.wk.weight": torch.ones(32, 64)}), None,
         r"unexpected tensor model\.layers\.1\.self_attn\.indexer\.wk"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_corrupt_checkpoints_name_the_problem(saved, name, edit, config_edit, match):
    _, path = saved
    _rewrite(path, edit, config_edit)
    with pytest.raises((CheckpointError, ValueError), match=match):
        glm5.from_pretrained(path)


def test_sharded_index_naming_a_missing_shard(saved, tmp_path):
    model, _ = saved
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_bytes=64 * 1024)
    victim = sorted(out.glob("model-*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        glm5.from_pretrained(out)


def test_deepseek_style_mtp_copies_of_embedding_and_head(saved):
    model, path = saved
    N = model.config.num_hidden_layers
    emb, head = model.model.embed_tokens.weight.detach(), model.lm_head.weight.detach()
    _rewrite(path, lambda t: t.update({f"model.layers.{N}.embed_tokens.weight": emb.clone(),
                                       f"model.layers.{N}.shared_head.head.weight": head.clone()}))
    assert glm5.from_pretrained(path).mtp is not None  # equal copies: accepted
    _rewrite(path, lambda t: t.update({f"model.layers.{N}.shared_head.head.weight": head + 1}))
    with pytest.raises(CheckpointError, match="shared_head.head.weight differs"):
        glm5.from_pretrained(path)


def test_bf16_load_keeps_fp32_islands(saved):
    _, path = saved
    m = glm5.from_pretrained(path, dtype="bfloat16")
    assert m.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.bfloat16
    assert m.model.layers[0].self_attn.indexer.weights_proj.weight.dtype == torch.float32
    assert m.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
