"""Muon (with Muon Split) for matrices and AdamW for the rest, in one resumable torch.optim.Optimizer.

Muon step for a matrix parameter W [rows, cols] (or a stack [E, rows, cols], one matrix per expert):
    buf = momentum * buf + g ;  g' = g + momentum * buf (Nesterov) or buf
    O   = NewtonSchulz5(g')                  # ~ U V^T of g' = U S V^T: singular values pushed to ~1
    W  *= 1 - lr * weight_decay ;  W -= lr * rms_scale * sqrt(max(rows, cols)) * O
The factor makes the update RMS ~ rms_scale (0.2), the RMS of a typical AdamW update (Moonlight), so
one learning rate serves both kinds of parameters.

**Muon Split** (GLM-5 §2.1): a group option `split_rows` orthogonalises row blocks separately.
`split_rows=r` cuts the rows into blocks of r (one per head: q_b_proj [H*d_qk, q_lora] with r=d_qk);
a tuple `(r1, r2)` is a repeating pattern (kv_b_proj [H*(d_nope+d_v), kv_lora] with (d_nope, d_v)
orthogonalises every head's W_UK and W_UV apart). Each block is scaled by its own shape, so every head's
update has RMS ~ rms_scale (GLM-5 does not state its rule).

Groups with `use_muon=False` run AdamW (decoupled weight decay; the same arithmetic as torch.optim.AdamW
with foreach=False). `build_optimizer(model, cfg)` sorts parameters into groups by ordered name rules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz (Keller Jordan's Muon)
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def newton_schulz5(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16, eps: float = 1e-7) -> torch.Tensor:
    """Approximate orthogonalisation of every matrix in G [..., m, n] (batched over leading dims).

    Returns X in `dtype`, same shape, with singular values in roughly [0.7, 1.2] (the quintic trades
    exact convergence for speed) and the singular vectors of G.
    """
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    transpose = X.shape[-2] > X.shape[-1]
    if transpose:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if transpose else X


def _row_blocks(rows: int, split_rows: int | tuple[int, ...] | None) -> list[tuple[int, int, int]]:
    """[(offset within a period, block rows, period)] describing how the rows are cut."""
    if split_rows is None:
        return [(0, rows, rows)]
    pattern = (split_rows,) if isinstance(split_rows, int) else tuple(split_rows)
    period = sum(pattern)
    if not pattern or min(pattern) < 1 or rows % period:
        raise ValueError(f"split_rows={split_rows} does not tile {rows} rows")
    offs = [sum(pattern[:i]) for i in range(len(pattern))]
    return [(o, r, period) for o, r in zip(offs, pattern)]


def muon_update(g: torch.Tensor, *, split_rows: int | tuple[int, ...] | None = None, steps: int = 5,
                dtype: torch.dtype = torch.bfloat16, rms_scale: float = 0.2) -> torch.Tensor:
    """The scaled orthogonalised update of g [..., rows, cols] (float32; leading dims are a batch).

    With split_rows, each row block (see the module doc) is orthogonalised separately and scaled by
    rms_scale * sqrt(max(block_rows, cols)); otherwise the whole matrix is, with its own shape.
    """
    if g.ndim < 2:
        raise ValueError(f"Muon needs a matrix (or a stack of matrices), got shape {tuple(g.shape)}")
    *lead, rows, cols = g.shape
    out = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    for off, r, period in _row_blocks(rows, split_rows):
        # [..., rows, cols] -> [..., rows/period, period, cols] -> rows off:off+r of every period
        blk = g.reshape(*lead, rows // period, period, cols)[..., off:off + r, :]
        o = newton_schulz5(blk, steps, dtype).float() * (rms_scale * math.sqrt(max(r, cols)))
        out.view(*lead, rows // period, period, cols)[..., off:off + r, :] = o
    return out


class Muon(torch.optim.Optimizer):
    """Muon for groups with use_muon=True (matrices / stacks of matrices), AdamW for the others.

    Group options (defaults in brackets): lr [2e-4], weight_decay [0.1], use_muon [True];
    Muon: momentum [0.95], nesterov [True], ns_steps [5], ns_dtype ["bfloat16" | "float32"],
    rms_scale [0.2], split_rows [None | int | tuple]; AdamW: betas [(0.9, 0.95)], eps [1e-8].
    Extra keys (name, param_names, lr_scale) are kept and saved in the state dict.
    State: Muon "momentum_buffer"; AdamW "step" (float32 tensor), "exp_avg", "exp_avg_sq".
    """

    def __init__(self, params, *, lr: float = 2e-4, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, ns_dtype: str = "bfloat16", rms_scale: float = 0.2,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, use_muon: bool = True):
        if ns_dtype not in _DTYPES:
            raise ValueError(f"ns_dtype={ns_dtype!r} must be one of {sorted(_DTYPES)}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        ns_dtype=ns_dtype, rms_scale=rms_scale, split_rows=None, betas=tuple(betas), eps=eps,
                        use_muon=use_muon)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"]:
                for p in group["params"]:
                    if p.ndim < 2:
                        raise ValueError(f"Muon group {group.get('name', '')!r} holds a parameter of shape "
                                         f"{tuple(p.shape)}; Muon needs matrices (put it in an AdamW group)")
                    _row_blocks(p.shape[-2], group["split_rows"])  # raises if split_rows does not tile

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, plus a clear error when the saved groups hold other parameters (by name)."""
        saved = state_dict["param_groups"]
        if len(saved) == len(self.param_groups):
            for i, (old, new) in enumerate(zip(saved, self.param_groups)):
                if "param_names" in old and "param_names" in new and old["param_names"] != new["param_names"]:
                    diff = sorted(set(old["param_names"]) ^ set(new["param_names"]))[:4]
                    raise ValueError(f"optimizer group {i} ({new.get('name', '')!r}) was saved with other parameters "
                                     f"(differences: {diff}); was the model or the stage's trainable set changed?")
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._muon_group if group["use_muon"] else self._adamw_group)(group)
        return loss

    def _muon_group(self, group: dict) -> None:
        lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(mom).add_(g)
            g = g.add(buf, alpha=mom) if group["nesterov"] else buf
            u = muon_update(g, split_rows=group["split_rows"], steps=group["ns_steps"],
                            dtype=_DTYPES[group["ns_dtype"]], rms_scale=group["rms_scale"])
            p.mul_(1 - lr * wd)
            p.add_(u.to(p.dtype), alpha=-lr)

    def _adamw_group(self, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            step = state["step"].item()
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            p.mul_(1 - lr * wd)
            exp_avg.lerp_(g, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            step_size = lr / (1 - beta1**step)
            denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)


# --------------------------------------------------------------------------------------------------
# Parameter groups from names


@dataclass(frozen=True)
class ParamRule:
    """Where parameters whose name matches `pattern` (re.search) go; the first matching rule wins.

    optimizer: "muon" | "adamw" | "none" (left out of the optimizer, e.g. the balancing bias, which is
    updated by its own rule). weight_decay: None = the config's. split_rows: None, an int, a tuple, or a
    key of the split table built from the model config ("q_head", "kv_head"; see mla_split_rows).
    ndim: match only parameters with this many dims (None: any).
    """

    pattern: str
    optimizer: str
    weight_decay: float | None = None
    lr_scale: float = 1.0
    split_rows: int | tuple[int, ...] | str | None = None
    ndim: int | None = None


# Defaults for HF glm_moe_dsa / DeepSeek-V3 names. Anything unmatched: Muon if ndim >= 2 (3-D expert
# stacks [E, out, in] are orthogonalised per expert), else AdamW without weight decay.
DEFAULT_RULES: tuple[ParamRule, ...] = (
    ParamRule(r"e_score_correction_bias$", "none"),  # loss-free balancing bias: no gradient
    ParamRule(r"(^|\.)embed_tokens\.", "adamw"),
    ParamRule(r"(^|\.)lm_head\.", "adamw"),
    ParamRule(r"(^|\.)shared_head\.head\.", "adamw"),  # MTP output head (HF GLM/DeepSeek MTP layout)
    ParamRule(r"norm\.(weight|bias)$", "adamw", weight_decay=0.0),  # *layernorm, norm, k_norm, enorm, hnorm
    ParamRule(r"(^|\.)bias$|_bias$", "adamw", weight_decay=0.0),
    ParamRule(r"(^|\.)gate\.weight$", "adamw"),  # MoE router (not gate_proj / gate_up_proj)
    ParamRule(r"(^|\.)q_b_proj\.weight$", "muon", split_rows="q_head"),
    ParamRule(r"(^|\.)kv_b_proj\.weight$", "muon", split_rows="kv_head"),
)


def mla_split_rows(model_config) -> dict[str, int | tuple[int, int]]:
    """{"q_head": qk_nope+qk_rope, "kv_head": (qk_nope, v)} from a config with HF MLA attribute names."""
    try:
        nope, rope, v = (int(getattr(model_config, k)) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    except (AttributeError, TypeError) as e:
        raise ValueError("Muon Split needs qk_nope_head_dim, qk_rope_head_dim and v_head_dim from the model config; "
                         "pass model_config=... or split_table=...") from e
    return {"q_head": nope + rope, "kv_head": (nope, v)}


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.1
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_dtype: str = "bfloat16"
    rms_scale: float = 0.2  # Muon update RMS, matched to AdamW's (Moonlight: 0.2 * sqrt(max(m, n)))
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    use_muon: bool = True  # False: AdamW everywhere (baseline)
    muon_split: bool = True  # False: q_b/kv_b orthogonalised as whole matrices (the GLM-5 ablation baseline)
    rules: tuple[ParamRule, ...] = field(default_factory=lambda: DEFAULT_RULES)


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig, *,
                 split_table: Mapping[str, int | tuple[int, ...]] | None = None) -> list[dict]:
    """Sort (name, parameter) pairs into optimizer groups by cfg.rules; parameters with
    requires_grad=False are left out. Each group carries "name", "param_names", "lr_scale", "use_muon",
    "weight_decay", "lr" and (Muon) "split_rows"; groups come in a fixed order (first appearance).
    """
    groups: dict[tuple, dict] = {}
    for pname, p in named_params:
        if not p.requires_grad:
            continue
        rule = next((r for r in cfg.rules if re.search(r.pattern, pname) and (r.ndim is None or r.ndim == p.ndim)), None)
        kind = rule.optimizer if rule else ("muon" if p.ndim >= 2 else "adamw")
        if kind == "none":
            continue
        wd = rule.weight_decay if rule and rule.weight_decay is not None else (cfg.weight_decay if p.ndim >= 2 else 0.0)
        lr_scale = rule.lr_scale if rule else 1.0
        split = rule.split_rows if rule else None
        if kind == "muon" and not cfg.use_muon:
            kind, split = "adamw", None
        if kind == "muon" and p.ndim < 2:
            raise ValueError(f"rule {rule.pattern!r} sends {pname} of shape {tuple(p.shape)} to Muon, which needs matrices")
        if kind != "muon" or not cfg.muon_split:
            split = None
        if isinstance(split, str):
            if split_table is None or split not in split_table:
                raise ValueError(f"{pname}: split_rows={split!r} needs a split table entry (pass model_config=... "
                                 f"or split_table={{{split!r}: rows}})")
            split = split_table[split]
        if kind == "muon":
            try:
                _row_blocks(p.shape[-2], split)
            except ValueError as e:
                raise ValueError(f"{pname} of shape {tuple(p.shape)}: {e}") from None
        key = (kind, wd, lr_scale, split)
        if key not in groups:
            name = kind + ("" if split is None else f"[split={split}]") + ("" if wd else "[no_wd]")
            name += "" if lr_scale == 1.0 else f"[lr_x{lr_scale:g}]"
            groups[key] = {"name": name, "params": [], "param_names": [], "use_muon": kind == "muon",
                           "weight_decay": wd, "lr_scale": lr_scale, "lr": cfg.lr * lr_scale, "split_rows": split}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(pname)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, model_config=None,
                    split_table: Mapping[str, int | tuple[int, ...]] | None = None) -> Muon:
    """The optimizer for `model`: groups from param_groups(model.named_parameters(), cfg).

    The Muon Split table comes from split_table, else mla_split_rows(model_config or model.config)
    when the rules need one.
    """
    named = list(model.named_parameters())
    if split_table is None:
        mc = model_config if model_config is not None else getattr(model, "config", None)
        if mc is not None:
            try:
                split_table = mla_split_rows(mc)
            except ValueError:
                split_table = None
    groups = param_groups(named, cfg, split_table=split_table)
    if not groups:
        raise ValueError("no trainable parameters (all have requires_grad=False or match 'none' rules)")
    return Muon(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov,
                ns_steps=cfg.ns_steps, ns_dtype=cfg.ns_dtype, rms_scale=cfg.rms_scale, betas=cfg.betas, eps=cfg.eps)


def describe(optimizer: torch.optim.Optimizer) -> str:
    """One line per group: name, parameter count, element count (for the run log)."""
    lines = []
    for g in optimizer.param_groups:
        n = sum(p.numel() for p in g["params"])
        lines.append(f"{g.get('name', '?'):<32} {len(g['params']):>4} tensors {n:>12,} params  lr={g['lr']:.3g} "
                     f"wd={g['weight_decay']:g}")
    return "\n".join(lines)
