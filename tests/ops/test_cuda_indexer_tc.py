"""Tensor-core lightning indexer (bf16/fp16, HI % 16 == 0, DI % 16 == 0, DI <= 128; skipped without a GPU).

Status: compiled for sm_90a, not yet run on a GPU; run `pytest -m cuda tests/ops/test_cuda_indexer_tc.py`.

Truth is the reference in fp64 on the CPU over the same (rounded) inputs. The kernels sum q.k on tensor
cores (fp32 accumulators, their own order and rounding), so the logits floor is a few fp32 ulps of the
absolute-value sum sum_j |w_j| sum_d |q_jd k_d| (a bound on every partial sum), on top of twice the
fp32 reference's own error. Integer-valued inputs make every score exact, so there the kernels must
equal the reference bit for bit, ties (duplicated keys, relu zeros) included.

Top-k is checked against the kernel's OWN logits: indexer_logits and indexer_topk share one scoring
path, so the selection must be exactly the reference's rule (score descending, smaller key first, -1 /
-inf padding) applied to indexer_logits' output. The knobs GLM5_INDEXER_TOPK_QB / _CAP and
GLM5_INDEXER_LOGITS_QB change the CTA shapes and flush schedule but never a bit of the result;
GLM5_INDEXER_SIMT=1 selects the CUDA-core kernels, which must agree within the rounding floor.
"""

from __future__ import annotations

import pytest
import torch

import glm5
from glm5.ops import reference
from numerics import assert_close_to_ref, calc_diff
import test_lightning_indexer as li
from test_lightning_indexer import Case

pytestmark = pytest.mark.cuda

LOGITS, TOPK = li.LOGITS, li.TOPK
DTYPES = [torch.bfloat16, torch.float16]
EPS32 = torch.finfo(torch.float32).eps

# Shapes that take the tensor-core path.
TC_CASES = [
    Case(T=5, S=300, HI=16, DI=32, topk=64),
    Case(T=9, S=1100, HI=32, DI=128, topk=300),  # GLM-5 head shape, partial last tile
    Case(T=33, S=777, HI=64, DI=64, topk=100, layout="random"),
    Case(T=12, S=515, HI=16, DI=128, topk=600, layout="random", empty_rows=3),  # topk > S
    Case(T=7, S=40, HI=32, DI=32, topk=64),  # S < topk: -1 / -inf padding
    Case(T=4, S=30, HI=16, DI=16, topk=8, empty_rows=4),  # nobody sees a key
    Case(T=63, S=63, HI=16, DI=48, topk=8, layout="docs", docs=(5, 17, 1, 40), empty_rows=3),  # packed ks > 0
    Case(T=300, S=300, HI=32, DI=64, topk=48, layout="docs", docs=(60, 170, 70)),
    Case(T=6, S=20000, HI=32, DI=128, topk=2048),  # S >> topk: threshold filter, many flushes
    Case(T=70, S=3000, HI=32, DI=128, topk=2048, layout="full"),  # also run with 2 and 4 queries per CTA below
    Case(T=20, S=700, HI=16, DI=32, topk=50, layout="random", ints=True),  # exact scores, relu zeros
    Case(T=8, S=1030, HI=16, DI=16, topk=200, layout="full", ints=True, dup=True),  # exact ties
    Case(T=10, S=2000, HI=32, DI=64, topk=300, layout="full", dup=True),  # duplicated key rows
]
LONG = Case(T=4, S=65536, HI=32, DI=128, topk=2048)
SMALL = [TC_CASES[1], TC_CASES[3], TC_CASES[6], TC_CASES[11]]


def cuda(x: tuple) -> tuple:
    return tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in x)


def abs_scale(x: tuple) -> float:
    """max over (t, s) of sum_j |w_tj| sum_d |q_tjd k_sd|: bounds every partial sum of a score."""
    q, k, w = (t.double().abs() for t in x[:3])
    return float(torch.einsum("thd,sd,th->ts", q, k, w).max()) if q.numel() and k.numel() else 0.0


def floor_tc(x: tuple) -> float:
    return 16 * EPS32 * max(1.0, abs_scale(x))


def logits_of(x: tuple) -> torch.Tensor:
    return glm5.ops.indexer_logits(*cuda(x)).cpu()


