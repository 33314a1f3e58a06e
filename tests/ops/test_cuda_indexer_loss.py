"""CUDA kernels of glm5::indexer_kl_loss_fwd / _bwd against the fp64 CPU reference (skipped without a GPU).

Status: the kernels (csrc/cuda/indexer_loss/) are compiled for sm_90a but have not yet run on a GPU;
these tests are the first thing to run on one (`pytest -m cuda tests/ops/test_cuda_indexer_loss.py`).

The inputs are the CPU tests' named cases (tests/ops/test_indexer_loss.py), built on the CPU and moved
to the GPU; the truth is reference.indexer_kl_loss in fp64 on the CPU, per query. The CUDA kernels sum
in fp32 (fp64 for fp64 inputs) in sequential per-thread chains, so the fp32/fp64 floor grows with the
number of summed terms: 8 sqrt(n) eps at the max (n = the longest sum: keys of a set or queries of a key).

Documented difference from the CPU kernels (no host sync): the VALUES of ks, ke and indices are not
validated. ks/ke are clamped to [0, S] (ks > ke: no visible key) and an index outside the clamped
visible range, out-of-range values included, is treated like -1 (not in the set).
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

import glm5
from numerics import assert_close_to_ref
from test_indexer_loss import (
    BAD,
    CASES,
    DEGENERATE,
    DENSE,
    LOSS_BWD,
    LOSS_FWD,
    SPARSE,
    TINY,
    Case,
    Inputs,
    dense_lse,
    empty_rows,
    grads_of_sum,
    kink_free_inputs,
    make_inputs,
    reference_per_query,
    with_grad,
)

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# GPU-only shapes: several head chunks of q (H > 16), tiles of fewer keys than a chunk boundary, and the
# GLM-5 widths (H=64 x 576, HI=32 x 128), where the host shrinks the tiling to fit shared memory.
EXTRA = [
    Case(T=64, S=700, HI=8, DI=32, H=40, D=72, docs=2, empty_every=9),
    Case(T=64, S=200, HI=8, DI=32, H=40, D=72, K=96, docs=2, outside=0.1, pad=0.1, dup=True, dead_rows=2),
    Case(T=24, S=160, HI=32, DI=128, H=64, D=576, docs=2),
    Case(T=24, S=160, HI=32, DI=128, H=64, D=576, K=64, outside=0.1, pad=0.1, dup=True),
]


def to_cuda(x: Inputs) -> Inputs:
    moved = {
        f.name: getattr(x, f.name).cuda()
        for f in dataclasses.fields(x)
        if isinstance(getattr(x, f.name), torch.Tensor)
    }
    return dataclasses.replace(x, **moved)


def longest_sum(case: Case) -> int:
    return max(case.S, case.T, case.K or 0, case.D, case.DI, 1)


def floor_cuda(truth: torch.Tensor, dtype: torch.dtype, n: int) -> float | None:
    """8 sqrt(n) eps at the max for fp32/fp64 results; None (the comparator's default) for bf16/fp16."""
    if dtype not in (torch.float32, torch.float64):
        return None
    finite = truth[torch.isfinite(truth)]
    top = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    return 8 * math.sqrt(n) * torch.finfo(dtype).eps * top


def cpu_grads(grads: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return [g.cpu() for g in grads]


def compare(case: Case, dtype: torch.dtype, main_dtype: torch.dtype | None = None) -> tuple[Inputs, torch.Tensor]:
    """CUDA kernel vs the fp64 reference: per-query losses and the gradients of their sum (numerics.py rule)."""
    x = make_inputs(case, dtype, main_dtype)
    wide = x.to(torch.float64)
    xc = to_cuda(x)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = LOSS_FWD(*xc.args())
    assert out.is_cuda and out.dtype == acc and out.shape == (case.T,)
    out = out.cpu()
    n = longest_sum(case)
    with torch.no_grad():
        truth = reference_per_query(wide)
        lowp = reference_per_query(x) if dtype != torch.float64 else None
    assert_close_to_ref(out, truth, lowp, floor=floor_cuda(truth, acc, n), name="per-query KL")
    grads = cpu_grads(grads_of_sum(xc, "kernel"))
    truth_grads = grads_of_sum(wide, "reference")
    lowp_grads = grads_of_sum(x, "reference") if dtype != torch.float64 else (None,) * 3
    for name, a, t, lp in zip(("dq_idx", "dk_idx", "dw"), grads, truth_grads, lowp_grads):
        assert a.dtype == dtype and a.shape == t.shape, name
        assert_close_to_ref(a, t, lp, floor=floor_cuda(t, dtype, n), name=name)
    assert torch.allclose(glm5.ops.indexer_kl_loss(*xc.args()).cpu(), out.sum(), rtol=1e-6, atol=1e-6)
    return x, out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES + EXTRA, ids=str)
def test_matches_reference(case, dtype):
    if dtype in (torch.bfloat16, torch.float16) and case.T < 13:
        pytest.skip("low-precision rule needs enough queries for a representative reference error (as on the CPU)")
    x, out = compare(case, dtype)
    empty = empty_rows(x)
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "an empty row's loss must be exactly 0"
    assert float(out.min()) >= -1e-6, "KL must be non-negative (up to rounding)"


@pytest.mark.parametrize(
    "indexer_dtype, main_dtype",
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)],
    ids=str,
)
@pytest.mark.parametrize("case", [DENSE[2], SPARSE[1]], ids=str)
def test_main_attention_dtype_may_differ(case, indexer_dtype, main_dtype):
    # q/kv in another dtype than the indexer's: the host converts them to the accumulation dtype.
    compare(case, indexer_dtype, main_dtype)


