"""The tensor-core sparse MLA backward (csrc/cuda/sparse_mla/bwd_tc.cu) on a GPU (skipped without one).

bf16 / fp16 inputs with D % 16 == 0 and d_v % 16 == 0 take the tensor-core kernel; other shapes,
misaligned pointers and GLM5_SPARSE_MLA_SIMT=1 take the CUDA-core kernel. Both write the same per-slot
key-gradient rows, which api.cu sorts by key and sums in (t, slot) order, so the result stays
deterministic and independent of the query chunking. The kernel rounds P and dS to the input dtype
before the dq / dk products (as FlashAttention does); tests/cuda_sim/test_sim_sparse_mla_bwd_tc.py runs
the same kernel source on the CPU simulator against exact arithmetic.

GLM5_WGMMA=0 keeps the Hopper wgmma kernels (test_cuda_sparse_mla_bwd_wgmma.py) off the
GLM-5 shapes, so these tests stay on mma.sync.

Status: compiled for sm_90a, not yet run on a GPU (`pytest -m cuda tests/ops/test_cuda_sparse_mla_bwd_tc.py`).
"""

from __future__ import annotations

import pytest
import torch

import glm5
from glm5.ops import reference
from numerics import assert_close_to_ref
from test_cuda_dsa import cuda, floor_cuda
from test_sparse_mla import Case, dead, make_inputs, out_and_grads, upcast

pytestmark = pytest.mark.cuda

FWD = torch.ops.glm5.sparse_mla_fwd
BWD = torch.ops.glm5.sparse_mla_bwd
DTYPES = [torch.bfloat16, torch.float16]

CASES = [
    Case(T=4, S=64, K=32, H=4, D=64, dv=32),  # one m-tile (12 padded heads), one full key block
    Case(T=3, S=256, K=64, H=16, D=64, dv=64),  # d_v == D
    Case(T=5, S=300, K=77, H=40, D=128, dv=64, pad=0.2),  # three m-tiles (8 padded heads), partial block
    Case(T=3, S=200, K=45, H=80, D=64, dv=48, spread=4.0),  # head groups of 64 and 16; dv % 32 == 16
    Case(T=6, S=20, K=40, H=2, D=16, dv=16),  # K > S: -1 padding; single 16-wide k-steps
    Case(T=9, S=80, K=50, H=4, D=48, dv=32, pad=0.4, dup=True, dead_rows=2),  # -1 slots, duplicates, dead rows
    Case(T=4, S=900, K=800, H=6, D=32, dv=16, spread=6.0),  # 25 key blocks, wide scores
    Case(T=2, S=300, K=100, H=64, D=576, dv=512, pad=0.1),  # GLM-5 widths with few keys
]
# Many slots per key (S small against T * K): the per-key sums have real collisions.
SHARED_KEYS = Case(T=70, S=40, K=48, H=4, D=48, dv=32, pad=0.2, dup=True, dead_rows=2)
GLM5 = pytest.param(Case(T=2, S=4096, K=2048, H=64, D=576, dv=512), marks=pytest.mark.slow, id="glm5")


@pytest.fixture(autouse=True)
def _mma_sync_only(monkeypatch):
    monkeypatch.setenv("GLM5_WGMMA", "0")


def bwd_inputs(x: tuple) -> tuple:
    """BWD's arguments on the GPU: a fixed grad_out, the inputs, and the forward's out / lse (computed
    once, so that switching the kernels afterwards changes only the backward)."""
    xc = cuda(x)
    out, lse = FWD(*xc)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype).cuda()
    return (g, *xc[:3], out, lse, *xc[3:])


def grads(args: tuple) -> tuple:
    return tuple(t.cpu() for t in BWD(*args))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES + [SHARED_KEYS, GLM5], ids=str)
def test_bwd_tc(case, dtype):
    assert_backward_matches_reference(case, dtype)


