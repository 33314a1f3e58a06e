"""GLM-5's feed-forward layers: the dense SwiGLU MLP and the sigmoid-routed MoE with a shared expert.

Suffixes: N tokens, D hidden, E routed experts, F expert width, k experts per token.
Parameter names are transformers' `glm_moe_dsa` in-memory names (`mlp.gate.weight`,
`mlp.gate.e_score_correction_bias`, `mlp.experts.gate_up_proj` [E, 2F, D] with the gate rows first,
`mlp.experts.down_proj` [E, D, F], `mlp.shared_experts.*`); the checkpoint stores the experts one by
one (`mlp.experts.{e}.{gate,up,down}_proj.weight`), see checkpoint.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import glm5.ops

from .config import ModelConfig

__all__ = ["MLP", "Router", "Experts", "MoE", "moe_route", "moe_experts"]


def moe_route(logits_NE: torch.Tensor, bias_E: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_idx [N, k] int32, topk_w [N, k] fp32) from fp32 router logits, through glm5.ops."""
    return glm5.ops.moe_route(
        logits_NE, bias_E, cfg.num_experts_per_tok, n_group=cfg.n_group, topk_group=cfg.topk_group,
        norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
    )


def moe_experts(x_ND, topk_idx, topk_w, w_gate_up_EFD, w_down_EDF) -> torch.Tensor:
    """sum_k topk_w[n,k] * expert_{idx[n,k]}(x[n]) with SwiGLU experts, through glm5.ops."""
    return glm5.ops.moe_experts(x_ND, topk_idx, topk_w, w_gate_up_EFD, w_down_EDF)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The first dense layers and the shared expert."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """fp32 sigmoid router; e_score_correction_bias picks experts but carries no gradient (noaux_tc)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # Loss-free load balancing updates this buffer from the expert load (the trainer's job).
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [N, E] fp32, topk_idx [N, k] int32, topk_w [N, k] fp32)."""
        logits_NE = F.linear(x_ND.float(), self.weight.float())
        idx, w = moe_route(logits_NE, self.e_score_correction_bias.float(), self.cfg)
        return logits_NE, idx, w


class Experts(nn.Module):
    """The routed experts' weights as two stacked tensors (the grouped-GEMM layout)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, F_, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * F_, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, F_))

    def forward(self, x_ND: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        return moe_experts(x_ND, topk_idx, topk_w, self.gate_up_proj, self.down_proj)


class MoE(nn.Module):
    """Routed experts + the always-on shared expert(s)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        # Tokens routed to each expert in the last forward ([E] int64, no grad): the trainer's
        # loss-free balancing reads it.
        self.last_expert_load: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_ND = x.reshape(-1, shape[-1])
        _, idx, w = self.gate(x_ND)
        with torch.no_grad():
            self.last_expert_load = glm5.ops.expert_load(idx, self.cfg.n_routed_experts)
        y = self.experts(x_ND, idx, w) + self.shared_experts(x_ND)
        return y.view(shape)
