"""The CUDA-core sparse MLA kernels (csrc/cuda/sparse_mla/kernels.cuh) on the CPU simulator.

The launches mirror api.cu's SIMT paths (tiling search against an H100/H200's 232448-byte shared-memory
limit, grids, backward chunking; the radix sort of the slots by key is a stable torch sort). Cases and
tolerances are tests/ops/test_cuda_dsa.py's: the CPU tests' case lists against the fp64 reference, with
floor_cuda (fp32 sums of K terms on CUDA cores); GLM-5's head widths run with one query and few keys,
since every simulated CUDA thread is an OS thread.
"""

from __future__ import annotations

import pytest
import torch

from glm5.ops import reference
from numerics import assert_close_to_ref
from sim_build import load_sim, reseeded
from test_cuda_dsa import floor_cuda
from test_sparse_mla import CASES, SHARED_KEYS, Case, dead, make_inputs, out_and_grads, upcast



@pytest.fixture(scope="module")
def sim_simt():
    return load_sim("glm5_cuda_sim_simt", "sim_simt_sparse_mla.cpp")


H100_SMEM = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin of an H100 / H200
GLM5 = Case(T=1, S=200, K=80, H=64, D=576, dv=512, pad=0.1)  # GLM-5 widths: 4 head groups, partial key block
SMALL = [c if c.H != 64 else GLM5 for c in CASES]
# Three head groups of 16, 16 and 8 heads (the last one partial), duplicates and a dead row.
GROUPS = Case(T=3, S=120, K=40, H=40, D=96, dv=64, dup=True, dead_rows=1)
FWD_CASES = SMALL + [GROUPS]
BWD_CASES = SMALL + [GROUPS, SHARED_KEYS]
# fp16 and fp64 take the same code paths as bf16 and fp32 (only the conversions differ), and the backwards
# of the long rows (S = 700, 900: one reduction CTA per key) cost the most: fewer cases there.
FP16_CASES = SMALL[:4] + SMALL[6:8]
FP64_CASES = [SMALL[2], SMALL[4], SMALL[9], GLM5, GROUPS]
LONG = SMALL[4:6]
BF16_BWD_CASES = [c for c in BWD_CASES if c not in LONG]
FP64_BWD_CASES = [SMALL[2], SMALL[9], GLM5, SHARED_KEYS]


def acc_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(sim, x: tuple, smem: int = H100_SMEM) -> tuple:
    out, lse, _ = sim.sparse_mla_fwd(*x, smem)
    return out, lse


def backward(sim, x: tuple, g: torch.Tensor, chunk_bytes: int | None = None, smem: int = H100_SMEM) -> tuple:
    """(dq, dkv, tiling) of the backward chain (kernel, key sort, reduction) for grad_out = g.

    out and lse come from the reference at the input precision (the saved tensors' formats), which keeps
    the backward's checks independent of the forward kernel and the simulated work small.
    """
    out, lse = reference.sparse_mla(*x)
    chunk = sim.kBwdChunkBytes if chunk_bytes is None else chunk_bytes
    return sim.sparse_mla_bwd(g.to(out.dtype), *x[:3], out, lse, *x[3:], chunk, smem)