@pytest.mark.parametrize("case", [DENSE[2], DENSE[4], SPARSE[1], SPARSE[3]], ids=str)
def test_matches_cpu_kernel(case):
    # The two kernels agree closely on fp32, against each other (not only against the reference).
    x = make_inputs(case)
    g = torch.rand(case.T, generator=torch.Generator().manual_seed(3)) + 0.5
    cpu = (LOSS_FWD(*x.args()),) + tuple(LOSS_BWD(g, *x.args()))
    xc = to_cuda(x)
    gpu = (LOSS_FWD(*xc.args()),) + tuple(LOSS_BWD(g.cuda(), *xc.args()))
    for name, a, b in zip(("loss", "dq_idx", "dk_idx", "dw"), gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5 * max(1.0, float(b.abs().max())), msg=name)


@pytest.mark.parametrize("case", [DENSE[3], SPARSE[3], EXTRA[1]], ids=str)
def test_per_query_grad_weights(case):
    # The backward op scales query t's gradient by grad[t] (what sum() hides: all ones).
    x = make_inputs(case)
    g = torch.rand(case.T, generator=torch.Generator().manual_seed(1)) * 2 - 0.5
    truth = grads_of_sum(x.to(torch.float64), "reference", g)
    got = cpu_grads(grads_of_sum(to_cuda(x), "kernel", g.cuda()))
    for name, a, t in zip(("dq_idx", "dk_idx", "dw"), got, truth):
        assert_close_to_ref(a, t, factor=0.0, floor=1e-5 * float(t.abs().max()), name=name)


@pytest.mark.parametrize("case", [DENSE[5], SPARSE[4], SPARSE[3]], ids=str)
def test_all_zero_target_rows_are_empty(case):
    x = make_inputs(case)
    empty = empty_rows(x)
    assert empty.any()
    xc = to_cuda(x)
    out = LOSS_FWD(*xc.args()).cpu()
    dq_idx, _, dw = cpu_grads(LOSS_BWD(torch.ones(case.T, device="cuda"), *xc.args()))
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert not dq_idx[empty].any() and not dw[empty].any()
    assert out[~empty].ge(0).all() and out[~empty].gt(0).any()


@pytest.mark.parametrize("case", DEGENERATE, ids=str)
def test_degenerate_and_empty_shapes(case):
    # Same results as the CPU kernel (itself checked against the reference in test_indexer_loss.py).
    x = make_inputs(case)
    if case.K == 0:  # a finite target on the visible keys, which the loss must still ignore
        x = dataclasses.replace(x, lse=dense_lse(x.q, x.kv, x.ks, x.ke, x.sm_scale).float())
    g = torch.ones(case.T)
    want = (LOSS_FWD(*x.args()),) + tuple(LOSS_BWD(g, *x.args()))
    xc = to_cuda(x)
    got = (LOSS_FWD(*xc.args()),) + tuple(LOSS_BWD(g.cuda(), *xc.args()))
    for name, a, b in zip(("loss", "dq_idx", "dk_idx", "dw"), got, want):
        assert a.is_cuda and a.shape == b.shape and a.dtype == b.dtype, name
        assert_close_to_ref(a.cpu(), b, floor=floor_cuda(b, b.dtype, longest_sum(case)), name=name)


