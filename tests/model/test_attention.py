"""MLA + DSA attention: the absorbed and expanded forms agree, RoPE is transformers', documents stay
separate, indexer sharing, the indexer loss trains only the indexer, and a cached decode reproduces
the full forward."""

from __future__ import annotations

import pytest
import torch

import glm5
from glm5.model import GLM5ForCausalLM, MLAttention, mha_attention, pack_ranges
from glm5.model.attention import apply_rope, rope_cos_sin
from model_helpers import tiny_config


def _layer_inputs(cfg, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, cfg.hidden_size, generator=g)
    positions, ks, ke = pack_ranges(1, T, x.device)
    cos, sin = rope_cos_sin(positions, cfg.qk_rope_head_dim, cfg.rope_theta, x.dtype)
    return x, cos, sin, ks, ke


def _attn(cfg, has_indexer=True, seed=0):
    torch.manual_seed(seed)
    model = GLM5ForCausalLM(cfg.replace(num_hidden_layers=1, num_nextn_predict_layers=0))
    attn = model.model.layers[0].self_attn
    assert isinstance(attn, MLAttention)
    if not has_indexer:
        attn.indexer = None
    return attn


def test_absorbed_equals_expanded_on_the_same_selection():
    cfg = tiny_config()
    attn = _attn(cfg)
    x, cos, sin, ks, ke = _layer_inputs(cfg, 40)
    with torch.no_grad():
        sparse = attn(x, cos, sin, ks, ke, mode="sparse")
        mha = attn(x, cos, sin, ks, ke, mode="sparse_mha")
    assert torch.equal(sparse.topk_TK, mha.topk_TK)
    assert int((sparse.topk_TK >= 0).sum(1).max()) == cfg.index_topk  # really sparse at 40 > 16 tokens
    torch.testing.assert_close(sparse.out_TD, mha.out_TD, atol=1e-5, rtol=1e-5)


def test_sparse_equals_dense_when_every_key_fits_in_topk():
    cfg = tiny_config(index_topk=64)
    attn = _attn(cfg)
    x, cos, sin, ks, ke = _layer_inputs(cfg, 40)
    with torch.no_grad():
        sparse = attn(x, cos, sin, ks, ke, mode="sparse").out_TD
        dense = attn(x, cos, sin, ks, ke, mode="dense").out_TD
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)


def test_mha_attention_lse_and_empty_rows_match_sparse_mla():
    g = torch.Generator().manual_seed(1)
    T, H, L, R = 9, 3, 12, 4
    q = torch.randn(T, H, L + R, generator=g)
    kv = torch.randn(T, L + R, generator=g)
    ks = torch.tensor([0, 0, 0, 3, 3, 3, 3, 7, 8], dtype=torch.int32)
    ke = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 8], dtype=torch.int32)  # last query sees no key
    all_keys = torch.arange(T, dtype=torch.int32).expand(T, T)
    idx = torch.where((all_keys >= ks[:, None]) & (all_keys < ke[:, None]), all_keys, torch.full_like(all_keys, -1))
    out_s, lse_s = glm5.ops.sparse_mla(q, kv, idx, 0.3, L)
    # the absorbed form's keys/values seen as a 1-head-per-query expanded form
    out_m, lse_m = mha_attention(q, kv[:, None, :].expand(T, H, L + R), kv[:, None, :L].expand(T, H, L), ks, ke, 0.3)
    torch.testing.assert_close(out_m, out_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_m, lse_s, atol=1e-5, rtol=1e-5)
    assert torch.isinf(lse_m[-1]).all() and (out_m[-1] == 0).all()


def test_rope_is_transformers_interleaved_rope():
    hf = pytest.importorskip("transformers.models.glm_moe_dsa.modeling_glm_moe_dsa")
    import transformers

    cfg = tiny_config()
    hf_cfg = transformers.GlmMoeDsaConfig(
        qk_rope_head_dim=cfg.qk_rope_head_dim, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}
    )
    pos = torch.tensor([0, 1, 5, 77, 255])
    cos_hf, sin_hf = hf.GlmMoeDsaRotaryEmbedding(hf_cfg)(torch.zeros(1), pos[None])
    cos, sin = rope_cos_sin(pos, cfg.qk_rope_head_dim, cfg.rope_theta, torch.float32)
    q, k = torch.randn(5, 3, cfg.qk_rope_head_dim), torch.randn(5, cfg.qk_rope_head_dim)
    q_hf, k_hf = hf.apply_rotary_pos_emb_interleave(q[None], k[None, :, None], cos_hf, sin_hf, unsqueeze_dim=2)
    assert torch.equal(apply_rope(q, cos[:, None], sin[:, None]), q_hf[0])
    assert torch.equal(apply_rope(k, cos, sin), k_hf[0, :, 0])


