"""The lightning-indexer CUDA kernels on the CPU simulator (sim_indexer.cpp): fragment layouts, cp.async
ordering, barriers and the exact top-k selection, on a machine without a GPU.

The simulator's mma sums in its own order, so its scores match the GPU's to fp32 rounding, not
bitwise; but the logits and top-k kernels share their scoring code, so within the simulator the top-k
must be exactly the selection rule applied to the logits kernel's output, whatever the queries per
CTA (qb), key tile (bs) or candidate buffer (cap). The real-GPU tests are tests/ops/test_cuda_indexer_tc.py.
"""

from __future__ import annotations

import pytest
import torch

from glm5.ops import reference
from numerics import assert_close_to_ref
from sim_build import load_sim
import test_lightning_indexer as li
from test_lightning_indexer import Case

EPS32 = torch.finfo(torch.float32).eps

TC_CASES = [
    Case(T=5, S=300, HI=16, DI=32, topk=64),
    Case(T=7, S=40, HI=32, DI=32, topk=64),  # S < topk: padding
    Case(T=12, S=515, HI=16, DI=16, topk=100, layout="random", empty_rows=3),
    Case(T=32, S=32, HI=16, DI=48, topk=8, layout="docs", docs=(5, 17, 1, 9), empty_rows=3),  # packed, ks > 0
    Case(T=4, S=3000, HI=16, DI=16, topk=300, layout="full"),  # threshold filter, several flushes
    Case(T=20, S=700, HI=16, DI=32, topk=50, layout="random", ints=True),  # exact scores and ties
    Case(T=8, S=1030, HI=16, DI=16, topk=200, layout="full", ints=True, dup=True),
]
SIMT_CASES = [
    Case(T=7, S=33, HI=3, DI=17, topk=5),
    Case(T=6, S=12, HI=3, DI=5, topk=20, layout="random"),
    Case(T=3, S=1500, HI=2, DI=8, topk=300, layout="full"),  # threshold filter, several flushes
    Case(T=9, S=64, HI=2, DI=3, topk=100, ints=True, empty_rows=2),
    Case(T=3, S=900, HI=3, DI=4, topk=50, layout="full", ints=True, dup=True),
]


@pytest.fixture(scope="module")
def sim():
    return load_sim("glm5_cuda_sim_indexer", "sim_indexer.cpp")


def check_own_selection(logits: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, topk: int) -> None:
    own_idx, own_val = li.select_from_logits(logits, topk)
    assert torch.equal(idx, own_idx), f"{int((idx != own_idx).sum())} slots differ from the own-logits top-k"
    assert torch.equal(val, own_val.to(val.dtype))


@pytest.mark.parametrize("case", TC_CASES, ids=str)
def test_sim_tc(sim, case):
    x = li.make_inputs(case, torch.bfloat16)
    logits = sim.logits_tc(*x, 32)
    truth = reference.indexer_logits(*li.upcast(x))
    scale = float(torch.einsum("thd,sd,th->ts", *(t.double().abs() for t in x[:3])).max())
    assert_close_to_ref(logits, truth, reference.indexer_logits(*x), floor=16 * EPS32 * max(1.0, scale), name="logits")
    if case.ints:
        assert torch.equal(logits, truth.float())
    assert torch.equal(sim.logits_tc(*x, 1), logits)  # one query per CTA: the same bits
    first = None
    for qb, cap in ((1, 1024), (2, 256), (4, 300)):
        idx, val = sim.topk_tc(*x, case.topk, qb, cap)
        check_own_selection(logits, idx, val, case.topk)
        if first is None:
            first = (idx, val)
        assert torch.equal(idx, first[0]) and torch.equal(val, first[1])
    if case.ints:
        ref_idx, ref_val = reference.indexer_topk(*x, topk=case.topk)
        assert torch.equal(first[0], ref_idx) and torch.equal(first[1], ref_val)


def test_sim_tc_nan_never_selected(sim):
    case = TC_CASES[0]
    q, k, w, ks, ke = li.make_inputs(case, torch.bfloat16)
    k[3] = float("nan")
    q[2, 5] = float("nan")  # query 2: every score NaN
    logits = sim.logits_tc(q, k, w, ks, ke, 32)
    idx, val = sim.topk_tc(q, k, w, ks, ke, case.topk, 2, 256)
    assert torch.isnan(logits[:, 3]).all() and torch.isnan(logits[2, : int(ke[2])]).all()
    assert not (idx == 3).any() and not val.isnan().any()
    assert (idx[2] == -1).all() and torch.isneginf(val[2]).all()
    expect = (ke - ks - 1).long().clamp(max=case.topk)  # every query sees key 3 (layout "end")
    expect[2] = 0
    assert torch.equal((idx >= 0).sum(1), expect)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", SIMT_CASES, ids=str)
def test_sim_simt_topk(sim, case, dtype):
    x = li.make_inputs(case, dtype)
    logits = sim.logits_simt(*x, 128)
    truth = reference.indexer_logits(*li.upcast(x))
    assert_close_to_ref(logits, truth.to(logits.dtype), None, name="logits")
    # (key tile, candidate buffer): a 2-key tile (many tiles per flush) only where S is small
    for bs, cap in ((256, 1024), (64, 300)) + (((2, 256),) if case.S <= 100 else ()):
        idx, val = sim.topk_simt(*x, case.topk, bs, cap)
        check_own_selection(logits, idx, val, case.topk)
    if case.ints:
        ref_idx, ref_val = reference.indexer_topk(*x, topk=case.topk)
        assert torch.equal(idx, ref_idx) and torch.equal(val, ref_val.to(val.dtype))
