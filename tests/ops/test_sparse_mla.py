"""glm5.ops.sparse_mla (CPU kernels sparse_mla_fwd / sparse_mla_bwd) against reference.sparse_mla.

Forward outputs are compared with the reference run in fp64 on the same (rounded) inputs, with the
FA3 rule: at most twice the error of the reference run at the input precision, plus a rounding
floor (tests/numerics.py). Gradients are compared the same way against autograd of the reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

import glm5
from glm5.ops import reference
from numerics import assert_close_to_ref

FWD = torch.ops.glm5.sparse_mla_fwd
BWD = torch.ops.glm5.sparse_mla_bwd


@dataclass(frozen=True)
class Case:
    T: int
    S: int
    K: int  # top-k slots per query; K > S gives -1 padding
    H: int = 4
    D: int = 48
    dv: int = 32
    pad: float = 0.0  # share of each row's slots set to -1 (scattered among the valid ones)
    dup: bool = False  # a key repeated in two slots of each row (counts twice)
    dead_rows: int = 0  # the first rows have no valid slot: out = 0, lse = +inf, zero gradients
    spread: float = 1.0  # scaled scores ~ N(0, spread^2): larger spreads stress the softmax

    def __str__(self) -> str:
        s = f"T{self.T}-S{self.S}-K{self.K}-H{self.H}-D{self.D}-dv{self.dv}"
        for f in ("pad", "dup", "dead_rows", "spread"):
            v, default = getattr(self, f), Case.__dataclass_fields__[f].default
            if v != default:
                s += f"-{f}" if v is True else f"-{f}{v}"
        return s


CASES = [
    # regular
    Case(T=4, S=64, K=32, H=4, D=64, dv=32),
    Case(T=3, S=256, K=64, H=16, D=64, dv=64),  # d_v == D_qk
    # irregular T / S / H / D / d_v (odd D: the bf16 kernel pads the reduction dim)
    Case(T=7, S=53, K=19, H=3, D=37, dv=29),
    Case(T=2, S=11, K=5, H=1, D=1, dv=1),
    # several 256-key blocks of the online softmax, the last one partial
    Case(T=5, S=700, K=600, H=5, D=33, dv=17),
    Case(T=4, S=900, K=800, H=6, D=24, dv=20, spread=6.0),  # wide scores: the running max moves
    # top-k wider than S: -1 padding
    Case(T=6, S=20, K=40, H=2, D=16, dv=8),
    # mixed valid / invalid slots, duplicates, rows without any valid slot
    Case(T=9, S=80, K=24, H=4, D=40, dv=24, pad=0.4),
    Case(T=8, S=30, K=12, H=3, D=20, dv=12, dup=True),
    Case(T=8, S=30, K=12, H=3, D=20, dv=20, dead_rows=3, pad=0.3, dup=True),
    # GLM-5's head count and widths (2 queries, 8 key blocks)
    Case(T=2, S=4096, K=2048, H=64, D=576, dv=512),
]
# The backward at GLM-5's widths takes a few seconds (the fp64 reference dominates).
BWD_CASES = [pytest.param(c, marks=pytest.mark.slow, id=str(c)) if c.H == 64 else c for c in CASES]
TINY = [Case(T=4, S=6, K=5, H=2, D=5, dv=3, pad=0.3, dup=True, dead_rows=1)]
# Many slots per key (S small against T * K): the backward's scatter-add has real collisions.
SHARED_KEYS = Case(T=70, S=40, K=48, H=4, D=40, dv=32, pad=0.2, dup=True, dead_rows=2)


def make_indices(case: Case, gen: torch.Generator) -> torch.Tensor:
    T, S, K = case.T, case.S, case.K
    idx = torch.full((T, K), -1, dtype=torch.int32)
    for t in range(T):
        n = min(K, S)
        row = torch.full((K,), -1, dtype=torch.int32)
        row[:n] = torch.randperm(S, generator=gen)[:n].int()
        row = row[torch.randperm(K, generator=gen)]  # scatter the -1 padding among the valid slots
        row[torch.randperm(K, generator=gen)[: round(case.pad * K)]] = -1
        valid = (row >= 0).nonzero().flatten()
        if case.dup and len(valid) >= 2:
            row[valid[1]] = row[valid[0]]
        if t < case.dead_rows:
            row[:] = -1
        idx[t] = row
    return idx


def make_inputs(case: Case, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple:
    """(q, kv, indices, sm_scale, d_v) with q . k * sm_scale ~ N(0, spread^2)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(case.T, case.H, case.D, generator=gen, dtype=torch.float64).to(dtype)
    kv = torch.randn(case.S, case.D, generator=gen, dtype=torch.float64).to(dtype)
    return q, kv, make_indices(case, gen), case.spread * case.D**-0.5, case.dv


