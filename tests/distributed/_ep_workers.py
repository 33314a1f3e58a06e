"""Cases and the spawned worker of the expert-parallel tests (an importable module, so that
torch.multiprocessing.spawn can pickle the worker by name).

Every rank builds the same full inputs from the case's seed, runs single-process
`glm5.ops.moe_experts` on all tokens as the reference, runs `ExpertParallel` on its own slice, and
compares the output and the gradients of x, topk_w and its expert shard. Failures are collected and
raised after the last case, so that no rank leaves the collectives early.
"""

from __future__ import annotations

import datetime
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

import glm5
from glm5.distributed import ExpertParallel


@dataclass
class Case:
    name: str
    tokens: tuple[int, ...]  # tokens on each rank (its length is the world size)
    experts: int
    topk: int
    # random | dropped (random, some slots -1) | hot (every token to experts 0..k-1) |
    # last_rank (only the last rank's experts)
    routing: str = "random"
    dtype: torch.dtype = torch.float64
    dim: int = 8
    ffn: int = 6
    seed: int = 0

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{self.name}-W{len(self.tokens)}-N{'/'.join(map(str, self.tokens))}-E{self.experts}-k{self.topk}-{self.routing}-{dt}"


def make_routing(case: Case, n: int, g: torch.Generator) -> torch.Tensor:
    """[n, k] int32 distinct experts per token, following case.routing."""
    E, k, W = case.experts, case.topk, len(case.tokens)
    if case.routing == "random":
        return torch.rand(n, E, generator=g).argsort(dim=1)[:, :k].int()
    if case.routing == "dropped":  # random, with about a third of the slots dropped (-1)
        idx = torch.rand(n, E, generator=g).argsort(dim=1)[:, :k].int()
        return idx.masked_fill(torch.rand(n, k, generator=g) < 0.35, -1)
    if case.routing == "hot":
        return torch.arange(k, dtype=torch.int32).expand(n, k).contiguous()
    if case.routing == "last_rank":
        per_rank = E // W
        return (E - per_rank + torch.rand(n, per_rank, generator=g).argsort(dim=1)[:, :k]).int()
    raise ValueError(case.routing)