def assert_backward_matches_reference(case: Case, dtype: torch.dtype) -> None:
    """Through autograd of glm5.ops.sparse_mla on the GPU against autograd of the fp64 reference
    (test_cuda_dsa's rule), with the contracts of queries without keys and keys nobody selected."""
    x = make_inputs(case, dtype)
    g = torch.randn(case.T, case.H, case.dv, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, _, dq, dkv = out_and_grads(glm5.ops.sparse_mla, cuda(x), g.float().cuda())
    _, _, truth_dq, truth_dkv = out_and_grads(reference.sparse_mla, upcast(x), g)
    _, _, lowp_dq, lowp_dkv = out_and_grads(reference.sparse_mla, x, g.float())
    assert dq.dtype == dtype and dkv.dtype == dtype
    dq, dkv = dq.cpu(), dkv.cpu()
    for name, a, t, lp in (("dq", dq, truth_dq, lowp_dq), ("dkv", dkv, truth_dkv, lowp_dkv)):
        assert_close_to_ref(a, t, lp, factor=3.0, floor=floor_cuda(t, dtype, case.K), name=name)
    assert not dq[dead(x)].any(), "a query without keys gets dq = 0"
    used = torch.zeros(case.S, dtype=torch.bool)
    used[x[2][x[2] >= 0].long()] = True
    assert not dkv[~used].any(), "a key no query selected gets dkv = 0"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES + [SHARED_KEYS], ids=str)
def test_bwd_tc_matches_simt(case, dtype, monkeypatch):
    # Same inputs through both kernels: they differ by the rounding of P and dS to the input dtype only
    # (a fraction of an ulp of the largest gradient), plus the final rounding of each result.
    args = bwd_inputs(make_inputs(case, dtype))
    tc = grads(args)
    monkeypatch.setenv("GLM5_SPARSE_MLA_SIMT", "1")
    simt = grads(args)
    eps = torch.finfo(dtype).eps
    for name, a, b in zip(("dq", "dkv"), tc, simt):
        top = max(float(b.abs().max()), 1e-30)
        err = float((a.double() - b.double()).abs().max())
        assert err <= 3 * eps * top, f"{name}: tensor-core vs SIMT max difference {err:.3e}, max |value| {top:.3e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_tc_path_taken(dtype, monkeypatch):
    # A supported shape gives other bits than the SIMT kernel (P and dS are rounded); an unsupported
    # one (D % 16 != 0) falls back to it and gives the same bits.
    supported, unsupported = Case(T=3, S=100, K=40, H=4, D=32, dv=16), Case(T=3, S=100, K=40, H=4, D=40, dv=16)
    a_s, a_u = bwd_inputs(make_inputs(supported, dtype)), bwd_inputs(make_inputs(unsupported, dtype))
    default = grads(a_s), grads(a_u)
    monkeypatch.setenv("GLM5_SPARSE_MLA_SIMT", "1")
    simt = grads(a_s), grads(a_u)
    assert not all(torch.equal(a, b) for a, b in zip(default[0], simt[0])), "the tensor-core kernel did not run"
    assert all(torch.equal(a, b) for a, b in zip(default[1], simt[1]))


def test_bwd_tc_misaligned_falls_back(monkeypatch):
    # q starting 2 bytes past a 16-byte boundary: no cp.async, the SIMT kernel runs (same bits).
    case = Case(T=3, S=100, K=40, H=4, D=32, dv=16)
    q, kv, idx, scale, dv = cuda(make_inputs(case, torch.bfloat16))
    out, lse = FWD(q, kv, idx, scale, dv)
    g = torch.randn_like(out)
    q_off = torch.empty(q.numel() + 1, dtype=q.dtype, device=q.device)[1:].view_as(q).copy_(q)
    assert q_off.data_ptr() % 16 != 0 and q_off.is_contiguous()
    got = BWD(g, q_off, kv, idx, out, lse, scale, dv)
    monkeypatch.setenv("GLM5_SPARSE_MLA_SIMT", "1")
    want = BWD(g, q, kv, idx, out, lse, scale, dv)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_tc_deterministic(dtype, monkeypatch):
    # Run twice, and with one query per backward chunk: every bit equal.
    args = bwd_inputs(make_inputs(SHARED_KEYS, dtype))
    first = grads(args)
    assert all(torch.equal(a, b) for a, b in zip(first, grads(args)))
    monkeypatch.setenv("GLM5_SPARSE_MLA_BWD_CHUNK_BYTES", "1")
    assert all(torch.equal(a, b) for a, b in zip(first, grads(args)))
