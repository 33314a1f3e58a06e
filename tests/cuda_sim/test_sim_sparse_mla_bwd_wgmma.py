"""The warpgroup-MMA sparse MLA backward kernel (bwd_wgmma_kernel.cuh) on the CPU simulator.

The same two checks as test_sim_sparse_mla_bwd_tc.py (exact arithmetic on the raw dq and key-gradient
rows, then the op's accuracy contract after the per-key sums), on the shapes of the kernel's plan:
D 192 or 576, d_v % 64 == 0. The simulator's wgmma reads operands through the kernel's descriptors
(test_sim_gmma_desc.py ties those to CuTe).
"""

from __future__ import annotations

import pytest
import torch

from sim_build import load_sim, reseeded
from test_sim_sparse_mla_bwd_tc import check_raw, contract, kernel_inputs
from test_sparse_mla import Case, make_inputs

CASES = [
    Case(T=2, S=100, K=32, H=64, D=192, dv=128),  # one full block, 64 heads, d_v = the latent blocks
    Case(T=2, S=300, K=77, H=16, D=192, dv=64, pad=0.2),  # 48 padded heads, partial last block, d_v < D - 64
    Case(T=2, S=200, K=45, H=80, D=192, dv=192, spread=4.0, dup=True),  # groups of 64 and 16 heads; d_v = D
    Case(T=3, S=20, K=70, H=8, D=192, dv=64, pad=0.5, dead_rows=1),  # K > S: mostly -1; a query with no key
    Case(T=1, S=200, K=40, H=64, D=576, dv=512, pad=0.1),  # GLM-5 widths: dq 4 + 4 blocks and the rope
]
SHARED = Case(T=6, S=12, K=24, H=4, D=192, dv=128, pad=0.2, dup=True, dead_rows=1)  # keys shared across rows


@pytest.fixture(scope="module")
def sim():
    return load_sim("glm5_cuda_sim_bwd_wgmma", "sim_sparse_mla_bwd_wgmma.cpp")


def check(sim, case: Case, dtype: torch.dtype, indices=None, t0: int = 0, t1: int | None = None):
    t1 = case.T if t1 is None else t1
    x, g, dout, out, lse = kernel_inputs(case, dtype, indices)
    dq, rows = sim.sparse_mla_bwd_wgmma(dout, *x[:3], out, lse, x[3], x[4], t0, t1)
    check_raw(case, x, dout, out, lse, dq, rows, t0, t1)
    return x, g, dq, rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES + [SHARED], ids=str)
def test_sim_bwd_wgmma(sim, case, dtype):
    x, g, dq, rows = check(sim, case, dtype)
    contract(case, dtype, x, g, dq, rows)


def test_sim_bwd_wgmma_sparse_blocks(sim):
    # Blocks of 32 slots with all -1 (skipped) or one valid slot only, at either end.
    case = Case(T=2, S=300, K=90, H=8, D=192, dv=64)
    idx = make_inputs(case)[2].clone()
    idx[0, 0:31] = -1
    idx[:, 32:64] = -1
    idx[1, 63] = 7
    idx[1, 65:90] = -1
    x, g, dq, rows = check(sim, case, torch.bfloat16, indices=idx)
    contract(case, torch.bfloat16, x, g, dq, rows)


def test_sim_bwd_wgmma_chunk_and_order(sim):
    # Queries [1, 3) of 4 only; the bits do not depend on the simulated threads' order.
    case = Case(T=4, S=100, K=40, H=70, D=192, dv=128, pad=0.1)
    x, _, dq, rows = check(sim, case, torch.bfloat16, t0=1, t1=3)
    _, _, dout, out, lse = kernel_inputs(case, torch.bfloat16)
    with reseeded(11):
        dq2, rows2 = sim.sparse_mla_bwd_wgmma(dout, *x[:3], out, lse, x[3], x[4], 1, 3)
    assert torch.equal(dq.nan_to_num(), dq2.nan_to_num()) and torch.equal(rows.nan_to_num(), rows2.nan_to_num())
