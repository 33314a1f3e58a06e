"""The MoE layer (sigmoid router with the selection-only bias, group-limited routing, SwiGLU experts,
shared expert) against a token-by-token loop, and the dense-first-k layer layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glm5.model import MLP, GLM5ForCausalLM, MoE
from model_helpers import tiny_config


def _naive_moe(moe: MoE, x_ND: torch.Tensor) -> torch.Tensor:
    """One token at a time, straight from the GLM-5 / DeepSeek-V3 router definition."""
    cfg = moe.cfg
    E, k, G = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group
    Fi = cfg.moe_intermediate_size
    out = []
    for x in x_ND:
        s = torch.sigmoid(moe.gate.weight.float() @ x.float())
        choice = s + moe.gate.e_score_correction_bias
        if G > 1:
            groups = choice.view(G, E // G)
            group_score = groups.topk(2).values.sum(-1)
            allowed = torch.zeros(G, dtype=torch.bool)
            allowed[group_score.topk(cfg.topk_group).indices] = True
            choice = torch.where(allowed.repeat_interleave(E // G), choice, torch.tensor(float("-inf")))
        idx = choice.topk(k).indices
        w = s[idx]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        w = w * cfg.routed_scaling_factor
        y = torch.zeros_like(x)
        for e, we in zip(idx.tolist(), w):
            gu = moe.experts.gate_up_proj[e] @ x
            y = y + we * (moe.experts.down_proj[e] @ (F.silu(gu[:Fi]) * gu[Fi:]))
        out.append(y + moe.shared_experts(x[None])[0])
    return torch.stack(out)


@pytest.mark.parametrize("n_group, topk_group", [(1, 1), (4, 2), (2, 1)], ids=lambda v: str(v))
def test_moe_matches_the_token_loop(n_group, topk_group):
    cfg = tiny_config(n_group=n_group, topk_group=topk_group)
    torch.manual_seed(0)
    model = GLM5ForCausalLM(cfg)
    moe = model.model.layers[1].mlp
    with torch.no_grad():
        moe.gate.e_score_correction_bias.normal_(0, 0.2)
        x = torch.randn(2, 13, cfg.hidden_size)
        got = moe(x)
        want = _naive_moe(moe, x.view(-1, cfg.hidden_size)).view_as(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert moe.last_expert_load.sum() == 2 * 13 * cfg.num_experts_per_tok


def test_bias_only_picks_experts():
    """The correction bias changes which experts run, never the weights they get (noaux_tc)."""
    cfg = tiny_config(num_experts_per_tok=8)  # every expert chosen: the bias cannot change the set
    torch.manual_seed(0)
    moe = GLM5ForCausalLM(cfg).model.layers[1].mlp
    x = torch.randn(5, cfg.hidden_size)
    with torch.no_grad():
        a = moe(x)
        moe.gate.e_score_correction_bias.normal_(0, 1.0)
        b = moe(x)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_router_bias_gets_no_gradient_and_stays_fp32():
    cfg = tiny_config()
    torch.manual_seed(0)
    moe = GLM5ForCausalLM(cfg).model.layers[1].mlp
    assert "gate.e_score_correction_bias" in moe.state_dict()
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert not moe.gate.e_score_correction_bias.requires_grad
    moe(torch.randn(7, cfg.hidden_size)).sum().backward()
    for p in (moe.gate.weight, moe.experts.gate_up_proj, moe.experts.down_proj, moe.shared_experts.up_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_first_k_layers_are_dense():
    cfg = tiny_config(num_hidden_layers=4, first_k_dense_replace=2)
    model = GLM5ForCausalLM(cfg)
    kinds = [type(layer.mlp) for layer in model.model.layers]
    assert kinds == [MLP, MLP, MoE, MoE]
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (cfg.intermediate_size, cfg.hidden_size)
    assert model.model.layers[2].mlp.experts.gate_up_proj.shape == (8, 2 * cfg.moe_intermediate_size, cfg.hidden_size)
    assert model.model.layers[2].mlp.experts.down_proj.shape == (8, cfg.hidden_size, cfg.moe_intermediate_size)
    assert isinstance(model.mtp.mlp, MoE)  # the MTP block sits after the dense layers
