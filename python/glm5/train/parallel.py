"""Data and expert parallelism for the pretraining loop.

- `init_distributed()`: join torchrun's process group (Gloo on CPU, NCCL on CUDA) or run as a world of one.
- Data parallel: DDP over the whole model; every rank reads its own rows of the global batch.
- Expert parallel (`apply_expert_parallel`): each MoE layer's routed experts are sharded over the same
  ranks (glm5.distributed.ExpertParallel: tokens go all-to-all to the rank holding their expert). The
  shards keep the parameter names `...mlp.experts.gate_up_proj` / `down_proj` with E/W rows; DDP
  ignores them, and since each rank's loss is a mean over its own tokens while a shard's gradient sums
  every rank's, `finish_expert_grads` scales them by 1/W. Checkpoints stay world-size independent:
  `full_model_state` / `full_optimizer_state` all-gather the shards into full tensors, and
  `load_model_state` / `load_optimizer_state` take this rank's shard back.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from glm5.distributed import ExpertParallel, local_expert_range
from glm5.model import MoE

__all__ = ["Dist", "init_distributed", "EPExperts", "apply_expert_parallel", "expert_param_names",
           "finish_expert_grads", "clip_grad_norm", "full_model_state", "load_model_state",
           "full_optimizer_state", "load_optimizer_state", "wrap_ddp"]


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_(self, t: torch.Tensor, op=None) -> torch.Tensor:
        """Sum (or op) over the ranks, in place; a no-op for a world of one."""
        if self.enabled:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t


def init_distributed(device: str | None = None) -> Dist:
    """Join the torchrun process group if WORLD_SIZE > 1 (Gloo on CPU, NCCL on CUDA); else a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world <= 1:
        return Dist(device=dev)
    here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        here = True
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
                initialized_here=here)


# --------------------------------------------------------------------------------------------------
# Expert parallelism


class EPExperts(nn.Module):
    """Drop-in for glm5.model.moe.Experts holding this rank's shard: gate_up_proj [E/W, 2F, D] and
    down_proj [E/W, D, F] (same names as the full module), computed through ExpertParallel."""

    def __init__(self, full_gate_up: torch.Tensor, full_down: torch.Tensor, group=None):
        super().__init__()
        E = full_gate_up.shape[0]
        ws = dist.get_world_size(group) if dist.is_initialized() else 1
        rk = dist.get_rank(group) if dist.is_initialized() else 0
        self.num_experts, self.world_size, self.rank = E, ws, rk
        self.start, self.end = local_expert_range(E, ws, rk)
        self.gate_up_proj = nn.Parameter(full_gate_up.detach()[self.start:self.end].clone())
        self.down_proj = nn.Parameter(full_down.detach()[self.start:self.end].clone())
        # ExpertParallel's dispatch/experts/combine on our parameters: built on the meta device (no
        # memory, no RNG), then pointed at the shards; kept out of the module tree (not a submodule).
        ep = ExpertParallel(E, full_gate_up.shape[2], full_gate_up.shape[1] // 2, group, device="meta",
                            dtype=full_gate_up.dtype)
        ep._parameters["w_gate_up"], ep._parameters["w_down"] = self.gate_up_proj, self.down_proj
        object.__setattr__(self, "_ep", ep)

    def forward(self, x_ND: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        return self._ep(x_ND, topk_idx, topk_w)

    def extra_repr(self) -> str:
        return f"experts [{self.start}, {self.end}) of {self.num_experts}, rank {self.rank} of {self.world_size}"


def apply_expert_parallel(model: nn.Module, group=None) -> list[str]:
    """Replace every MoE layer's experts (main layers and MTP) by this rank's EPExperts shard.

    Call on every rank with identical full weights. Returns the names of the sharded parameters.
    """
    for m in [m for m in model.modules() if isinstance(m, MoE)]:
        m.experts = EPExperts(m.experts.gate_up_proj, m.experts.down_proj, group)
    return expert_param_names(model)


def expert_param_names(model: nn.Module) -> list[str]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, EPExperts):
            out += [f"{name}.gate_up_proj", f"{name}.down_proj"]
    return out