def make_inputs(case: Case, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Full (all ranks') inputs, identical on every rank (drawn on the CPU, then moved)."""
    g = torch.Generator().manual_seed(case.seed)
    n, E, D, F = sum(case.tokens), case.experts, case.dim, case.ffn

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(case.dtype)

    inp = {
        "x": randn(n, D),
        "topk_idx": make_routing(case, n, g),
        "topk_w": torch.rand(n, case.topk, generator=g, dtype=torch.float64).float(),
        "w_gate_up": randn(E, 2 * F, D, scale=D**-0.5),
        "w_down": randn(E, D, F, scale=F**-0.5),
        "grad_out": randn(n, D),
    }
    return {name: t.to(device) for name, t in inp.items()}


def _run(fn, x, topk_idx, topk_w, w_gate_up, w_down, grad_out):
    """fn(...) with leaf copies of the differentiable inputs; returns (out, dx, dtopk_w)."""
    x = x.detach().clone().requires_grad_()
    topk_w = topk_w.detach().clone().requires_grad_()
    out = fn(x, topk_idx, topk_w, w_gate_up, w_down)
    if out.requires_grad:  # the reference with no tokens at all has no graph
        out.backward(grad_out)
    return out.detach(), _grad(x), _grad(topk_w)


def _grad(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(t) if t.grad is None else t.grad


def reference(case: Case, inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """moe_experts on all tokens in one process: output and gradients."""
    w_gu = inp["w_gate_up"].clone().requires_grad_()
    w_d = inp["w_down"].clone().requires_grad_()
    out, dx, dw = _run(glm5.ops.moe_experts, inp["x"], inp["topk_idx"], inp["topk_w"], w_gu, w_d, inp["grad_out"])
    return {"out": out, "dx": dx, "dtopk_w": dw, "dw_gate_up": _grad(w_gu), "dw_down": _grad(w_d)}


def expert_parallel(case: Case, inp: dict[str, torch.Tensor], group=None) -> dict[str, torch.Tensor]:
    """ExpertParallel on this rank's tokens: output, gradients, and the module (for the shard range)."""
    world, rank = (dist.get_world_size(group), dist.get_rank(group)) if dist.is_initialized() else (1, 0)
    lo = sum(case.tokens[:rank])
    mine = slice(lo, lo + case.tokens[rank])
    ep = ExpertParallel.from_full_weights(inp["w_gate_up"], inp["w_down"], group)

    def fn(x, topk_idx, topk_w, _w_gu, _w_d):
        return ep(x, topk_idx, topk_w)

    out, dx, dw = _run(fn, inp["x"][mine], inp["topk_idx"][mine], inp["topk_w"][mine], None, None, inp["grad_out"][mine])
    return {"out": out, "dx": dx, "dtopk_w": dw, "dw_gate_up": _grad(ep.w_gate_up), "dw_down": _grad(ep.w_down),
            "slice": mine, "experts": slice(ep.expert_start, ep.expert_end)}


def compare(case: Case, got: dict, ref: dict) -> None:
    """Raise AssertionError naming the first tensor that differs."""
    mine, experts = got["slice"], got["experts"]
    pairs = {
        "out": (got["out"], ref["out"][mine]),
        "dx": (got["dx"], ref["dx"][mine]),
        "dtopk_w": (got["dtopk_w"], ref["dtopk_w"][mine]),
        "dw_gate_up": (got["dw_gate_up"], ref["dw_gate_up"][experts]),
        "dw_down": (got["dw_down"], ref["dw_down"][experts]),
    }
    # fp64: only the summation order differs; bf16: the reference itself rounds, allow a few ulps.
    tol = {} if case.dtype == torch.float64 else {"rtol": 2e-2, "atol": 2e-2}
    for what, (a, b) in pairs.items():
        torch.testing.assert_close(a, b, msg=lambda m, what=what: f"{case} {what}: {m}", **tol)


def check_dispatch(case: Case, inp: dict[str, torch.Tensor], group=None):
    """dispatch's rows and offsets against the layout built from the full inputs: for each local
    expert, the rows of every source rank's tokens routed to it, source rank by source rank, in
    token order (each token uses an expert at most once). Dispatches now (a collective), returns
    the function that asserts."""
    world, rank = (dist.get_world_size(group), dist.get_rank(group)) if dist.is_initialized() else (1, 0)
    ep = ExpertParallel.from_full_weights(inp["w_gate_up"], inp["w_down"], group)
    lo = sum(case.tokens[:rank])
    mine = slice(lo, lo + case.tokens[rank])
    x_local, offsets, _ = ep.dispatch(inp["x"][mine], inp["topk_idx"][mine])
    rows, counts = [], []
    for e in range(ep.expert_start, ep.expert_end):
        n_e = 0
        for s in range(world):
            start = sum(case.tokens[:s])
            idx = inp["topk_idx"][start : start + case.tokens[s]]
            tok = (idx == e).any(1).nonzero().flatten() + start
            rows.append(inp["x"][tok])
            n_e += tok.numel()
        counts.append(n_e)
    expected_offsets = torch.tensor([0] + counts, device=offsets.device).cumsum(0)

    def check() -> None:
        assert torch.equal(offsets, expected_offsets), f"{case} offsets {offsets.tolist()} != {expected_offsets.tolist()}"
        n = int(offsets[-1])
        assert torch.equal(x_local[:n], torch.cat(rows)), f"{case} dispatched rows differ from the layout reference"
        assert not x_local[n:].any(), f"{case} rows after offsets[-1] must be zero padding"

    return check


def worker(rank: int, world: int, store_path: str, cases: list[Case], backend: str = "gloo") -> None:
    """One rank: gloo on the CPU, or nccl on GPU `rank` (the reference ops where no CUDA kernel exists)."""
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        if not torch._C._dispatch_has_kernel_for_dispatch_key("glm5::grouped_gemm", "CUDA"):
            glm5.ops.set_impl("reference")
    dist.init_process_group(
        backend, init_method=f"file://{store_path}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    failures = []
    try:
        for case in cases:
            assert len(case.tokens) == world, case
            try:
                run_case(case, device)
            except Exception:  # keep going: the other ranks would otherwise block in a collective
                failures.append(f"rank {rank}: {case}\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()
    if failures:
        raise AssertionError("\n".join(failures))


def two_calls_one_backward(case: Case, inp: dict[str, torch.Tensor], group=None):
    """Two forwards of one module (two layers sharing the exchange buffers) before one backward.

    Returns the function that asserts the gradients equal the references' (a collective now)."""
    world, rank = (dist.get_world_size(group), dist.get_rank(group)) if dist.is_initialized() else (1, 0)
    inp_b = dict(inp, x=inp["x"] * 0.5 + 1)  # same routing, other rows
    ref_a, ref_b = reference(case, inp), reference(case, inp_b)
    lo = sum(case.tokens[:rank])
    mine = slice(lo, lo + case.tokens[rank])
    ep = ExpertParallel.from_full_weights(inp["w_gate_up"], inp["w_down"], group)
    xa = inp["x"][mine].clone().requires_grad_()
    xb = inp_b["x"][mine].clone().requires_grad_()
    out_a = ep(xa, inp["topk_idx"][mine], inp["topk_w"][mine])
    out_b = ep(xb, inp["topk_idx"][mine], inp["topk_w"][mine])
    g = inp["grad_out"][mine]
    ((out_a * g).sum() + (out_b * g).sum()).backward()
    experts = slice(ep.expert_start, ep.expert_end)
    tol = {} if case.dtype == torch.float64 else {"rtol": 2e-2, "atol": 2e-2}

    def check() -> None:
        pairs = {
            "dx (first call)": (_grad(xa), ref_a["dx"][mine]),
            "dx (second call)": (_grad(xb), ref_b["dx"][mine]),
            "dw_gate_up (both calls)": (_grad(ep.w_gate_up), (ref_a["dw_gate_up"] + ref_b["dw_gate_up"])[experts]),
            "dw_down (both calls)": (_grad(ep.w_down), (ref_a["dw_down"] + ref_b["dw_down"])[experts]),
        }
        for what, (a, b) in pairs.items():
            torch.testing.assert_close(a, b, msg=lambda m, what=what: f"{case} {what}: {m}", **tol)

    return check


def run_case(case: Case, device: torch.device | str = "cpu") -> None:
    """All checks of one case on this rank. Every rank calls it; the collective work all runs before
    the first assertion, so that a failing rank cannot leave the others waiting in a collective."""
    inp = make_inputs(case, device)
    ref = reference(case, inp)
    got = expert_parallel(case, inp)
    again = expert_parallel(case, inp)  # run-twice determinism: bitwise equal
    dispatch_check = check_dispatch(case, inp)
    buffers_check = two_calls_one_backward(case, inp)
    for key in ("out", "dx", "dtopk_w", "dw_gate_up", "dw_down"):
        assert torch.equal(got[key], again[key]), f"{case} {key}: two runs differ"
    dispatch_check()
    compare(case, got, ref)
    buffers_check()