def test_packed_documents_stay_separate():
    """Two documents packed in one row (position_ids restart at 0) == the two as separate rows."""
    cfg = tiny_config(indexer_types="FSF")
    torch.manual_seed(0)
    model = GLM5ForCausalLM(cfg).eval()
    a, b = torch.randint(0, cfg.vocab_size, (1, 30)), torch.randint(0, cfg.vocab_size, (1, 26))
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(30), torch.arange(26)])[None]
    with torch.no_grad():
        together = model(packed, position_ids=pos).logits
        la, lb = model(a).logits, model(b).logits
    torch.testing.assert_close(together[:, :30], la, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[:, 30:], lb, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="position_ids"):
        model(packed, position_ids=pos + 1)


def test_shared_layers_reuse_the_previous_topk(monkeypatch):
    cfg = tiny_config(indexer_types="FSS", num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = GLM5ForCausalLM(cfg).eval()
    assert [layer.self_attn.indexer is not None for layer in model.model.layers] == [True, False, False]
    seen = []
    inner = glm5.ops.sparse_mla
    monkeypatch.setattr(glm5.ops, "sparse_mla", lambda q, kv, idx, *a: seen.append(idx) or inner(q, kv, idx, *a))
    calls = []
    inner_topk = glm5.ops.indexer_topk
    monkeypatch.setattr(glm5.ops, "indexer_topk", lambda *a: calls.append(1) or inner_topk(*a))
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (2, 24)))
    assert len(calls) == 1 and len(seen) == 3  # one indexer run, its selection used by all 3 layers
    assert seen[0] is seen[1] is seen[2]
    attn = model.model.layers[1].self_attn
    x, cos, sin, ks, ke = _layer_inputs(cfg, 8)
    with pytest.raises(ValueError, match="shares its indexer"):
        attn(x, cos, sin, ks, ke, mode="sparse")


def test_indexer_loss_trains_only_the_indexer():
    cfg = tiny_config()
    attn = _attn(cfg)
    x, cos, sin, ks, ke = _layer_inputs(cfg, 40)
    x.requires_grad_(True)
    for stage, mode in (("sparse", "sparse"), ("dense", "dense")):
        attn.zero_grad()
        x.grad = None
        out = attn(x, cos, sin, ks, ke, mode=mode, indexer_loss=stage)
        assert out.indexer_loss is not None and out.indexer_loss.item() > 0
        out.indexer_loss.backward()
        idx_params = {id(p) for p in attn.indexer.parameters()}
        for name, p in attn.named_parameters():
            if id(p) in idx_params and name != "indexer.k_norm.bias":
                assert p.grad is not None and p.grad.abs().sum() > 0, (stage, name)
            elif id(p) not in idx_params:
                assert p.grad is None or p.grad.abs().sum() == 0, (stage, name)
        assert x.grad is None or x.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="dense indexer loss"):
        attn(x, cos, sin, ks, ke, mode="sparse", indexer_loss="dense")


class _ListCache:
    """The smallest KV cache: the latent and the indexer key of every token seen so far."""

    def __init__(self):
        self.kv, self.k = None, None

    def update(self, layer_idx, kv, k):
        self.kv = kv if self.kv is None else torch.cat([self.kv, kv])
        self.k = k if self.k is None else torch.cat([self.k, k])
        return self.kv, self.k


@pytest.mark.parametrize("mode", ["sparse", "sparse_mha", "dense"])
def test_cached_decode_reproduces_the_full_forward(mode):
    """The layer is a function of (x, positions, ks/ke, cache): one token at a time against a cache
    of latents gives the full-sequence output (what incremental generation will rely on)."""
    cfg = tiny_config()
    attn = _attn(cfg)
    T = 24
    x, cos, sin, ks, ke = _layer_inputs(cfg, T)
    with torch.no_grad():
        full = attn(x, cos, sin, ks, ke, mode=mode).out_TD
        cache, steps = _ListCache(), []
        prefill = 10
        steps.append(attn(x[:prefill], cos[:prefill], sin[:prefill], ks[:prefill], ke[:prefill], mode=mode, cache=cache).out_TD)
        for t in range(prefill, T):
            one = slice(t, t + 1)
            steps.append(attn(x[one], cos[one], sin[one], ks[one], ke[one], mode=mode, cache=cache).out_TD)
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-5, rtol=1e-5)


def test_bf16_model_keeps_fp32_islands_and_runs():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = GLM5ForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20))  # <= topk: no selection to flip under rounding
    with torch.no_grad():
        ref = model(ids).logits
        model.cast_(torch.bfloat16)
        assert model.model.layers[0].self_attn.indexer.weights_proj.weight.dtype == torch.float32
        assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
        assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
        out = model(ids).logits
    assert out.dtype == torch.bfloat16
    assert float((out.float() - ref).abs().max()) < 0.05 * float(ref.abs().max())