def upcast(x: tuple, dtype: torch.dtype = torch.float64) -> tuple:
    q, kv, idx, scale, dv = x
    return q.to(dtype), kv.to(dtype), idx, scale, dv


def dead(x: tuple) -> torch.Tensor:
    """[T] bool: queries without a valid slot."""
    return ~(x[2] >= 0).any(dim=1)


def out_and_grads(fn, x: tuple, g: torch.Tensor) -> tuple:
    """(out, lse, dq, dkv) of fn, with the gradients of sum(out * g) by autograd."""
    q, kv = (t.detach().clone().requires_grad_() for t in x[:2])
    out, lse = fn(q, kv, *x[2:])
    dq, dkv = torch.autograd.grad((out.to(g.dtype) * g).sum(), (q, kv))
    return out.detach(), lse, dq, dkv


def floor(truth: torch.Tensor, dtype: torch.dtype, K: int) -> float | None:
    """The rounding floor of the comparison (None: numerics.py's default, 4 eps at the max).

    fp64: the worst-case error of a K-term fp64 sum, K eps at the max (no lower-precision reference
    exists to measure against). bf16 / fp16: one ulp at the max, a quarter of the default. Every
    accumulation is fp32 and the result is rounded once, as the reference at that precision (lowp) does;
    the bf16 forward also rounds P, which costs about half an ulp of out on average.
    """
    finite = truth[torch.isfinite(truth)]
    top = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    if dtype == torch.float64:
        return max(K, 4) * torch.finfo(torch.float64).eps * top
    if dtype in (torch.bfloat16, torch.float16):
        return torch.finfo(dtype).eps * top
    return None


def assert_kernel_forward(x: tuple, case: Case, out: torch.Tensor, lse: torch.Tensor) -> None:
    """A bf16 / fp16 tensor-core forward's out and fp32 lse (on the CPU) against the fp64 reference, and the
    contract of queries without keys: the rule of the CUDA and simulator tests of every such kernel."""
    dtype = x[0].dtype
    truth_out, truth_lse = reference.sparse_mla(*upcast(x))
    lowp_out, _ = reference.sparse_mla(*x)
    assert_close_to_ref(out, truth_out, lowp_out, floor=floor(truth_out, dtype, case.K), name="out")
    # lse is an fp32 sum of fp32 exponentials of fp32 dot products of the rounded inputs.
    finite = torch.isfinite(truth_lse)
    top = float(truth_lse[finite].abs().max()) if finite.any() else 1.0
    assert_close_to_ref(lse, truth_lse, None, floor=64 * torch.finfo(torch.float32).eps * max(1.0, top), name="lse")
    empty = dead(x)
    assert not out[empty].any() and torch.isposinf(lse[empty]).all()


