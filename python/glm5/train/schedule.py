"""Learning-rate schedules as LambdaLR multipliers: linear warm-up, then cosine / linear decay to a floor, or constant.

    sched = build_scheduler(optimizer, ScheduleConfig(kind="cosine", warmup_steps=100, total_steps=2000, min_ratio=0.2))
    ... optimizer.step(); sched.step()

The multiplier at step s (the number of optimizer steps already taken, LambdaLR's last_epoch):
    s < warmup:  (s + 1) / warmup                       # never 0, so the first step already moves
    cosine:      min + (1 - min) * 0.5 * (1 + cos(pi * p)),   p = (s - warmup) / (total - warmup), clamped to [0, 1]
    linear:      1 - (1 - min) * p
    constant:    1                                       # e.g. the DSA sparse stage (constant 1e-5)
GLM-5: pre-training cosine 2e-4 -> 4e-5 (min_ratio 0.2); mid-training linear 4e-5 -> 1e-5; DSA warm-up
5e-3 -> 2e-4 (min_ratio 0.04); DSA sparse constant. The schedule is a small picklable object, so
LambdaLR's state_dict saves and restores it with the step. To resume, build the optimizer and the
scheduler first, then load the optimizer's state, then the scheduler's (checkpoint.load_checkpoint does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KINDS = ("cosine", "linear", "constant")


@dataclass(kw_only=True, slots=True)
class ScheduleConfig:
    kind: str = "cosine"
    warmup_steps: int = 0
    total_steps: int = 1000  # the step at which the decay reaches min_ratio (it stays there after)
    min_ratio: float = 0.1  # floor, as a fraction of the peak LR


class WarmupDecay:
    """Callable step -> LR multiplier (see the module doc). A plain class so LambdaLR can save its __dict__."""

    def __init__(self, kind: str = "cosine", *, warmup_steps: int = 0, total_steps: int = 1000, min_ratio: float = 0.1):
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} must be one of {KINDS}")
        if warmup_steps < 0 or total_steps < 1 or not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"bad schedule: warmup_steps={warmup_steps} total_steps={total_steps} min_ratio={min_ratio}")
        self.kind, self.warmup_steps, self.total_steps, self.min_ratio = kind, warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        p = min(max((step - self.warmup_steps) / span, 0.0), 1.0)
        if self.kind == "cosine":
            return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
        return 1.0 - (1.0 - self.min_ratio) * p

    def __repr__(self) -> str:
        return (f"WarmupDecay({self.kind!r}, warmup_steps={self.warmup_steps}, total_steps={self.total_steps}, "
                f"min_ratio={self.min_ratio})")


def lr_multiplier(cfg: ScheduleConfig) -> WarmupDecay:
    return WarmupDecay(cfg.kind, warmup_steps=cfg.warmup_steps, total_steps=cfg.total_steps, min_ratio=cfg.min_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR with one WarmupDecay for all groups (each group's own peak LR is its initial lr)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg))