def wrap_ddp(model: nn.Module, device: torch.device, ignore: list[str]) -> nn.Module:
    """DDP over `model`, ignoring the (sharded) parameters named in `ignore`; buffers are not broadcast
    (the router biases are updated identically on every rank from all-reduced loads)."""
    if ignore:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
    return nn.parallel.DistributedDataParallel(model, broadcast_buffers=False, **kw)


def finish_expert_grads(model: nn.Module, world_size: int) -> None:
    """Scale the expert shards' gradients by 1/W: they sum every rank's mean loss, DDP averages the rest."""
    if world_size <= 1:
        return
    for m in model.modules():
        if isinstance(m, EPExperts):
            for p in (m.gate_up_proj, m.down_proj):
                if p.grad is not None:
                    p.grad.div_(world_size)


def clip_grad_norm(params: list[torch.Tensor], sharded: list[torch.Tensor], max_norm: float, d: Dist) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole model when some parameters are sharded over the
    ranks: norm^2 = sum of the replicated grads' squares + the all-reduced sum of the shards'."""
    if not sharded or not d.enabled:
        return torch.nn.utils.clip_grad_norm_(params + sharded, max_norm)
    rep = [p.grad for p in params if p.grad is not None]
    shd = [p.grad for p in sharded if p.grad is not None]
    sq_rep = sum((g.double().pow(2).sum() for g in rep), torch.zeros((), dtype=torch.float64))
    sq_shd = sum((g.double().pow(2).sum() for g in shd), torch.zeros((), dtype=torch.float64))
    sq_shd = d.all_reduce_(sq_shd.to(rep[0].device if rep else "cpu"))
    total = (sq_rep.to(sq_shd.device) + sq_shd).sqrt().float()
    if math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in rep + shd:
            g.mul_(coef.to(g.device, g.dtype))
    return total


# --------------------------------------------------------------------------------------------------
# World-size independent states


def _gather_rows(t: torch.Tensor, d: Dist) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(d.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, 0)


def full_model_state(model: nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """model.state_dict() with every expert shard all-gathered to the full [E, ...] tensor (collective)."""
    state = model.state_dict()
    if d.enabled:
        for name in expert_param_names(model):
            state[name] = _gather_rows(state[name], d)
    return state


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], d: Dist) -> None:
    """Load a full (world-size independent) state, taking this rank's rows of the expert tensors."""
    state = dict(state)
    for name in expert_param_names(model):
        s, e = local_expert_range(state[name].shape[0], d.world_size, d.rank)
        state[name] = state[name][s:e]
    model.load_state_dict(state)


def _expert_param_ids(model: nn.Module, optimizer) -> dict[int, bool]:
    """{optimizer state index: True} for the expert shards (torch numbers params in group order)."""
    sharded = {id(getattr(m, k)) for m in model.modules() if isinstance(m, EPExperts) for k in ("gate_up_proj", "down_proj")}
    out, i = {}, 0
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) in sharded:
                out[i] = True
            i += 1
    return out


def full_optimizer_state(model: nn.Module, optimizer, d: Dist) -> dict:
    """optimizer.state_dict() with the expert shards' state tensors all-gathered (collective)."""
    sd = optimizer.state_dict()
    if not d.enabled:
        return sd
    for i in sorted(_expert_param_ids(model, optimizer)):
        st = sd["state"].get(i)
        if st:
            sd["state"][i] = {k: _gather_rows(v, d) if torch.is_tensor(v) and v.dim() >= 1 else v for k, v in st.items()}
    return sd


def load_optimizer_state(model: nn.Module, optimizer, sd: dict, d: Dist) -> None:
    """Load a full optimizer state, taking this rank's rows of the expert shards' state tensors."""
    ids = _expert_param_ids(model, optimizer)
    if ids:
        sd = {**sd, "state": dict(sd["state"])}
        for i in ids:
            st = sd["state"].get(i)
            if st:
                def shard(v):
                    if not (torch.is_tensor(v) and v.dim() >= 1):
                        return v
                    s, e = local_expert_range(v.shape[0], d.world_size, d.rank)
                    return v[s:e]
                sd["state"][i] = {k: shard(v) for k, v in st.items()}
    optimizer.load_state_dict(sd)
