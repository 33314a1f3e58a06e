"""The warpgroup-MMA sparse MLA forward (fwd_wgmma_kernel.cuh) on the CPU simulator against the reference.

The simulator's wgmma reads its operands from shared memory through the kernel's descriptors, as the
PTX ISA lays them out (checked against CuTe in test_sim_gmma_desc.py); same tolerance rule as the other
forward kernels. Only the shapes of the kernel's plan: D % 64 == 0, d_v 128 or 512.
"""

from __future__ import annotations

import pytest
import torch

from sim_build import load_sim, reseeded
from test_sparse_mla import Case, assert_kernel_forward, make_inputs


@pytest.fixture(scope="module")
def sim():
    return load_sim("glm5_cuda_sim_fwd_wgmma", "sim_sparse_mla_fwd_wgmma.cpp")


CASES = [
    Case(T=2, S=200, K=64, H=64, D=128, dv=128),  # one full block of 64 keys, 64 heads
    Case(T=3, S=300, K=77, H=16, D=128, dv=128, pad=0.2),  # 48 padded heads, partial last block
    Case(T=2, S=700, K=150, H=80, D=192, dv=128, spread=6.0),  # two head groups, three blocks; the max moves
    Case(T=3, S=500, K=40, H=40, D=128, dv=128, dup=True, dead_rows=1),  # duplicates, a query with no key
    Case(T=2, S=20, K=70, H=8, D=128, dv=128, pad=0.5),  # K > S: mostly -1 slots
    Case(T=1, S=300, K=128, H=64, D=576, dv=512),  # GLM-5 head dims: 9 column blocks, 256 O columns a warpgroup
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_sim_wgmma_forward(sim, case, dtype):
    x = make_inputs(case, dtype)
    out, lse = sim.sparse_mla_fwd_wgmma(*x)
    assert_kernel_forward(x, case, out, lse)


def test_sim_wgmma_forward_deterministic(sim):
    x = make_inputs(CASES[2], torch.bfloat16)
    first = sim.sparse_mla_fwd_wgmma(*x)
    with reseeded(7):  # the simulated threads in another order
        again = sim.sparse_mla_fwd_wgmma(*x)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_sim_wgmma_forward_refuses_other_shapes(sim):
    x = make_inputs(Case(T=1, S=8, K=4, H=4, D=96, dv=64), torch.bfloat16)  # D % 64 != 0, d_v 64
    with pytest.raises(RuntimeError, match="plan"):
        sim.sparse_mla_fwd_wgmma(*x)
