"""The indexer KL loss CUDA kernels (csrc/cuda/indexer_loss/kernels.cuh) on the CPU simulator.

The launches mirror api.cu (input conversions, tiling search against an H100/H200's 232448-byte
shared-memory limit, grids, the sparse backward's sort chunking; the radix sort of the slots by key is a
std::stable_sort). Cases and tolerances are tests/ops/test_cuda_indexer_loss.py's: the CPU tests' case
lists against the fp64 reference with floor_cuda; sizes stay small (every simulated CUDA thread is an OS
thread), GLM-5's head widths run with two queries.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from numerics import assert_close_to_ref
from sim_build import load_sim
from test_cuda_indexer_loss import floor_cuda, longest_sum
from test_indexer_loss import (
    BAD,
    DENSE,
    LOSS_BWD,
    LOSS_FWD,
    SPARSE,
    Case,
    Inputs,
    dense_lse,
    empty_rows,
    grads_of_sum,
    make_inputs,
    reference_per_query,
)

H100_SMEM = 232448
SMALL_SMEM = 2000  # forces 8-key tiles and q's heads in chunks of 8 (or 4) for SHRUNK
SHRUNK = Case(T=6, S=50, HI=3, DI=8, H=20, D=12, docs=2)
SHRUNK_SPARSE = Case(T=6, S=50, HI=3, DI=8, H=20, D=12, K=12, docs=2, pad=0.2, dup=True)
GLM5_DENSE = Case(T=2, S=40, HI=32, DI=128, H=64, D=576)
GLM5_SPARSE = Case(T=2, S=60, HI=32, DI=128, H=64, D=576, K=24, outside=0.1, pad=0.1, dup=True)
CASES = [DENSE[0], DENSE[1], DENSE[3], DENSE[5], SPARSE[0], SPARSE[2], SPARSE[3], SPARSE[4], GLM5_DENSE, GLM5_SPARSE]


@pytest.fixture(scope="module")
def sim():
    return load_sim("glm5_cuda_sim_indexer_loss", "sim_indexer_loss.cpp")


def sim_fwd(sim, x: Inputs, smem: int = H100_SMEM, target_chunk: int = 0) -> torch.Tensor:
    return sim.fwd(*x.args(), smem, target_chunk)[0]


def sim_bwd(sim, g: torch.Tensor, x: Inputs, smem: int = H100_SMEM, sort_entries: int = 1 << 24,
            target_chunk: int = 0) -> tuple:
    return tuple(sim.bwd(g, *x.args(), smem, sort_entries, target_chunk)[:3])


def compare(sim, case: Case, dtype: torch.dtype, main_dtype: torch.dtype | None = None, smem: int = H100_SMEM,
            target_chunk: int = 0):
    x = make_inputs(case, dtype, main_dtype)
    wide = x.to(torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n = longest_sum(case)
    out = sim_fwd(sim, x, smem, target_chunk)
    assert out.dtype == acc and out.shape == (case.T,)
    truth = reference_per_query(wide)
    lowp = reference_per_query(x) if dtype != torch.float64 else None
    assert_close_to_ref(out, truth, lowp, floor=floor_cuda(truth, acc, n), name="per-query KL")
    empty = empty_rows(x)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    g = torch.rand(case.T, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 0.5
    grads = sim_bwd(sim, g, x, smem, target_chunk=target_chunk)
    truth_grads = grads_of_sum(wide, "reference", g)
    lowp_grads = grads_of_sum(x, "reference", g.to(acc)) if dtype != torch.float64 else (None,) * 3
    for name, a, t, lp in zip(("dq_idx", "dk_idx", "dw"), grads, truth_grads, lowp_grads):
        assert a.dtype == dtype and a.shape == t.shape, name
        assert_close_to_ref(a, t, lp, floor=floor_cuda(t, dtype, n), name=name)
    assert not grads[0][empty].any() and not grads[2][empty].any()
    return x, out, grads


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sim_fp32(sim, case):
    compare(sim, case, torch.float32)


@pytest.mark.parametrize("case", [DENSE[3], SPARSE[3], GLM5_SPARSE], ids=str)
def test_sim_bf16(sim, case):
    compare(sim, case, torch.bfloat16)


@pytest.mark.parametrize("case", [DENSE[1], SPARSE[3], GLM5_DENSE], ids=str)
def test_sim_fp64(sim, case):
    compare(sim, case, torch.float64)


@pytest.mark.parametrize("case", [DENSE[1], SPARSE[0]], ids=str)
def test_sim_main_dtype_differs(sim, case):
    compare(sim, case, torch.float32, torch.bfloat16)
    compare(sim, case, torch.bfloat16, torch.float32)


@pytest.mark.parametrize("case", [SHRUNK, SHRUNK_SPARSE], ids=str)
def test_sim_small_tiles_and_head_chunks(sim, case):
    # A small shared-memory limit: 8-key tiles, q's heads in several chunks. The per-key values do not
    # depend on the tiling, the per-query sums over tiles do (by rounding only): close to the default tiling.
    x = make_inputs(case)
    _, tiling = sim.fwd(*x.args(), SMALL_SMEM)
    assert tiling[0] == 8 and tiling[1] < case.H, tiling
    _, _, _, bwd_tiling = sim.bwd(torch.ones(case.T), *x.args(), SMALL_SMEM, 1 << 24)
    assert bwd_tiling[0] == 8 and bwd_tiling[1] < case.H, bwd_tiling
    compare(sim, case, torch.float32, smem=SMALL_SMEM)
    g = torch.rand(case.T) + 0.5
    small = (sim_fwd(sim, x, SMALL_SMEM),) + sim_bwd(sim, g, x, SMALL_SMEM)
    large = (sim_fwd(sim, x),) + sim_bwd(sim, g, x)
    for name, a, b in zip(("loss", "dq_idx", "dk_idx", "dw"), small, large):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(b.abs().max())), msg=name)


def test_sim_sort_chunking_is_bitwise_neutral(sim):
    case = SPARSE[3]
    x = make_inputs(case)
    g = torch.rand(case.T) + 0.5
    one = sim_bwd(sim, g, x, sort_entries=1)  # one query per sort chunk
    three = sim_bwd(sim, g, x, sort_entries=3 * case.K)
    whole = sim_bwd(sim, g, x)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(one, three, whole))


@pytest.mark.parametrize("case", [DENSE[3], SPARSE[3]], ids=str)
def test_sim_matches_cpu_kernel(sim, case):
    x = make_inputs(case)
    g = torch.rand(case.T, generator=torch.Generator().manual_seed(3)) + 0.5
    want = (LOSS_FWD(*x.args()),) + tuple(LOSS_BWD(g, *x.args()))
    got = (sim_fwd(sim, x),) + sim_bwd(sim, g, x)
    for name, a, b in zip(("loss", "dq_idx", "dk_idx", "dw"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(b.abs().max())), msg=name)


@pytest.mark.parametrize(
    "case", [Case(T=3, S=0), Case(T=3, S=0, K=2), Case(T=6, S=6, HI=0), Case(T=6, S=9, K=3, HI=0),
             Case(T=6, S=6, H=0), Case(T=6, S=9, K=0)], ids=str
)
def test_sim_degenerate(sim, case):
    x = make_inputs(case)
    if case.K == 0:
        x = dataclasses.replace(x, lse=dense_lse(x.q, x.kv, x.ks, x.ke, x.sm_scale).float())
    g = torch.ones(case.T)
    want = (LOSS_FWD(*x.args()),) + tuple(LOSS_BWD(g, *x.args()))
    got = (sim_fwd(sim, x),) + sim_bwd(sim, g, x)
    for name, a, b in zip(("loss", "dq_idx", "dk_idx", "dw"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close_to_ref(a, b, floor=floor_cuda(b, b.dtype, longest_sum(case)), name=name)


@pytest.mark.parametrize("name", ["ks negative", "ke past S", "ke before ks", "index too big", "index below -1"])
def test_sim_values_are_clamped(sim, name):
    # ks/ke clamped to [0, S], slots outside the clamped range dropped: the same bits as the fixed inputs.
    x = make_inputs(SPARSE[0])
    bad = BAD[name][0](x)
    S = x.k_idx.shape[0]
    lo = bad.ks.clamp(0, S)
    hi = torch.maximum(lo, bad.ke.clamp(max=S))
    idx = bad.indices.masked_fill((bad.indices < lo[:, None]) | (bad.indices >= hi[:, None]), -1)
    fixed = dataclasses.replace(bad, ks=lo, ke=hi, indices=idx)
    g = torch.rand(SPARSE[0].T) + 0.5
    for b, f in ((bad, fixed), (dataclasses.replace(bad, indices=None), dataclasses.replace(fixed, indices=None))):
        got = (sim_fwd(sim, b),) + sim_bwd(sim, g, b)
        want = (sim_fwd(sim, f),) + sim_bwd(sim, g, f)
        assert all(torch.equal(u, v) for u, v in zip(got, want)), name


# The target P from the warpgroup-MMA kernel (probs_wgmma_kernel.cuh), as api.cu takes it for bf16/fp16
# main attention inputs with D % 64 == 0, per chunk of queries: the kernel alone against the reference's
# head_summed_probs, then the whole loss and its gradients with the tile kernels reading it.
WGMMA_TARGET = [
    Case(T=3, S=50, HI=4, DI=16, H=20, D=64, K=40, docs=2, pad=0.2, dup=True, outside=0.1),  # 44 padded rows
    Case(T=2, S=90, HI=4, DI=16, H=80, D=128, K=70, lse_inf=True),  # two head groups; +inf heads skipped
    Case(T=3, S=30, HI=4, DI=16, H=8, D=64, K=12, dead_rows=1, pad=0.3),  # a row with no valid slot
    Case(T=4, S=70, HI=4, DI=16, H=20, D=64, docs=2, empty_every=3),  # dense: visible ranges, an empty one
    Case(T=3, S=100, HI=4, DI=16, H=70, D=128, lse_inf=True),  # dense, two head groups, 2 blocks of keys
    GLM5_SPARSE,
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", WGMMA_TARGET, ids=str)
def test_sim_wgmma_target(sim, case, dtype):
    from glm5.ops import reference

    x = make_inputs(case, dtype)
    S = x.kv.shape[0]
    lo = x.ks.clamp(0, S)
    hi = torch.maximum(lo, x.ke.clamp(max=S))
    if x.indices is None:  # dense: position j of query t is key lo + j
        keys = lo[:, None] + torch.arange(S)[None, :]
        keys = keys.masked_fill(keys >= hi[:, None], -1)
    else:
        keys = x.indices.masked_fill((x.indices < lo[:, None]) | (x.indices >= hi[:, None]), -1)
    got = sim.probs(x.q, x.kv, x.lse.float(), x.indices, x.ks, x.ke, x.sm_scale)
    want = reference.head_summed_probs(x.q.double(), x.kv.double(), x.lse.float().double(), keys, x.sm_scale)
    inside = keys >= 0
    if x.indices is None:
        assert torch.isnan(got[~inside]).all(), "dense: nothing written past a query's visible keys"
    torch.testing.assert_close(got.double()[inside], want[inside], rtol=1e-4,
                               atol=1e-6 * max(1.0, float(want.abs().max())))
    compare(sim, case, dtype, target_chunk=2)


@pytest.mark.parametrize("case", [WGMMA_TARGET[0], WGMMA_TARGET[3]], ids=str)
def test_sim_wgmma_target_chunks_are_bitwise_neutral(sim, case):
    # One query per chunk, two, or all: every bit equal (dense dk adds its chunks in t order).
    x = make_inputs(case, torch.bfloat16)
    g = torch.rand(case.T) + 0.5
    runs = [(sim_fwd(sim, x, target_chunk=n),) + sim_bwd(sim, g, x, target_chunk=n) for n in (1, 2, case.T)]
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))


def test_sim_wgmma_target_matches_tile_kernels(sim):
    # Same losses and gradients, whichever kernel computes P (to fp32 rounding of the sums).
    for case in (WGMMA_TARGET[1], WGMMA_TARGET[4]):
        x = make_inputs(case, torch.bfloat16)
        g = torch.rand(x.q.shape[0]) + 0.5
        a = (sim_fwd(sim, x),) + sim_bwd(sim, g, x)
        b = (sim_fwd(sim, x, target_chunk=case.T),) + sim_bwd(sim, g, x, target_chunk=case.T)
        for name, u, v in zip(("loss", "dq_idx", "dk_idx", "dw"), a, b):
            torch.testing.assert_close(u.float(), v.float(), rtol=1e-3, atol=1e-3 * max(1.0, float(u.abs().max())),
                                       msg=name)
