"""glm5's wgmma shared-memory layouts and descriptors (csrc/cuda/common/gmma_desc.h) equal CuTe's.

The simulator's wgmma (cuda_sim.h) reads operands through gmma_desc.h, as do the kernels; this ties
both to CUTLASS's own Layout_{K,MN}_SW128_Atom and make_gmma_desc (sim_gmma_desc.cpp), so the
simulated forward cannot pass on a layout the hardware would read differently from CUTLASS.
"""

from __future__ import annotations

import pytest

from sim_build import load_sim


@pytest.fixture(scope="module")
def sim():
    return load_sim("glm5_cuda_sim_gmma_desc", "sim_gmma_desc.cpp", cutlass=True)


@pytest.mark.parametrize("D", [64, 192, 576])
def test_layouts_and_descriptors_match_cute(sim, D):
    bad = sim.check(D)
    assert bad["checked"] > 0
    assert {k: v for k, v in bad.items() if k != "checked"} == {"layout": 0, "desc": 0, "decode": 0}, bad


def test_accumulator_layout_matches_cute(sim):
    assert sim.accumulators() == 0