def topk_of(x: tuple, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx, val = glm5.ops.indexer_topk(*cuda(x), topk=topk)
    return idx.cpu(), val.cpu()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TC_CASES, ids=str)
def test_tc_logits(case, dtype):
    x = li.make_inputs(case, dtype)
    out = logits_of(x)
    assert out.dtype == torch.float32 and out.shape == (case.T, case.S)
    truth = reference.indexer_logits(*li.upcast(x))
    lowp = reference.indexer_logits(*x)
    assert_close_to_ref(out, truth, lowp, floor=floor_tc(x), name="logits")  # also equal -inf masks
    finite = torch.isfinite(truth)
    if finite.any():
        assert calc_diff(out[finite], truth[finite]) < 1e-5
    if case.ints:
        assert torch.equal(out, truth.float())


def check_topk_against_own_logits(x: tuple, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx, val = topk_of(x, topk)
    assert idx.dtype == torch.int32 and val.dtype == torch.float32 and idx.shape == (x[0].shape[0], topk)
    own_idx, own_val = li.select_from_logits(logits_of(x), topk)
    assert torch.equal(idx, own_idx), f"{int((idx != own_idx).sum())} slots differ from the own-logits top-k"
    assert torch.equal(val, own_val)
    assert torch.equal(idx < 0, torch.isneginf(val))
    return idx, val


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TC_CASES, ids=str)
def test_tc_topk(case, dtype):
    x = li.make_inputs(case, dtype)
    idx, val = check_topk_against_own_logits(x, case.topk)
    ref_idx, ref_val = reference.indexer_topk(*x, topk=case.topk)
    assert torch.equal((idx >= 0).sum(1), (ref_idx >= 0).sum(1)), "valid counts differ"
    if case.ints:  # exact scores: the tie rule decides
        assert torch.equal(idx, ref_idx) and torch.equal(val, ref_val)


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_tc_topk_long_context(dtype):
    check_topk_against_own_logits(li.make_inputs(LONG, dtype), LONG.topk)


@pytest.mark.parametrize("order", ["increasing", "decreasing"])
def test_tc_topk_monotone_scores(order, monkeypatch):
    # Scores that rise with the key index make every tile beat the threshold (a flush per tile with the
    # smallest buffer); falling scores reject almost every key after the first tiles. bf16 rounding of
    # the ramp makes runs of equal keys, so the tie rule is exercised too.
    case = Case(T=4, S=5000, HI=16, DI=32, topk=2048, layout="full")
    q, k, w, ks, ke = li.make_inputs(case)
    ramp = torch.linspace(0.1, 2.0, case.S)
    q, w = q.abs() + 0.1, w.abs() + 0.1  # positive dots, positive weights: score proportional to the ramp
    k = (ramp if order == "increasing" else ramp.flip(0))[:, None].expand(case.S, case.DI).contiguous()
    x = (q.bfloat16(), k.bfloat16(), w.bfloat16(), ks, ke)
    first = check_topk_against_own_logits(x, case.topk)
    monkeypatch.setenv("GLM5_INDEXER_TOPK_CAP", "256")
    second = check_topk_against_own_logits(x, case.topk)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def run_all(x: tuple, topk: int) -> list[torch.Tensor]:
    return [logits_of(x), *topk_of(x, topk)]


@pytest.mark.parametrize("case", SMALL + [TC_CASES[9]], ids=str)
def test_tc_deterministic_and_shape_independent(case, monkeypatch):
    # Twice the same, and the same bits whatever the queries per CTA or the candidate buffer size.
    x = li.make_inputs(case, torch.bfloat16)
    first = run_all(x, case.topk)
    assert all(torch.equal(a, b) for a, b in zip(first, run_all(x, case.topk)))
    for env in (
        {"GLM5_INDEXER_TOPK_QB": "1", "GLM5_INDEXER_TOPK_CAP": "256", "GLM5_INDEXER_LOGITS_QB": "1"},
        {"GLM5_INDEXER_TOPK_QB": "2", "GLM5_INDEXER_TOPK_CAP": "300", "GLM5_INDEXER_LOGITS_QB": "7"},
        {"GLM5_INDEXER_TOPK_QB": "4", "GLM5_INDEXER_TOPK_CAP": "1024", "GLM5_INDEXER_LOGITS_QB": "64"},
        {"GLM5_INDEXER_TOPK_QB": "4", "GLM5_INDEXER_TOPK_CAP": "256"},
    ):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        got = run_all(x, case.topk)
        for name, a, b in zip(("logits", "indices", "scores"), first, got):
            assert torch.equal(a, b), f"{name} changed with {env}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SMALL + [TC_CASES[8]], ids=str)
