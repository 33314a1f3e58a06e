"""Muon (Newton-Schulz, RMS matching, Muon Split, expert stacks), its AdamW groups, name rules, exact resume."""

from __future__ import annotations

import copy
import io
import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from glm5.train.optim import (
    Muon,
    OptimConfig,
    ParamRule,
    build_optimizer,
    describe,
    muon_update,
    newton_schulz5,
    param_groups,
)


@dataclass
class Case:
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __str__(self):
        return "x".join(map(str, self.shape)) + f"-{str(self.dtype).removeprefix('torch.')}"


NS_CASES = [
    Case((64, 160), torch.float32),  # wide
    Case((160, 64), torch.float32),  # tall (transposed inside)
    Case((96, 256), torch.bfloat16),
    Case((3, 48, 120), torch.bfloat16),  # a stack of matrices (experts)
]


def rms(x: torch.Tensor) -> float:
    return x.float().pow(2).mean().sqrt().item()


@pytest.mark.parametrize("case", NS_CASES, ids=str)
def test_newton_schulz_singular_values_near_one(case):
    G = torch.randn(case.shape)
    X = newton_schulz5(G, dtype=case.dtype).float()
    s = torch.linalg.svdvals(X)
    # quintic NS5 band (Keller Jordan): roughly [0.7, 1.2] for matrices of moderate condition number
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    # same singular vectors: X ~ U V^T of G
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert (torch.nn.functional.cosine_similarity((U @ Vh).flatten(-2), X.flatten(-2), dim=-1) > 0.97).all()


@pytest.mark.parametrize("case", NS_CASES, ids=str)
def test_update_rms_matches_target(case):
    u = muon_update(torch.randn(case.shape), dtype=case.dtype, rms_scale=0.2)
    assert u.dtype == torch.float32 and u.shape == case.shape
    assert 0.16 < rms(u) < 0.22  # 0.2 x the RMS of NS5's singular values (~0.9)
    assert 0.08 < rms(muon_update(torch.randn(case.shape), dtype=case.dtype, rms_scale=0.1)) < 0.11


def test_muon_step_update_rms_and_decoupled_decay():
    p = nn.Parameter(torch.randn(96, 200))
    before = p.detach().clone()
    opt = Muon([p], lr=1.0, weight_decay=0.0)
    p.grad = torch.randn_like(p)
    opt.step()
    assert 0.16 < rms(p.detach() - before) < 0.22
    # zero gradient: the step is pure decoupled decay
    q = nn.Parameter(torch.randn(8, 16))
    q0 = q.detach().clone()
    opt = Muon([q], lr=0.1, weight_decay=0.5)
    q.grad = torch.zeros_like(q)
    opt.step()
    assert torch.allclose(q.detach(), q0 * (1 - 0.1 * 0.5))


def test_muon_momentum_nesterov_reference():
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(12, 20, dtype=torch.float64))
    ref = p.detach().clone()
    buf = torch.zeros_like(ref)
    opt = Muon([p], lr=0.05, weight_decay=0.1, momentum=0.9, ns_dtype="float64")
    for _ in range(3):
        g = torch.randn_like(ref)
        p.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + g
        nest = g + 0.9 * buf
        ref = ref * (1 - 0.05 * 0.1) - 0.05 * newton_schulz5(nest, dtype=torch.float64) * 0.2 * math.sqrt(20)
    assert torch.allclose(p.detach(), ref, atol=1e-12)


def test_muon_split_equals_per_block():
    H, r, cols = 4, 24, 40
    g = torch.randn(H * r, cols)
    split = muon_update(g, split_rows=r, dtype=torch.float32)
    blocks = torch.cat([muon_update(g[h * r:(h + 1) * r], dtype=torch.float32) for h in range(H)])
    assert torch.equal(split, blocks)
    whole = muon_update(g, dtype=torch.float32)
    assert (split - whole).abs().max() > 0.05  # per-head orthogonalisation is a different update
    # each head's block is itself orthogonal-ish and has the target RMS
    for h in range(H):
        s = torch.linalg.svdvals(split[h * r:(h + 1) * r] / (0.2 * math.sqrt(max(r, cols))))
        assert s.min() > 0.6 and s.max() < 1.25
        assert 0.16 < rms(split[h * r:(h + 1) * r]) < 0.22


def test_muon_split_pattern_kv_b():
    """kv_b_proj [H*(d_nope+d_v), kv_lora]: W_UK and W_UV of every head orthogonalised apart."""
    H, d_nope, d_v, cols = 3, 8, 12, 32
    g = torch.randn(H * (d_nope + d_v), cols)
    u = muon_update(g, split_rows=(d_nope, d_v), dtype=torch.float32)
    parts = []
    for h in range(H):
        blk = g[h * (d_nope + d_v):(h + 1) * (d_nope + d_v)]
        parts += [muon_update(blk[:d_nope], dtype=torch.float32), muon_update(blk[d_nope:], dtype=torch.float32)]
    assert torch.equal(u, torch.cat(parts))
    assert not torch.equal(u, muon_update(g, split_rows=d_nope + d_v, dtype=torch.float32))