def test_zero_when_indexer_matches_target():
    # fp64, one-hot keys: softmax(I_t) = p_t exactly (up to rounding) gives KL = 0 and zero gradients.
    from glm5.ops import reference

    case = Case(T=12, S=12, HI=1, DI=12, H=3, D=8, docs=2)
    x = make_inputs(case, torch.float64)
    keys = torch.arange(case.S, dtype=torch.int32).expand(case.T, case.S)
    vis = reference.visible_mask(x.ks, x.ke, case.S)
    p = reference.head_summed_probs(x.q, x.kv, x.lse, keys.masked_fill(~vis, -1), x.sm_scale)
    p = p / p.sum(dim=1, keepdim=True)
    q_idx = torch.where(vis, p.clamp_min(1e-300).log() + 40.0, torch.zeros_like(p))[:, None, :]
    one_hot, ones = torch.eye(case.S, dtype=torch.float64), torch.ones(case.T, 1, dtype=torch.float64)
    x = to_cuda(dataclasses.replace(x, q_idx=q_idx, k_idx=one_hot, w=ones))
    out, grads = LOSS_FWD(*x.args()), LOSS_BWD(torch.ones(case.T, dtype=torch.float64, device="cuda"), *x.args())
    assert float(out.abs().max()) < 1e-13
    assert all(float(g.abs().max()) < 1e-12 for g in grads)
    shifted = dataclasses.replace(x, q_idx=x.q_idx * 1.01)  # any other logits: KL > 0
    assert float(LOSS_FWD(*shifted.args()).sum()) > 1e-6


@pytest.mark.parametrize("case", TINY, ids=str)
def test_opcheck(case):
    x, _ = with_grad(to_cuda(make_inputs(case)))
    torch.library.opcheck(LOSS_FWD.default, x.args())
    plain = to_cuda(make_inputs(case))
    torch.library.opcheck(LOSS_BWD.default, (torch.rand(case.T, device="cuda"),) + plain.args())


@pytest.mark.parametrize("case", TINY, ids=str)
def test_gradcheck_fp64(case):
    x, leaves = with_grad(to_cuda(kink_free_inputs(case)))
    rest = x.args()[3:]

    def fn(q_idx, k_idx, w):
        return glm5.ops.indexer_kl_loss(q_idx, k_idx, w, *rest)

    assert float(fn(*leaves)) > 0
    assert torch.autograd.gradcheck(fn, tuple(leaves))


@pytest.mark.parametrize("case", [DENSE[1], SPARSE[0]], ids=str)
def test_compile_fullgraph(case):
    x = to_cuda(make_inputs(case))
    rest = x.args()[3:]

    def fn(q_idx, k_idx, w):
        return glm5.ops.indexer_kl_loss(q_idx, k_idx, w, *rest) * 2.0

    torch._dynamo.reset()
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        _, leaves = with_grad(x)
        loss = f(*leaves)
        results.append((loss.detach(), *torch.autograd.grad(loss, leaves)))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