def test_tc_matches_simt(case, dtype, monkeypatch):
    x = li.make_inputs(case, dtype)
    tc_logits, (tc_idx, tc_val) = logits_of(x), topk_of(x, case.topk)
    monkeypatch.setenv("GLM5_INDEXER_SIMT", "1")
    simt_logits, (simt_idx, simt_val) = logits_of(x), topk_of(x, case.topk)
    if case.ints:  # exact on both paths
        assert torch.equal(tc_logits, simt_logits)
        assert torch.equal(tc_idx, simt_idx) and torch.equal(tc_val, simt_val)
        return
    bound = 2 * floor_tc(x)  # each path within floor_tc of the truth
    assert_close_to_ref(tc_logits, simt_logits.double(), None, floor=bound, name="logits tc vs simt")
    # Each path's k-th best score is its logits' k-th order statistic, which moves by at most the
    # largest per-key difference: the two sorted score lists agree within the same bound.
    assert torch.equal(tc_idx < 0, simt_idx < 0)
    valid = tc_idx >= 0
    if valid.any():
        assert float((tc_val[valid] - simt_val[valid]).abs().max()) <= bound


def test_tc_nan_never_selected():
    # NaN scores act as -inf in the top-k (the CPU op raises); the logits keep the NaN.
    case = TC_CASES[1]
    q, k, w, ks, ke = li.make_inputs(case, torch.bfloat16)
    k[3] = float("nan")
    q[2, 5] = float("nan")  # query 2: every score NaN
    x = (q, k, w, ks, ke)
    logits = logits_of(x)
    visible = reference.visible_mask(ks, ke, case.S)
    assert torch.isnan(logits[:, 3][visible[:, 3]]).all() and torch.isnan(logits[2][visible[2]]).all()
    idx, val = topk_of(x, case.topk)
    assert not (idx == 3).any() and not val.isnan().any()
    assert (idx[2] == -1).all() and torch.isneginf(val[2]).all()
    # queries 0 and 1 see key 3 and every other key is selectable
    assert visible[[0, 1], 3].all()
    assert torch.equal((idx[[0, 1]] >= 0).sum(1), (visible[[0, 1]].sum(1) - 1).clamp(max=case.topk))


def test_tc_fallbacks_match_simt(monkeypatch):
    # Inputs the tensor-core kernels do not take run the SIMT kernels: HI % 16 != 0, DI > 128, and a q
    # that is not 16-byte aligned; each must equal the forced SIMT result bit for bit.
    for case, misalign in (
        (Case(T=5, S=300, HI=24, DI=32, topk=20), False),
        (Case(T=5, S=300, HI=16, DI=144, topk=20), False),
        (Case(T=5, S=300, HI=16, DI=32, topk=20), True),
    ):
        q, k, w, ks, ke = cuda(li.make_inputs(case, torch.bfloat16))
        if misalign:
            buf = torch.empty(q.numel() + 1, dtype=q.dtype, device=q.device)
            q = buf[1:].view(q.shape).copy_(q)
            assert q.is_contiguous() and q.data_ptr() % 16 != 0
        auto = (LOGITS(q, k, w, ks, ke), *TOPK(q, k, w, ks, ke, case.topk))
        monkeypatch.setenv("GLM5_INDEXER_SIMT", "1")
        forced = (LOGITS(q, k, w, ks, ke), *TOPK(q, k, w, ks, ke, case.topk))
        monkeypatch.delenv("GLM5_INDEXER_SIMT")
        assert all(torch.equal(a, b) for a, b in zip(auto, forced)), str(case)


@pytest.mark.parametrize("name, value", [("GLM5_INDEXER_TOPK_QB", "3"), ("GLM5_INDEXER_TOPK_CAP", "2048"),
                                         ("GLM5_INDEXER_LOGITS_QB", "x")])
def test_tc_bad_knob(name, value, monkeypatch):
    x = cuda(li.make_inputs(TC_CASES[0], torch.bfloat16))
    monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=name):
        TOPK(*x, 8) if "TOPK" in name else LOGITS(*x)