def test_split_must_tile():
    with pytest.raises(ValueError, match="does not tile"):
        muon_update(torch.randn(10, 4), split_rows=3)
    with pytest.raises(ValueError, match="does not tile"):
        Muon([{"params": [nn.Parameter(torch.randn(10, 4))], "split_rows": (3, 3)}])


def test_expert_stack_is_per_expert():
    g = torch.randn(5, 16, 24)
    u = muon_update(g, dtype=torch.float32)
    assert torch.equal(u, torch.stack([muon_update(g[e], dtype=torch.float32) for e in range(5)]))
    us = muon_update(g, split_rows=8, dtype=torch.float32)
    assert torch.equal(us[2], muon_update(g[2], split_rows=8, dtype=torch.float32))


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(2)
    w = nn.Parameter(torch.randn(7, 5))
    b = nn.Parameter(torch.randn(5))
    w2, b2 = (nn.Parameter(t.detach().clone()) for t in (w, b))
    ours = Muon([{"params": [w, b], "use_muon": False}], lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    theirs = torch.optim.AdamW([w2, b2], lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for _ in range(5):
        gw, gb = torch.randn_like(w), torch.randn_like(b)
        w.grad, b.grad, w2.grad, b2.grad = gw, gb, gw.clone(), gb.clone()
        ours.step()
        theirs.step()
    assert torch.equal(w, w2) and torch.equal(b, b2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="ns_dtype"):
        Muon([nn.Parameter(torch.randn(3, 3))], ns_dtype="fp8")
    with pytest.raises(ValueError, match="matrices"):
        Muon([nn.Parameter(torch.randn(3))])


# --------------------------------------------------------------------------------------------------
# Parameter groups from HF glm_moe_dsa names

E, HID, INTER, H, D_NOPE, D_ROPE, D_V, Q_LORA, KV_LORA = 4, 32, 16, 2, 8, 4, 8, 24, 16


class FakeAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_a_proj = nn.Linear(HID, Q_LORA, bias=False)
        self.q_a_layernorm = nn.RMSNorm(Q_LORA)
        self.q_b_proj = nn.Linear(Q_LORA, H * (D_NOPE + D_ROPE), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(HID, KV_LORA + D_ROPE, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(KV_LORA)
        self.kv_b_proj = nn.Linear(KV_LORA, H * (D_NOPE + D_V), bias=False)
        self.o_proj = nn.Linear(H * D_V, HID, bias=False)
        self.indexer = nn.Module()
        self.indexer.wq_b = nn.Linear(Q_LORA, 2 * 8, bias=False)
        self.indexer.wk = nn.Linear(HID, 8, bias=False)
        self.indexer.k_norm = nn.LayerNorm(8)
        self.indexer.weights_proj = nn.Linear(HID, 2, bias=False)


class FakeMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HID, E, bias=False)
        self.gate.register_buffer("e_score_correction_bias", torch.zeros(E))
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.randn(E, 2 * INTER, HID))
        self.experts.down_proj = nn.Parameter(torch.randn(E, HID, INTER))
        self.shared_experts = nn.Module()
        self.shared_experts.gate_proj = nn.Linear(HID, INTER, bias=False)


class FakeGLM(nn.Module):
    def __init__(self, with_bias_param: bool = False):
        super().__init__()
        self.config = SimpleNamespace(qk_nope_head_dim=D_NOPE, qk_rope_head_dim=D_ROPE, v_head_dim=D_V)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(50, HID)
        layer = nn.Module()
        layer.self_attn = FakeAttention()
        layer.input_layernorm = nn.RMSNorm(HID)
        layer.post_attention_layernorm = nn.RMSNorm(HID)
        layer.mlp = FakeMoE()
        if with_bias_param:  # some implementations make the balancing bias a (grad-free) parameter
            layer.mlp.gate.e_score_correction_bias = nn.Parameter(torch.zeros(E))
        dense = nn.Module()
        dense.mlp = nn.Module()
        dense.mlp.gate_proj = nn.Linear(HID, INTER, bias=False)
        self.model.layers = nn.ModuleList([dense, layer])
        self.model.norm = nn.RMSNorm(HID)
        self.lm_head = nn.Linear(HID, 50, bias=False)


def _group_of(opt: torch.optim.Optimizer) -> dict[str, dict]:
    return {n: g for g in opt.param_groups for n in g["param_names"]}


def test_param_groups_hf_names():
    model = FakeGLM(with_bias_param=True)
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1))
    by = _group_of(opt)
    a = "model.layers.1.self_attn."
    expect = {
        "model.embed_tokens.weight": ("adamw", 0.1, None),
        "lm_head.weight": ("adamw", 0.1, None),
        "model.norm.weight": ("adamw", 0.0, None),
        "model.layers.1.input_layernorm.weight": ("adamw", 0.0, None),
        a + "q_a_layernorm.weight": ("adamw", 0.0, None),
        a + "kv_a_layernorm.weight": ("adamw", 0.0, None),
        a + "indexer.k_norm.weight": ("adamw", 0.0, None),
        a + "indexer.k_norm.bias": ("adamw", 0.0, None),
        "model.layers.1.mlp.gate.weight": ("adamw", 0.1, None),
        a + "q_b_proj.weight": ("muon", 0.1, D_NOPE + D_ROPE),
        a + "kv_b_proj.weight": ("muon", 0.1, (D_NOPE, D_V)),
        a + "q_a_proj.weight": ("muon", 0.1, None),
        a + "o_proj.weight": ("muon", 0.1, None),
        a + "indexer.wq_b.weight": ("muon", 0.1, None),
        "model.layers.1.mlp.experts.gate_up_proj": ("muon", 0.1, None),
        "model.layers.1.mlp.experts.down_proj": ("muon", 0.1, None),
        "model.layers.1.mlp.shared_experts.gate_proj.weight": ("muon", 0.1, None),
        "model.layers.0.mlp.gate_proj.weight": ("muon", 0.1, None),
    }
    for name, (kind, wd, split) in expect.items():
        g = by[name]
        assert (("muon" if g["use_muon"] else "adamw"), g["weight_decay"], g["split_rows"]) == (kind, wd, split), name
    assert "model.layers.1.mlp.gate.e_score_correction_bias" not in by  # updated by the balancing rule
    assert len(by) == sum(1 for n, _ in model.named_parameters()) - 1
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)
    assert "muon[split=12]" in describe(opt)
    # one optimizer step runs over every kind of group
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()


