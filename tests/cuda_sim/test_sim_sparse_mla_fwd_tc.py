"""The tensor-core sparse MLA forward (fwd_tc_kernel.cuh) on the CPU simulator against the reference.

Same cases and tolerance rule as tests/ops/test_cuda_sparse_mla_tc.py (which runs the kernel on a
GPU); sizes are kept small because every simulated CUDA thread is an OS thread.
"""

from __future__ import annotations

import pytest
import torch

from sim_build import load_sim, reseeded
from test_sparse_mla import Case, assert_kernel_forward, make_inputs



@pytest.fixture(scope="module")
def sim():
    return load_sim("glm5_cuda_sim_fwd_tc", "sim_sparse_mla_fwd_tc.cpp")


CASES = [
    Case(T=2, S=64, K=32, H=4, D=64, dv=32),  # one m-tile, 12 padded heads, one full block
    Case(T=2, S=256, K=64, H=16, D=64, dv=64),  # d_v == D, two blocks
    Case(T=3, S=300, K=77, H=32, D=128, dv=64, pad=0.2),  # two m-tiles, partial last block
    Case(T=3, S=500, K=40, H=40, D=96, dv=64, dup=True, dead_rows=1),  # three m-tiles, padded
    Case(T=2, S=700, K=45, H=80, D=64, dv=32, spread=6.0),  # two head groups; the max moves
    Case(T=3, S=20, K=70, H=8, D=32, dv=32, pad=0.5),  # K > S: mostly -1 slots
    Case(T=1, S=200, K=64, H=64, D=576, dv=512),  # GLM-5 head dims, 4 m-tiles, 32 O tiles per warp
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_sim_tc_forward(sim, case, dtype):
    x = make_inputs(case, dtype)
    out, lse = sim.sparse_mla_fwd_tc(*x)
    assert_kernel_forward(x, case, out, lse)


def test_sim_tc_forward_deterministic(sim):
    x = make_inputs(CASES[4], torch.bfloat16)
    first = sim.sparse_mla_fwd_tc(*x)
    with reseeded(7):  # the simulated threads in another order
        again = sim.sparse_mla_fwd_tc(*x)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
