"""The tensor-core sparse MLA backward kernel (bwd_tc_kernel.cuh) on the CPU simulator.

Two checks per case, on the kernel's raw outputs (dq of the chunk's queries, one fp32 key-gradient
row per valid slot):
- exact arithmetic: against the same quantities in fp64 from the kernel's own inputs, with P and dS
  rounded to the input dtype where the kernel rounds them. What is left is fp32 accumulation order and
  the rare P or dS whose rounding differs between its fp32 and fp64 value, far below the 1e-3 bound,
  while an indexing or fragment-layout error is the size of the values themselves. Rows of invalid
  slots must stay unwritten (NaN), and so must dq outside the chunk.
- the op's accuracy contract: rows summed per key (what api.cu's sort and reduction do) and dq against
  autograd of the fp64 reference, with tests/ops/test_cuda_dsa.py's backward rule (factor 3, floor).
Sizes are small because every simulated CUDA thread is an OS thread.
"""

from __future__ import annotations

import pytest
import torch

from glm5.ops import reference
from numerics import assert_close_to_ref
from sim_build import load_sim
from test_sparse_mla import Case, dead, make_inputs, out_and_grads, upcast
from test_sparse_mla import floor as mla_floor

H100_SMEM = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin of an H100 / H200

CASES = [
    Case(T=2, S=64, K=32, H=4, D=64, dv=32),  # one m-tile (12 padded heads), one full key block
    Case(T=2, S=256, K=64, H=16, D=64, dv=64, pad=0.2),  # d_v == D, two blocks
    Case(T=2, S=300, K=77, H=40, D=128, dv=64, dup=True, dead_rows=1),  # 3 m-tiles, partial last block
    Case(T=2, S=200, K=45, H=80, D=64, dv=48, spread=4.0),  # head groups of 64 and 16; dv % 32 == 16
    Case(T=3, S=20, K=70, H=8, D=48, dv=16, pad=0.5),  # K > S: mostly -1; odd k-steps in S and dP
    Case(T=1, S=200, K=40, H=64, D=576, dv=512, pad=0.1),  # GLM-5 widths: 9 dq column pairs per warp
]
# Many slots per key (S small against T * K): the per-key sums have real collisions.
SHARED = Case(T=6, S=12, K=24, H=4, D=32, dv=32, pad=0.2, dup=True, dead_rows=1)


@pytest.fixture(scope="module")
def sim():
    return load_sim("glm5_cuda_sim_bwd_tc", "sim_sparse_mla_bwd_tc.cpp")