def _run(x: Inputs, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (LOSS_FWD(*x.args()),) + tuple(LOSS_BWD(g, *x.args()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "case", [Case(T=70, S=300, H=16, docs=2), Case(T=70, S=90, K=24, outside=0.2, pad=0.1, dup=True)], ids=str
)
def test_deterministic(case, dtype, monkeypatch):
    # Run twice, on another stream, and (sparse) with one query per sort chunk: every bit equal.
    x = to_cuda(make_inputs(case, dtype))
    g = (torch.rand(case.T) + 0.5).cuda()
    first = _run(x, g)
    assert all(torch.equal(a, b) for a, b in zip(first, _run(x, g)))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        again = _run(x, g)
    torch.cuda.current_stream().wait_stream(side)
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "a side stream changed the results"
    monkeypatch.setitem(os.environ, "GLM5_INDEXER_LOSS_SORT_ENTRIES", "1")
    assert all(torch.equal(a, b) for a, b in zip(first, _run(x, g))), "the sort chunking changed the results"


# With bf16/fp16 q, kv and D % 64 == 0 the target P comes from the warpgroup-MMA kernel on an sm_90 GPU
# (csrc/cuda/indexer_loss/probs_wgmma_kernel.cuh), per chunk of queries; GLM5_WGMMA=0 computes it on CUDA
# cores instead, and GLM5_INDEXER_LOSS_TARGET_BYTES shrinks the chunks.
WGMMA_TARGET = [
    Case(T=32, S=300, HI=8, DI=32, H=80, D=128, K=96, docs=2, outside=0.1, pad=0.1, dup=True, lse_inf=True),
    Case(T=40, S=400, HI=8, DI=32, H=70, D=128, docs=3, empty_every=7, lse_inf=True),  # dense
    EXTRA[3],
    EXTRA[2],  # dense at GLM-5 widths
]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="the wgmma kernel needs an sm_90 GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", WGMMA_TARGET, ids=str)
def test_wgmma_target(case, dtype, monkeypatch):
    monkeypatch.setitem(os.environ, "GLM5_WGMMA", "1")
    compare(case, dtype)
    x = to_cuda(make_inputs(case, dtype))
    g = (torch.rand(case.T) + 0.5).cuda()
    on = _run(x, g)
    assert all(torch.equal(a, b) for a, b in zip(on, _run(x, g))), "not deterministic"
    width = case.K or case.S
    monkeypatch.setitem(os.environ, "GLM5_INDEXER_LOSS_TARGET_BYTES", str(4 * width * 3))  # chunks of 3 queries
    assert all(torch.equal(a, b) for a, b in zip(on, _run(x, g))), "the query chunking changed the results"
    monkeypatch.setitem(os.environ, "GLM5_WGMMA", "0")
    off = _run(x, g)
    for name, a, b in zip(("loss", "dq_idx", "dk_idx", "dw"), on, off):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2 * max(1.0, float(b.abs().max())),
                                   msg=name)


# The CPU path's value checks (ValueError/IndexError) are not done on the GPU: see test_values_are_clamped.
VALUE_CHECKS = {"ks negative", "ke past S", "ke before ks", "index too big", "index below -1"}


@pytest.mark.parametrize("name", [n for n in BAD if n not in VALUE_CHECKS] + ["kv device", "indices device"])
def test_bad_input(name):
    x = to_cuda(make_inputs(SPARSE[0]))
    if name == "kv device":
        x, arg = dataclasses.replace(x, kv=x.kv.cpu()), "kv"
    elif name == "indices device":
        x, arg = dataclasses.replace(x, indices=x.indices.cpu()), "indices"
    else:
        change, _, arg = BAD[name]
        x = change(x)
    with pytest.raises(RuntimeError, match=rf"\b{arg}\b"):
        LOSS_FWD(*x.args())
    with pytest.raises(RuntimeError, match=rf"\b{arg}\b"):
        LOSS_BWD(torch.ones(x.q_idx.shape[0], device="cuda"), *x.args())


def test_bad_grad():
    x = to_cuda(make_inputs(SPARSE[0]))
    T = x.q_idx.shape[0]
    for grad in (torch.ones(T + 1, device="cuda"), torch.ones(T, dtype=torch.int32, device="cuda"), torch.ones(T)):
        with pytest.raises(RuntimeError, match=r"\bgrad\b"):
            LOSS_BWD(grad, *x.args())


@pytest.mark.parametrize("name", sorted(VALUE_CHECKS))
def test_values_are_clamped(name):
    # Documented CUDA difference: bad ks/ke/indices values act as their clamped meaning, bit for bit.
    x = make_inputs(SPARSE[1])
    bad = BAD[name][0](x)
    S = x.k_idx.shape[0]
    lo = bad.ks.clamp(0, S)
    hi = torch.maximum(lo, bad.ke.clamp(max=S))
    idx = bad.indices.masked_fill((bad.indices < lo[:, None]) | (bad.indices >= hi[:, None]), -1)
    fixed = dataclasses.replace(bad, ks=lo, ke=hi, indices=idx)
    g = (torch.rand(SPARSE[1].T) + 0.5).cuda()
    got, want = _run(to_cuda(bad), g), _run(to_cuda(fixed), g)
    assert all(torch.equal(a, b) for a, b in zip(got, want)), name
    dense_got = _run(to_cuda(dataclasses.replace(bad, indices=None)), g)
    dense_want = _run(to_cuda(dataclasses.replace(fixed, indices=None)), g)
    assert all(torch.equal(a, b) for a, b in zip(dense_got, dense_want)), name


def test_every_op_has_a_cuda_kernel():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    missing = [op for op in glm5.ops.OP_NAMES if not has(f"glm5::{op}", "CUDA")]
    assert not missing, f"no CUDA kernel for {missing}"
