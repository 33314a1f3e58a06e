"""Comparators for kernel-vs-reference tests (see ../shared/STYLE.md, practice 14).

The rule for float outputs (FlashAttention-3's): the kernel's error against an exact reference may
be at most `factor` times PyTorch's own error at the same low precision, plus a rounding floor.
"""

from __future__ import annotations

import torch


def _report(err: torch.Tensor, what: str) -> str:
    flat = int(err.argmax())
    loc = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape)) if err.dim() else ()
    return f"{what}: max error {float(err.max()):.3e} at {loc}"


def assert_same_nonfinite(out: torch.Tensor, ref: torch.Tensor, name: str = "out") -> None:
    """Equal +inf / -inf / NaN masks: a kernel must never trade an inf for a large finite number."""
    for what, fn in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        a, b = fn(out), fn(ref)
        if not torch.equal(a, b):
            bad = (a != b).nonzero()[:5].tolist()
            raise AssertionError(f"{name}: {what} masks differ at {bad} ({int((a != b).sum())} places)")


def assert_close_to_ref(
    out: torch.Tensor,
    truth: torch.Tensor,
    lowp: torch.Tensor | None = None,
    *,
    factor: float = 2.0,
    floor: float | None = None,
    name: str = "out",
) -> None:
    """max|out - truth| <= factor * max|lowp - truth| + floor, on the finite entries.

    truth: the reference in fp64 (or fp32); lowp: the reference at the kernel's input precision
    (None for fp32/fp64 kernels, where only the floor applies).
    """
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert_same_nonfinite(out, truth, name)
    finite = torch.isfinite(truth)
    o, t = out.double()[finite], truth.double()[finite]
    if o.numel() == 0:
        return
    if floor is None:
        eps = torch.finfo(out.dtype).eps if out.dtype.is_floating_point else 0.0
        floor = 4 * eps * max(1.0, float(t.abs().max()))
    bound = floor
    if lowp is not None:
        bound += factor * float((lowp.double()[finite] - t).abs().max())
    err = (out.double() - truth.double()).abs().masked_fill(~finite, 0)
    if float(err.max()) > bound:
        raise AssertionError(_report(err, name) + f" > bound {bound:.3e} ({100 * float((err <= bound).double().mean()):.2f}% within)")


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """Scale-free GEMM difference (DeepGEMM's): 1 - 2<x,y> / (|x|^2 + |y|^2)."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    return 0.0 if float(denom) == 0 else float(1 - 2 * (x * y).sum() / denom)


def topk_recall(idx: torch.Tensor, ref_idx: torch.Tensor, scores_ref_full: torch.Tensor | None = None) -> float:
    """Fraction of the reference's valid selected keys that the kernel also selected (ties allowed).

    With scores_ref_full ([T, S] reference logits), a kernel key counts as correct if its reference
    score equals the score of some reference key it displaced (equal scores are interchangeable).
    """
    hits, total = 0, 0
    for t in range(idx.shape[0]):
        a = set(idx[t][idx[t] >= 0].tolist())
        b = set(ref_idx[t][ref_idx[t] >= 0].tolist())
        total += len(b)
        hit = len(a & b)
        if scores_ref_full is not None and hit < len(b):
            extra = sorted(float(scores_ref_full[t, s]) for s in a - b)
            missing = sorted(float(scores_ref_full[t, s]) for s in b - a)
            hit += sum(1 for e, m in zip(extra, missing) if e == m)
        hits += hit
    return 1.0 if total == 0 else hits / total
