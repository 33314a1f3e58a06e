"""CUDA kernels of the DeepSeek Sparse Attention ops against the references (skipped without a GPU).

Status: the CUDA kernels are compiled for sm_90a but have not yet run on a GPU; these tests are the
first thing to run on one (`pytest -m cuda tests/ops/test_cuda_dsa.py`).

The inputs are the CPU tests' named cases, built on the CPU and moved to the GPU; the truth is the
reference in fp64 on the CPU. The CUDA kernels accumulate in fp32 on CUDA cores (fp64 for fp64 inputs)
with an fp32 running softmax sum (the CPU kernel keeps it in fp64), so the fp32 floor grows with the
number of summed terms: sqrt(K) eps at the max (a random-walk bound on a K-term fp32 sum), x8.

Documented differences from the CPU kernels (no host sync in the forward):
- sparse_mla: index values are not range-checked; a slot outside [-1, S) is skipped like -1.
- indexer_*: ks/ke values are not validated; the kernels clamp them to [0, S].
- indexer_topk: a NaN score is treated as -inf (never selected) instead of raising ValueError.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import glm5
from glm5.ops import reference
from numerics import assert_close_to_ref
from test_sparse_mla import CASES as MLA_CASES
from test_sparse_mla import SHARED_KEYS, TINY, dead, make_inputs, out_and_grads, upcast
from test_sparse_mla import floor as mla_floor
import test_lightning_indexer as li

pytestmark = pytest.mark.cuda

FWD = torch.ops.glm5.sparse_mla_fwd
BWD = torch.ops.glm5.sparse_mla_bwd
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def cuda(x: tuple) -> tuple:
    return tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in x)


def floor_cuda(truth: torch.Tensor, dtype: torch.dtype, K: int) -> float | None:
    """The CPU tests' floor, widened for fp32 results to 8 sqrt(K) eps at the max."""
    if dtype != torch.float32:
        return mla_floor(truth, dtype, K)
    finite = truth[torch.isfinite(truth)]
    top = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    return 8 * math.sqrt(max(K, 1)) * torch.finfo(torch.float32).eps * top