def kernel_inputs(case: Case, dtype: torch.dtype, indices: torch.Tensor | None = None) -> tuple:
    """(x, grad_out, out, lse): the forward's outputs as the op would pass them (out in dtype, fp32 lse)."""
    x = make_inputs(case, dtype)
    if indices is not None:
        x = x[:2] + (indices,) + x[3:]
    g = torch.randn(case.T, case.H, case.dv, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out, lse = reference.sparse_mla(*x)  # fp32 arithmetic on the rounded inputs, out rounded to dtype
    return x, g, g.float().to(dtype), out, lse


def expected(x: tuple, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> tuple:
    """(dq [T,H,D], rows [T,K,D]) in fp64 with the kernel's roundings of P and dS; rows of invalid slots 0."""
    q, kv, idx, scale, dv = x
    dtype = q.dtype
    valid = (idx >= 0) & (idx < kv.shape[0])
    kg = kv.double()[idx.clamp(min=0).long()] * valid[..., None]  # [T, K, D]
    s = torch.einsum("thd,tkd->thk", q.double(), kg)
    p = torch.exp(s * scale - lse.double()[..., None]).masked_fill(~valid[:, None, :], 0.0)  # lse = +inf: 0
    dp = torch.einsum("thd,tkd->thk", dout.double(), kg[..., :dv])
    delta = (dout.double() * out.double()).sum(-1)
    ds = p * (dp - delta[..., None]) * scale
    p_r, ds_r = p.to(dtype).double(), ds.to(dtype).double()
    dq = torch.einsum("thk,tkd->thd", ds_r, kg)
    rows = torch.einsum("thk,thd->tkd", ds_r, q.double())
    rows[..., :dv] += torch.einsum("thk,thd->tkd", p_r, dout.double())
    return dq, rows


def check(sim, case: Case, dtype: torch.dtype, indices=None, t0: int = 0, t1: int | None = None, mt: int = 0):
    t1 = case.T if t1 is None else t1
    x, g, dout, out, lse = kernel_inputs(case, dtype, indices)
    dq, rows, _ = sim.sparse_mla_bwd_tc(dout, *x[:3], out, lse, x[3], x[4], t0, t1, H100_SMEM, mt)
    check_raw(case, x, dout, out, lse, dq, rows, t0, t1)
    return x, g, dq, rows


def check_raw(case: Case, x: tuple, dout, out, lse, dq: torch.Tensor, rows: torch.Tensor, t0: int, t1: int):
    """A backward kernel's raw dq and rows for the chunk [t0, t1) against expected() (see the docstring)."""
    want_dq, want_rows = expected(x, dout, out, lse)
    idx = x[2]
    valid = ((idx >= 0) & (idx < case.S))[t0:t1].reshape(-1)
    rows_valid = rows[valid]
    assert torch.isnan(rows[~valid]).all(), "rows of invalid slots are never written"
    assert not torch.isnan(dq[:t0]).logical_not().any() and not torch.isnan(dq[t1:]).logical_not().any(), (
        "dq of queries outside the chunk is never written"
    )
    for name, got, want in (
        ("dq", dq[t0:t1], want_dq[t0:t1]),
        ("rows", rows_valid, want_rows[t0:t1].reshape(-1, case.D)[valid]),
    ):
        assert torch.isfinite(got).all(), f"{name}: unwritten or non-finite entries"
        top = float(want.abs().max()) if want.numel() else 0.0
        err = float((got.double() - want).abs().max()) if want.numel() else 0.0
        assert err <= 1e-3 * max(top, 1e-30), f"{name}: max error {err:.3e} against max |value| {top:.3e}"


def contract(case: Case, dtype: torch.dtype, x: tuple, g: torch.Tensor, dq: torch.Tensor, rows: torch.Tensor):
    """dq and the per-key sums of the rows against autograd of the reference, test_cuda_dsa's rule."""
    idx = x[2].reshape(-1)
    valid = (idx >= 0) & (idx < case.S)
    dkv = torch.zeros(case.S, case.D, dtype=torch.float32)
    dkv.index_add_(0, idx[valid].long(), rows[valid])
    _, _, truth_dq, truth_dkv = out_and_grads(reference.sparse_mla, upcast(x), g)
    _, _, lowp_dq, lowp_dkv = out_and_grads(reference.sparse_mla, x, g.float())
    for name, a, t, lp in (("dq", dq.to(dtype), truth_dq, lowp_dq), ("dkv", dkv.to(dtype), truth_dkv, lowp_dkv)):
        assert_close_to_ref(a, t, lp, factor=3.0, floor=mla_floor(t, dtype, case.K), name=name)
    assert not dq[dead(x)].any(), "a query without keys gets dq = 0"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES + [SHARED], ids=str)
def test_sim_bwd_tc(sim, case, dtype):
    x, g, dq, rows = check(sim, case, dtype)
    contract(case, dtype, x, g, dq, rows)


@pytest.mark.slow
def test_sim_bwd_tc_glm5(sim):
    # GLM-5's full shape, K = 2048 (64 key blocks through the double buffer): about a minute here.
    case = Case(T=2, S=4096, K=2048, H=64, D=576, dv=512)
    x, g, dq, rows = check(sim, case, torch.bfloat16)
    contract(case, torch.bfloat16, x, g, dq, rows)


def test_sim_bwd_tc_sparse_blocks(sim):
    # Blocks of 32 slots with all -1 (the kernel skips them) or one valid slot only, at either end.
    case = Case(T=2, S=300, K=90, H=8, D=32, dv=32)
    idx = make_inputs(case)[2].clone()
    idx[0, 0:31] = -1  # block 0 of row 0: only its last slot
    idx[:, 32:64] = -1  # block 1: empty in both rows ...
    idx[1, 63] = 7  # ... but for row 1's last slot of it
    idx[1, 65:90] = -1  # partial block 2 of row 1: only its first slot
    x, g, dq, rows = check(sim, case, torch.bfloat16, indices=idx)
    contract(case, torch.bfloat16, x, g, dq, rows)


def test_sim_bwd_tc_chunk(sim):
    # Queries [1, 3) of 4: rows are the chunk's only, other queries' dq untouched.
    check(sim, Case(T=4, S=100, K=40, H=4, D=32, dv=16, pad=0.1), torch.bfloat16, t0=1, t1=3)


@pytest.mark.parametrize("mt", [1, 2], ids=lambda m: f"mt{m}")
def test_sim_bwd_tc_small_head_groups(sim, mt):
    # Head groups smaller than H needs (what the launcher picks when shared memory is short): the later
    # groups add to the rows the first wrote, in a fixed order. H = 40: groups of 16, 16, 8 or 32, 8.
    case = Case(T=2, S=300, K=40, H=40, D=64, dv=32, dup=True)
    x, g, dq, rows = check(sim, case, torch.bfloat16, mt=mt)
    contract(case, torch.bfloat16, x, g, dq, rows)


def test_sim_bwd_tc_pick_mt(sim):
    # The launcher's choice: as many m-tiles as H needs up to 4, fewer when shared memory is short.
    def mt_of(case: Case, smem: int) -> int:
        x, _, dout, out, lse = kernel_inputs(case, torch.bfloat16)
        return sim.sparse_mla_bwd_tc(dout, *x[:3], out, lse, x[3], x[4], 0, 1, smem, 0)[2]

    small = Case(T=1, S=40, K=8, H=40, D=32, dv=32)
    assert mt_of(small, H100_SMEM) == 3
    glm5 = Case(T=1, S=40, K=8, H=64, D=576, dv=512)
    assert mt_of(glm5, H100_SMEM) == 4  # 227072 bytes
    assert mt_of(glm5, 163 * 1024) == 2  # an A100's limit