def test_param_group_options():
    model = FakeGLM()
    names = lambda opt: {n for g in opt.param_groups if g["use_muon"] and g["split_rows"] for n in g["param_names"]}  # noqa: E731
    assert names(build_optimizer(model, OptimConfig(muon_split=False))) == set()
    assert not any(g["use_muon"] for g in build_optimizer(model, OptimConfig(use_muon=False)).param_groups)
    for p in model.model.layers[1].self_attn.parameters():  # e.g. a stage that trains only some parameters
        p.requires_grad_(False)
    by = _group_of(build_optimizer(model, OptimConfig()))
    assert not any(".self_attn." in n for n in by)
    # custom rules: a faster LR for the indexer, first match wins
    model = FakeGLM()
    rules = (ParamRule(r"\.indexer\.", "adamw", lr_scale=10.0),) + OptimConfig().rules
    by = _group_of(build_optimizer(model, OptimConfig(lr=1e-3, rules=rules)))
    assert by["model.layers.1.self_attn.indexer.wk.weight"]["lr"] == pytest.approx(1e-2)


def test_split_needs_model_dims():
    model = FakeGLM()
    del model.config
    with pytest.raises(ValueError, match="q_head"):
        build_optimizer(model, OptimConfig())
    opt = build_optimizer(model, OptimConfig(), split_table={"q_head": D_NOPE + D_ROPE, "kv_head": (D_NOPE, D_V)})
    assert _group_of(opt)["model.layers.1.self_attn.q_b_proj.weight"]["split_rows"] == D_NOPE + D_ROPE
    with pytest.raises(ValueError, match="q_b_proj"):
        param_groups(model.named_parameters(), OptimConfig(), split_table={"q_head": 5, "kv_head": 4})


# --------------------------------------------------------------------------------------------------
# Exact resume


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_state_dict_resume_is_exact():
    torch.manual_seed(3)
    model = FakeGLM()
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    _train(model, opt, 3, seed=0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 3, seed=1)

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = FakeGLM()
    model2.load_state_dict(saved["model"])
    opt2 = build_optimizer(model2, OptimConfig(lr=1e-2))
    opt2.load_state_dict(saved["opt"])
    _train(model2, opt2, 3, seed=1)
    for (n, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(a, b), n


def test_load_state_dict_with_other_parameters_is_clear():
    model = FakeGLM()
    opt = build_optimizer(model, OptimConfig())
    state = copy.deepcopy(opt.state_dict())
    state["param_groups"][0]["param_names"] = ["something.else"] * len(state["param_groups"][0]["params"])
    with pytest.raises(ValueError, match="other parameters"):
        opt.load_state_dict(state)