# ---------------------------------------------------------------------------------------------
# sparse_mla
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MLA_CASES, ids=str)
def test_sparse_mla_fwd(case, dtype):
    x = make_inputs(case, dtype)
    out, lse = glm5.ops.sparse_mla(*cuda(x))
    assert out.is_cuda and out.dtype == dtype and out.shape == (case.T, case.H, case.dv)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert lse.dtype == acc and lse.shape == (case.T, case.H)
    out, lse = out.cpu(), lse.cpu()
    truth_out, truth_lse = reference.sparse_mla(*upcast(x))
    lowp_out, _ = reference.sparse_mla(*x) if dtype != torch.float64 else (None, None)
    assert_close_to_ref(out, truth_out, lowp_out, floor=floor_cuda(truth_out, dtype, case.K), name="out")
    assert_close_to_ref(lse, truth_lse, None, floor=floor_cuda(truth_lse, acc, case.K), name="lse")
    empty = dead(x)
    assert not out[empty].any() and torch.isposinf(lse[empty]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", MLA_CASES + [SHARED_KEYS], ids=str)
def test_sparse_mla_bwd(case, dtype):
    # CUDA backward (through autograd of glm5.ops.sparse_mla) against autograd of the fp64 reference.
    x = make_inputs(case, dtype)
    g = torch.randn(case.T, case.H, case.dv, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    _, _, dq, dkv = out_and_grads(glm5.ops.sparse_mla, cuda(x), g.to(acc).cuda())
    _, _, truth_dq, truth_dkv = out_and_grads(reference.sparse_mla, upcast(x), g)
    lowp = out_and_grads(reference.sparse_mla, x, g.to(acc)) if dtype != torch.float64 else (None,) * 4
    assert dq.dtype == dtype and dkv.dtype == dtype
    for name, a, t, lp in (("dq", dq.cpu(), truth_dq, lowp[2]), ("dkv", dkv.cpu(), truth_dkv, lowp[3])):
        assert_close_to_ref(a, t, lp, factor=3.0, floor=floor_cuda(t, dtype, case.K), name=name)
    assert not dq.cpu()[dead(x)].any()


def test_sparse_mla_matches_cpu_kernel():
    # The two kernels agree closely on fp32 (both against each other, not only against the reference).
    x = make_inputs(SHARED_KEYS)
    out_c, lse_c = FWD(*x)
    out_g, lse_g = FWD(*cuda(x))
    torch.testing.assert_close(out_g.cpu(), out_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_g.cpu(), lse_c, rtol=1e-5, atol=1e-5)


def test_sparse_mla_empty_shapes():
    from test_sparse_mla import Case

    for case in (Case(T=0, S=5, K=3), Case(T=3, S=5, K=0), Case(T=3, S=0, K=4), Case(T=3, S=5, K=2, H=0)):
        x = cuda(make_inputs(case))
        out, lse = FWD(*x)
        assert out.shape == (case.T, case.H, case.dv) and not out.any() and torch.isposinf(lse).all()
        dq, dkv = BWD(torch.randn_like(out), *x[:3], out, lse, *x[3:])
        assert dq.shape == x[0].shape and dkv.shape == x[1].shape and not dq.any() and not dkv.any()


@pytest.mark.parametrize("case", TINY, ids=str)
def test_sparse_mla_opcheck(case):
    q, kv, idx, scale, dv = cuda(make_inputs(case))
    torch.library.opcheck(FWD.default, (q.requires_grad_(), kv.requires_grad_(), idx, scale, dv))
    q, kv = q.detach(), kv.detach()
    out, lse = FWD(q, kv, idx, scale, dv)
    torch.library.opcheck(BWD.default, (torch.randn_like(out), q, kv, idx, out, lse, scale, dv))


@pytest.mark.parametrize("case", TINY, ids=str)
def test_sparse_mla_gradcheck_fp64(case):
    q, kv, idx, scale, dv = cuda(make_inputs(case, torch.float64))
    q.requires_grad_()
    kv.requires_grad_()
    assert torch.autograd.gradcheck(lambda q, kv: glm5.ops.sparse_mla(q, kv, idx, scale, dv)[0], (q, kv))


def test_sparse_mla_compile_fullgraph():
    q, kv, idx, scale, dv = cuda(make_inputs(MLA_CASES[2]))

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


def _mla_fwd_bwd(x: tuple) -> tuple:
    out, lse = FWD(*x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype).to(out.device)
    return (out, lse) + tuple(BWD(g, *x[:3], out, lse, *x[3:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sparse_mla_deterministic(dtype, monkeypatch):
    # Run twice, and with a tiny backward chunk (one query per chunk): every bit equal.
    x = cuda(make_inputs(SHARED_KEYS, dtype))
    first = _mla_fwd_bwd(x)
    assert all(torch.equal(a, b) for a, b in zip(first, _mla_fwd_bwd(x)))
    monkeypatch.setitem(os.environ, "GLM5_SPARSE_MLA_BWD_CHUNK_BYTES", "1")
    assert all(torch.equal(a, b) for a, b in zip(first, _mla_fwd_bwd(x)))


def test_sparse_mla_out_of_range_index_is_skipped():
    # Documented CUDA difference: no host-side range check (it would sync); such a slot acts as -1.
    x = make_inputs(MLA_CASES[2])
    bad = x[2].clone()
    bad[1, 0], bad[2, 3] = x[1].shape[0], -7
    fixed = bad.masked_fill((bad < -1) | (bad >= x[1].shape[0]), -1)
    got = FWD(*cuda(x[:2] + (bad,) + x[3:]))
    want = FWD(*cuda(x[:2] + (fixed,) + x[3:]))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize(
    "change, arg",
    [
        (lambda x: (x[0].int(), x[1].int()) + x[2:], "q"),
        (lambda x: (x[0], x[1].double()) + x[2:], "kv"),
        (lambda x: x[:2] + (x[2].long(),) + x[3:], "indices"),
        (lambda x: (x[0], x[1][:, :-1]) + x[2:], "kv"),
        (lambda x: x[:2] + (x[2][:-1],) + x[3:], "indices"),
        (lambda x: x[:4] + (x[0].shape[2] + 1,), "d_v"),
        (lambda x: x[:3] + (float("nan"), x[4]), "sm_scale"),
        (lambda x: (x[0], x[1].cpu()) + x[2:], "kv"),
    ],
    ids=["q-int", "kv-dtype", "indices-dtype", "D-mismatch", "T-mismatch", "d_v", "sm_scale", "kv-device"],
)
def test_sparse_mla_bad_input(change, arg):
    x = cuda(make_inputs(MLA_CASES[2]))
    out, lse = FWD(*x)
    q, kv, idx, scale, dv = change(x)
    with pytest.raises(RuntimeError, match=rf"\b{arg}\b"):
        FWD(q, kv, idx, scale, dv)
    with pytest.raises(RuntimeError, match=rf"\b{arg}\b"):
        BWD(out, q, kv, idx, out, lse, scale, dv)


# ---------------------------------------------------------------------------------------------
# lightning indexer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", li.CASES, ids=str)
def test_indexer_logits(case, dtype):
    x = li.make_inputs(case, dtype)
    out = glm5.ops.indexer_logits(*cuda(x))
    assert out.is_cuda and out.dtype == torch.float32 and out.shape == (case.T, case.S)
    out = out.cpu()
    truth = reference.indexer_logits(*li.upcast(x))
    lowp = reference.indexer_logits(*x)
    assert_close_to_ref(out, truth, lowp, name="logits")  # also equal -inf masks
    if case.ints:
        assert torch.equal(out, truth.float())  # integer inputs: every score is exact


def test_indexer_logits_fp64():
    x = li.make_inputs(li.CASES[2], torch.float64)
    out = glm5.ops.indexer_logits(*cuda(x)).cpu()
    truth = reference.indexer_logits(*x)
    finite = torch.isfinite(truth)
    assert torch.equal(finite, torch.isfinite(out))
    assert float((out[finite] - truth[finite]).abs().max()) < 1e-12 * float(truth[finite].abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", li.BWD_CASES, ids=str)
def test_indexer_logits_bwd(case, dtype):
    x = li.make_inputs(case, dtype)
    g = torch.randn(case.T, case.S, generator=torch.Generator().manual_seed(1))
    got = li.grads(glm5.ops.indexer_logits, cuda(x), g.cuda())
    truth = li.grads(reference.indexer_logits, li.upcast(x), g)
    lowp = li.grads(reference.indexer_logits, x, g)
    for name, a, t, lp in zip(("dq", "dk", "dw"), got, truth, lowp):
        assert a.is_cuda and a.dtype == dtype
        assert_close_to_ref(a.cpu(), t, lp, name=name)


def test_indexer_logits_bwd_exact_relu_at_zero():
    case = li.Case(T=11, S=70, HI=3, DI=4, layout="random", empty_rows=2, ints=True)
    x = li.make_inputs(case)
    g = torch.randint(-3, 4, (case.T, case.S), generator=torch.Generator().manual_seed(1)).float()
    got, want = li.grads(glm5.ops.indexer_logits, cuda(x), g.cuda()), li.grads(reference.indexer_logits, x, g)
    for name, a, b in zip(("dq", "dk", "dw"), got, want):
        assert torch.equal(a.cpu(), b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", li.CASES + li.LONG, ids=str)
def test_indexer_topk(case, dtype):
    x = cuda(li.make_inputs(case, dtype))
    idx, val = glm5.ops.indexer_topk(*x, topk=case.topk)
    assert idx.dtype == torch.int32 and val.dtype == torch.float32 and idx.shape == (case.T, case.topk)
    # Exactly the selection rule on the CUDA logits kernel's (bitwise shared) scores.
    own_idx, own_val = li.select_from_logits(glm5.ops.indexer_logits(*x).cpu(), case.topk)
    assert torch.equal(idx.cpu(), own_idx)
    assert torch.equal(val.cpu(), own_val)
    # And against the CPU reference: the same valid counts; exact on integer (tied) inputs.
    ref_idx, ref_val = reference.indexer_topk(*(t.cpu() if isinstance(t, torch.Tensor) else t for t in x),
                                              topk=case.topk)
    assert torch.equal((idx.cpu() >= 0).sum(1), (ref_idx >= 0).sum(1))
    if case.ints:
        assert torch.equal(idx.cpu(), ref_idx) and torch.equal(val.cpu(), ref_val)


def test_indexer_topk_nan_is_never_selected():
    # Documented CUDA difference: NaN scores act as -inf (the CPU op raises ValueError).
    case = li.CASES[1]
    q, k, w, ks, ke = li.make_inputs(case)
    k[3] = float("nan")
    idx, val = glm5.ops.indexer_topk(*cuda((q, k, w, ks, ke)), topk=case.topk)
    assert not (idx == 3).any() and not val.isnan().any()


def test_indexer_opcheck():
    x = cuda(li.make_inputs(li.TINY))
    torch.library.opcheck(li.LOGITS.default, (x[0].requires_grad_(), x[1].requires_grad_(), x[2].requires_grad_(),
                                              *x[3:]))
    x = tuple(t.detach() for t in x)
    torch.library.opcheck(li.TOPK.default, (*x, li.TINY.topk))
    g = torch.randn(li.TINY.T, li.TINY.S, device="cuda")
    torch.library.opcheck(li.LOGITS_BWD.default, (g, *x))


def test_indexer_gradcheck_fp64():
    x = cuda(li.make_inputs(li.TINY, torch.float64))
    visible = reference.visible_mask(x[3], x[4], li.TINY.S)

    def fn(q, k, w):
        return glm5.ops.indexer_logits(q, k, w, x[3], x[4]).masked_fill(~visible, 0.0)

    assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_() for t in x[:3]))


def test_indexer_compile_fullgraph():
    x = cuda(li.make_inputs(li.CASES[1]))

    def fn(q, k, w):
        idx, val = glm5.ops.indexer_topk(q, k, w, x[3], x[4], topk=5)
        logits = glm5.ops.indexer_logits(q, k, w, x[3], x[4])
        return logits.nan_to_num(neginf=0.0).sum() + val.nan_to_num(neginf=0.0).sum(), idx

    eager, compiled = fn(*x[:3]), torch.compile(fn, fullgraph=True)(*x[:3])
    torch.testing.assert_close(compiled[0], eager[0])
    assert torch.equal(compiled[1], eager[1])


def test_indexer_deterministic():
    case = li.BWD_CASES[1]
    x = cuda(li.make_inputs(case))
    g = torch.randn(case.T, case.S, device="cuda")

    def run():
        return (glm5.ops.indexer_logits(*x), *glm5.ops.indexer_topk(*x, topk=37), *li.LOGITS_BWD(g, *x))

    assert all(torch.equal(a, b) for a, b in zip(run(), run()))


@pytest.mark.parametrize(
    "change, arg",
    [
        (lambda x: (x[0], x[1].double()) + x[2:], "k"),
        (lambda x: (x[0], x[1], x[2][:, :-1]) + x[3:], "w"),
        (lambda x: (x[0], x[1][:, :-1]) + x[2:], "k"),
        (lambda x: x[:3] + (x[3].long(), x[4]), "ks"),
        (lambda x: x[:4] + (x[4][:-1],), "ke"),
        (lambda x: (x[0], x[1].cpu()) + x[2:], "k"),
    ],
    ids=["k-dtype", "w-shape", "DI-mismatch", "ks-dtype", "ke-shape", "k-device"],
)
def test_indexer_bad_input(change, arg):
    x = change(cuda(li.make_inputs(li.CASES[1])))
    for call in (lambda: li.LOGITS(*x), lambda: li.TOPK(*x, 4)):
        with pytest.raises((RuntimeError, ValueError), match=rf"\b{arg}\b"):
            call()
    with pytest.raises(ValueError, match="topk"):
        li.TOPK(*cuda(li.make_inputs(li.CASES[1])), 0)


def test_cuda_kernels_registered():
    for op in ("sparse_mla_fwd", "sparse_mla_bwd", "indexer_logits", "indexer_logits_bwd", "indexer_topk"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"glm5::{op}", "CUDA"), op