def check_forward(case: Case, dtype: torch.dtype) -> tuple:
    x = make_inputs(case, dtype)
    out, lse = glm5.ops.sparse_mla(*x)
    assert out.dtype == dtype and out.shape == (case.T, case.H, case.dv)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and lse.shape == (case.T, case.H)
    truth_out, truth_lse = reference.sparse_mla(*upcast(x))
    lowp_out, lowp_lse = reference.sparse_mla(*x) if dtype != torch.float64 else (None, None)
    assert_close_to_ref(out, truth_out, lowp_out, floor=floor(truth_out, dtype, case.K), name="out")
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # lse is fp32: its floor too
    assert_close_to_ref(lse, truth_lse, lowp_lse, floor=floor(truth_lse, lse_dtype, case.K), name="lse")
    empty = dead(x)
    assert torch.equal(out[empty], torch.zeros_like(out[empty])) and torch.isposinf(lse[empty]).all()
    assert torch.isfinite(lse[~empty]).all()
    return x, out, lse


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fwd_fp32(case):
    check_forward(case, torch.float32)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fwd_bf16(case):
    # Scores are a bf16 x bf16 GEMM with fp32 accumulation (exact products, as the fp32 reference on the
    # same bf16 values); the probabilities are rounded to bf16 before P @ V (FlashMLA does the same).
    # That adds at most 2^-9 * sum_j P_j |v_j| to out, the order of out's own final bf16 rounding, which
    # is what the reference at bf16 (lowp) commits; so the default rule (2x lowp + a bf16 floor) holds.
    check_forward(case, torch.bfloat16)


@pytest.mark.parametrize("case", CASES[:4] + CASES[6:8], ids=str)
def test_fwd_fp16(case):
    check_forward(case, torch.float16)  # upcast to fp32 in the gather: error = the final fp16 rounding


@pytest.mark.parametrize("case", [CASES[2], CASES[4], CASES[9]], ids=str)
def test_fwd_fp64(case):
    check_forward(case, torch.float64)


@pytest.mark.parametrize("case", [CASES[2], CASES[4]], ids=str)
def test_fwd_bf16_without_onednn(case):
    # With oneDNN disabled the bf16 inputs go through the fp32 path (no bf16 micro-kernel): same contract.
    with torch.backends.mkldnn.flags(enabled=False):
        check_forward(case, torch.bfloat16)