def grad_seed(case: Case) -> torch.Tensor:
    return torch.randn(case.T, case.H, case.dv, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def check_forward(sim, x: tuple, K: int, smem: int = H100_SMEM) -> None:
    dtype = x[0].dtype
    out, lse = forward(sim, x, smem)
    assert out.dtype == dtype and lse.dtype == acc_of(dtype)
    truth_out, truth_lse = reference.sparse_mla(*upcast(x))
    lowp_out = reference.sparse_mla(*x)[0] if dtype != torch.float64 else None
    assert_close_to_ref(out, truth_out, lowp_out, floor=floor_cuda(truth_out, dtype, K), name="out")
    assert_close_to_ref(lse, truth_lse, None, floor=floor_cuda(truth_lse, acc_of(dtype), K), name="lse")
    empty = dead(x)
    assert not out[empty].any() and torch.isposinf(lse[empty]).all()


def check_backward(sim, x: tuple, g: torch.Tensor, K: int, smem: int = H100_SMEM) -> None:
    dtype = x[0].dtype
    acc = acc_of(dtype)
    dq, dkv, _ = backward(sim, x, g.to(acc), smem=smem)
    assert dq.dtype == dtype and dkv.dtype == dtype
    _, _, truth_dq, truth_dkv = out_and_grads(reference.sparse_mla, upcast(x), g)
    lowp = out_and_grads(reference.sparse_mla, x, g.to(acc)) if dtype != torch.float64 else (None,) * 4
    for name, a, t, lp in (("dq", dq, truth_dq, lowp[2]), ("dkv", dkv, truth_dkv, lowp[3])):
        assert_close_to_ref(a, t, lp, factor=3.0, floor=floor_cuda(t, dtype, K), name=name)
    assert not dq[dead(x)].any(), "a query without keys gets dq = 0"
    used = torch.zeros(x[1].shape[0], dtype=torch.bool)
    used[x[2][x[2] >= 0].long()] = True
    assert not dkv[~used].any(), "a key no query selected gets dkv = 0"


FWD_PARAMS = [(c, d) for d in (torch.float32, torch.bfloat16) for c in FWD_CASES]
FWD_PARAMS += [(c, torch.float16) for c in FP16_CASES] + [(c, torch.float64) for c in FP64_CASES]
BWD_PARAMS = [(c, torch.float32) for c in BWD_CASES] + [(c, torch.bfloat16) for c in BF16_BWD_CASES]
BWD_PARAMS += [(c, torch.float64) for c in FP64_BWD_CASES]


@pytest.mark.parametrize("case, dtype", FWD_PARAMS, ids=str)
def test_sim_simt_forward(sim_simt, case, dtype):
    check_forward(sim_simt, make_inputs(case, dtype), case.K)


@pytest.mark.parametrize("case, dtype", BWD_PARAMS, ids=str)
def test_sim_simt_backward(sim_simt, case, dtype):
    check_backward(sim_simt, make_inputs(case, dtype), grad_seed(case), case.K)


def test_sim_simt_tiling_mirrors_api(sim_simt):
    # api.cu's choices: 16 heads x 32 keys (forward) and 16 x 16 (backward) unless shared memory runs out;
    # fp64 at GLM-5's widths halves the key blocks (forward 16, backward 8).
    # The tiling depends on H, D, d_v and the dtype only: a tiny T, S and K keep the launches short.
    case = Case(T=1, S=4, K=2, H=64, D=576, dv=512)
    for dtype, fwd_bk, bwd_bk in ((torch.float32, 32, 16), (torch.float64, 16, 8)):
        x = make_inputs(case, dtype)
        assert sim_simt.sparse_mla_fwd(*x, H100_SMEM)[2] == [16, fwd_bk, 577]
        assert backward(sim_simt, x, grad_seed(case).to(acc_of(dtype)))[2] == [16, bwd_bk, 577, 513, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sim_simt_small_shared_memory(sim_simt, dtype):
    # A smaller shared-memory limit makes the launcher shrink bk, then hb (GROUPS: 4 heads x 4 keys in the
    # backward). The backward sums every dq element over the keys and every key-gradient row over the heads
    # in increasing order whatever the tiling, so its result is bit-identical to the default tiling's.
    x = make_inputs(GROUPS, dtype)
    limit = 8000 if dtype == torch.float32 else 16000
    fwd_tiling = sim_simt.sparse_mla_fwd(*x, limit)[2]
    assert fwd_tiling[0] < 16 and fwd_tiling[1] == 8
    check_forward(sim_simt, x, GROUPS.K, smem=limit)
    g = grad_seed(GROUPS).to(acc_of(dtype))
    default, small = backward(sim_simt, x, g), backward(sim_simt, x, g, smem=limit)
    assert small[2][:2] == [4, 4] and default[2][:2] == [16, 16]
    assert torch.equal(small[0], default[0]) and torch.equal(small[1], default[1])


def with_out_of_range(x: tuple) -> tuple:
    """x with a few slots replaced by values outside [-1, S): the CUDA path skips them like -1."""
    idx = x[2].clone()
    S = x[1].shape[0]
    bad = [S, S + 7, -2, -(2**31), 2**31 - 1]
    for i, v in enumerate(bad):
        idx[(3 * i + 1) % idx.shape[0], (5 * i + 2) % idx.shape[1]] = v
    return (x[0], x[1], idx) + x[3:]


def test_sim_simt_out_of_range_index_is_skipped(sim_simt, dtype=torch.bfloat16):
    case = CASES[7]  # mixed -1 slots
    x = with_out_of_range(make_inputs(case, dtype))
    as_minus_one = (x[0], x[1], torch.where((x[2] >= 0) & (x[2] < case.S), x[2], -1)) + x[3:]
    out, lse = forward(sim_simt, x)
    assert all(torch.equal(a, b) for a, b in zip((out, lse), forward(sim_simt, as_minus_one)))
    check_forward(sim_simt, as_minus_one, case.K)
    g = grad_seed(case).to(dtype)
    got, want = (sim_simt.sparse_mla_bwd(g, *y[:3], out, lse, *y[3:], 1 << 30, H100_SMEM) for y in (x, as_minus_one))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    check_backward(sim_simt, as_minus_one, grad_seed(case), case.K)


def test_sim_simt_deterministic_and_chunk_independent(sim_simt, dtype=torch.bfloat16):
    # Two runs (the second with the simulated threads in another order) agree bit for bit, and so does a backward whose query chunks hold 16 of the 70 queries
    # (5 chunks, the last partial: each key's rows are summed in (query, slot) order, chunk after chunk).
    x = make_inputs(CASES[9], dtype)
    first = forward(sim_simt, x)
    with reseeded(7):
        assert all(torch.equal(a, b) for a, b in zip(first, forward(sim_simt, x)))
    x = make_inputs(SHARED_KEYS, dtype)
    g = grad_seed(SHARED_KEYS).to(acc_of(dtype))
    first = backward(sim_simt, x, g)
    with reseeded(7):
        again = backward(sim_simt, x, g)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    dq, dkv, tiling = backward(sim_simt, x, g, 16 * SHARED_KEYS.K * SHARED_KEYS.D * 4)
    assert tiling[4] == 16 and first[2][4] == SHARED_KEYS.T
    assert torch.equal(dq, first[0]) and torch.equal(dkv, first[1]), "chunks of 16 queries"


@pytest.mark.parametrize(
    "case",
    [Case(T=0, S=5, K=3), Case(T=3, S=5, K=0), Case(T=3, S=0, K=4), Case(T=3, S=5, K=2, H=0)],
    ids=str,
)
def test_sim_simt_empty(sim_simt, case):
    x = make_inputs(case)
    out, lse = forward(sim_simt, x)
    assert out.shape == (case.T, case.H, case.dv) and lse.shape == (case.T, case.H)
    assert not out.any() and torch.isposinf(lse).all()
    dq, dkv, _ = sim_simt.sparse_mla_bwd(torch.randn_like(out), *x[:3], out, lse, *x[3:], 1 << 30, H100_SMEM)
    assert dq.shape == x[0].shape and dkv.shape == x[1].shape and not dq.any() and not dkv.any()