def check_backward(case: Case, dtype: torch.dtype) -> None:
    x = make_inputs(case, dtype)
    g = torch.randn(case.T, case.H, case.dv, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    _, _, dq, dkv = out_and_grads(glm5.ops.sparse_mla, x, g.to(acc))
    _, _, truth_dq, truth_dkv = out_and_grads(reference.sparse_mla, upcast(x), g)
    _, _, lowp_dq, lowp_dkv = out_and_grads(reference.sparse_mla, x, g.to(acc))
    assert dq.dtype == dtype and dkv.dtype == dtype
    # Factor 3 (the rule for ops with an extra nonlinearity): like FlashAttention, the kernel recomputes
    # P = exp(s - lse) from the saved fp32 lse, whose rounding (half an ulp of |lse| ~ log K, i.e. several
    # eps) is a systematic relative error in every P of the row; autograd of the reference reuses its P.
    for name, a, t, lp in (("dq", dq, truth_dq, lowp_dq), ("dkv", dkv, truth_dkv, lowp_dkv)):
        assert_close_to_ref(a, t, lp, factor=3.0, floor=floor(t, dtype, case.K), name=name)
    empty = dead(x)
    assert not dq[empty].any(), "a query without keys gets dq = 0"
    used = torch.zeros(case.S, dtype=torch.bool)
    used[x[2][x[2] >= 0].long()] = True
    assert not dkv[~used].any(), "a key no query selected gets dkv = 0"


@pytest.mark.parametrize("case", BWD_CASES + [SHARED_KEYS], ids=str)
def test_bwd_fp32(case):
    check_backward(case, torch.float32)


@pytest.mark.parametrize("case", BWD_CASES + [SHARED_KEYS], ids=str)
def test_bwd_bf16(case):
    # The backward upcasts bf16 to fp32 and rounds dq and dkv once at the end, like the reference run on
    # bf16 inputs; Delta uses the saved bf16 out (a 2^-9 relative change, far inside the bf16 floor).
    check_backward(case, torch.bfloat16)


def test_bwd_fp64():
    check_backward(SHARED_KEYS, torch.float64)


def test_repeated_index_counts_twice():
    # Key 0 in two slots and key 1 in one is the softmax over scores (s0, s0, s1).
    q = torch.randn(1, 2, 8, dtype=torch.float64)
    kv = torch.randn(3, 8, dtype=torch.float64)
    out, lse = glm5.ops.sparse_mla(q, kv, torch.tensor([[0, -1, 1, 0]], dtype=torch.int32), 0.5, 8)
    s = torch.einsum("thd,kd->thk", q, kv[[0, 0, 1]]) * 0.5
    torch.testing.assert_close(lse, torch.logsumexp(s, dim=-1))
    torch.testing.assert_close(out, torch.einsum("thk,kd->thd", s.softmax(dim=-1), kv[[0, 0, 1]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(dtype):
    q, kv, idx, scale, dv = make_inputs(CASES[2], dtype)
    want = run_fwd_bwd((q, kv, idx, scale, dv))
    q_nc = q.transpose(1, 2).contiguous().transpose(1, 2)  # [T, H, D] view with H-stride 1
    kv_nc = torch.stack([kv, torch.zeros_like(kv)], dim=2)[:, :, 0]  # every other element of a wider tensor
    idx_nc = idx.t().contiguous().t()
    assert not (q_nc.is_contiguous() or kv_nc.is_contiguous() or idx_nc.is_contiguous())
    got = run_fwd_bwd((q_nc, kv_nc, idx_nc, scale, dv))
    assert all(torch.equal(a, b) for a, b in zip(want, got))


@pytest.mark.parametrize(
    "case",
    [Case(T=0, S=5, K=3), Case(T=3, S=5, K=0), Case(T=3, S=0, K=4), Case(T=3, S=5, K=2, H=0)],
    ids=str,
)
def test_empty(case):
    x = make_inputs(case)
    out, lse = FWD(*x)
    assert out.shape == (case.T, case.H, case.dv) and lse.shape == (case.T, case.H)
    assert not out.any() and torch.isposinf(lse).all()
    dq, dkv = BWD(torch.randn_like(out), *x[:3], out, lse, *x[3:])
    assert dq.shape == x[0].shape and dkv.shape == x[1].shape and not dq.any() and not dkv.any()


@pytest.mark.parametrize("case", TINY, ids=str)
def test_opcheck(case):
    q, kv, idx, scale, dv = make_inputs(case)
    torch.library.opcheck(FWD.default, (q.requires_grad_(), kv.requires_grad_(), idx, scale, dv))
    q, kv = q.detach(), kv.detach()
    out, lse = FWD(q, kv, idx, scale, dv)
    torch.library.opcheck(BWD.default, (torch.randn_like(out), q, kv, idx, out, lse, scale, dv))


@pytest.mark.parametrize("case", TINY, ids=str)
def test_gradcheck_fp64(case):
    q, kv, idx, scale, dv = make_inputs(case, torch.float64)
    q.requires_grad_()
    kv.requires_grad_()
    assert torch.autograd.gradcheck(lambda q, kv: glm5.ops.sparse_mla(q, kv, idx, scale, dv)[0], (q, kv))


def test_compile_fullgraph():
    q, kv, idx, scale, dv = make_inputs(CASES[2])

    def fn(q, kv):
        out, lse = glm5.ops.sparse_mla(q, kv, idx, scale, dv)
        return (out * out).sum() + lse.nan_to_num(posinf=0.0).sum()

    results = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        leaves = [q.clone().requires_grad_(), kv.clone().requires_grad_()]
        loss = f(*leaves)
        results.append((loss.detach(), *torch.autograd.grad(loss, leaves)))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


def run_fwd_bwd(x: tuple) -> tuple:
    out, lse = FWD(*x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
    return (out, lse) + tuple(BWD(g, *x[:3], out, lse, *x[3:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_and_thread_independent(dtype):
    x = make_inputs(SHARED_KEYS, dtype)
    first = run_fwd_bwd(x)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            again = run_fwd_bwd(x)
            assert all(torch.equal(a, b) for a, b in zip(first, again)), f"results differ with {n} thread(s)"
    finally:
        torch.set_num_threads(threads)


def test_bwd_chunking_changes_no_bit(monkeypatch):
    # A tiny chunk budget processes a few queries per chunk (one per thread): every key's gradient is
    # still summed in (query, slot) order, so the result is bit-identical.
    x = make_inputs(SHARED_KEYS)
    whole = run_fwd_bwd(x)
    monkeypatch.setitem(os.environ, "GLM5_SPARSE_MLA_BWD_CHUNK_BYTES", "1")
    chunked = run_fwd_bwd(x)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


def _idx(x: tuple, value: int) -> tuple:
    idx = x[2].clone()
    idx[1, 0] = value
    return (x[0], x[1], idx) + x[3:]


BAD = {
    # name: (change to valid inputs, exception, the argument the message must name)
    "q not float": (lambda x: (x[0].int(), x[1].int()) + x[2:], RuntimeError, "q"),
    "kv dtype": (lambda x: (x[0], x[1].double()) + x[2:], RuntimeError, "kv"),
    "indices dtype": (lambda x: x[:2] + (x[2].long(),) + x[3:], RuntimeError, "indices"),
    "q rank": (lambda x: (x[0][:, 0],) + x[1:], RuntimeError, "q"),
    "kv rank": (lambda x: (x[0], x[1][None]) + x[2:], RuntimeError, "kv"),
    "indices rank": (lambda x: x[:2] + (x[2][0],) + x[3:], RuntimeError, "indices"),
    "D mismatch": (lambda x: (x[0], x[1][:, :-1]) + x[2:], RuntimeError, "kv"),
    "T mismatch": (lambda x: x[:2] + (x[2][:-1],) + x[3:], RuntimeError, "indices"),
    "index too big": (lambda x: _idx(x, x[1].shape[0]), IndexError, "indices"),
    "index below -1": (lambda x: _idx(x, -2), IndexError, "indices"),
    "d_v > D": (lambda x: x[:4] + (x[0].shape[2] + 1,), RuntimeError, "d_v"),
    "d_v = 0": (lambda x: x[:4] + (0,), RuntimeError, "d_v"),
    "sm_scale nan": (lambda x: x[:3] + (float("nan"), x[4]), RuntimeError, "sm_scale"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(name):
    change, exc, arg = BAD[name]
    x = make_inputs(CASES[2])
    out, lse = FWD(*x)
    q, kv, idx, scale, dv = change(x)
    with pytest.raises(exc, match=rf"\b{arg}\b"):
        FWD(q, kv, idx, scale, dv)
    with pytest.raises(exc, match=rf"\b{arg}\b"):
        BWD(out, q, kv, idx, out, lse, scale, dv)


def test_bad_device():
    # A CPU-only machine has no second device: call the CPU kernel directly with a meta tensor.
    q, kv, idx, scale, dv = make_inputs(CASES[2])
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match=r"\bkv\b.*meta"):
        FWD.default.redispatch(cpu, q, kv.to("meta"), idx, scale, dv)
    with pytest.raises(RuntimeError, match=r"\bindices\b.*meta"):
        FWD.default.redispatch(cpu, q, kv, idx.to("meta"), scale, dv)
    out, lse = FWD(q, kv, idx, scale, dv)
    with pytest.raises(RuntimeError, match=r"\bgrad_out\b.*meta"):
        BWD.default.redispatch(cpu, out.to("meta"), q, kv, idx, out, lse, scale, dv)


def test_bad_backward_inputs():
    q, kv, idx, scale, dv = make_inputs(CASES[2])
    out, lse = FWD(q, kv, idx, scale, dv)
    bad = {
        "grad_out": ((out[:, :, :-1], out, lse), RuntimeError),
        "out": ((out, out.double(), lse), RuntimeError),
        "lse": ((out, out, lse.double()), RuntimeError),
    }
    for arg, ((g, o, l), exc) in bad.items():
        with pytest.raises(exc, match=rf"\b{arg}\b"):
            BWD(g, q, kv, idx, o, l, scale, dv)
    with pytest.raises(RuntimeError, match=r"\blse\b"):
        BWD(out, q, kv, idx, out, lse[:, :-1], scale, dv)
    with pytest.raises(RuntimeError, match=r"\bgrad_out\b"):
        BWD(out.double(), q, kv, idx, out, lse, scale, dv)


def test_kernel_is_used():
    assert glm5.ops.get_impl() == "kernel"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("glm5::sparse_mla_fwd", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("glm5::sparse_mla_bwd", "CPU")


def test_case_ids_are_unique():
    ids = [str(c) for c in CASES]
    assert len(ids) == len(set(ids))
