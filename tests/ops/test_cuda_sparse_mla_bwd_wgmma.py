"""The Hopper warpgroup-MMA sparse MLA backward (csrc/cuda/sparse_mla/bwd_wgmma.cu) on an sm_90 GPU.

bf16 / fp16 inputs with D 192 or 576 and d_v % 64 == 0 take it: against autograd of the fp64 reference
(test_cuda_dsa's rule), against the mma.sync kernel on the same forward outputs (GLM5_WGMMA=0),
and bit-for-bit across runs and query chunkings. tests/cuda_sim/test_sim_sparse_mla_bwd_wgmma.py runs
the same kernel source on the CPU simulator against exact arithmetic. Skipped without an sm_90 GPU.
"""

from __future__ import annotations

import pytest
import torch

from test_cuda_sparse_mla_bwd_tc import assert_backward_matches_reference, bwd_inputs, grads
from test_sparse_mla import Case, make_inputs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                       reason="the wgmma kernel needs an sm_90 GPU"),
]

DTYPES = [torch.bfloat16, torch.float16]

CASES = [
    Case(T=4, S=100, K=32, H=64, D=192, dv=128),  # one full block, 64 heads
    Case(T=5, S=300, K=77, H=16, D=192, dv=64, pad=0.2),  # padded heads, partial last block
    Case(T=3, S=200, K=45, H=80, D=192, dv=192, spread=4.0, dup=True),  # head groups of 64 and 16; d_v = D
    Case(T=9, S=20, K=40, H=8, D=192, dv=64, pad=0.4, dead_rows=2),  # K > S, dead rows
    Case(T=2, S=300, K=100, H=64, D=576, dv=512, pad=0.1),  # GLM-5 widths with few keys
    Case(T=2, S=4096, K=2048, H=128, D=576, dv=512),  # GLM-5, two head groups
]
SHARED_KEYS = Case(T=70, S=40, K=48, H=4, D=192, dv=128, pad=0.2, dup=True, dead_rows=2)


@pytest.fixture(autouse=True)
def _tensor_cores(monkeypatch):
    monkeypatch.setenv("GLM5_SPARSE_MLA_SIMT", "0")
    monkeypatch.setenv("GLM5_WGMMA", "1")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES + [SHARED_KEYS], ids=str)
def test_bwd_wgmma(case, dtype):
    assert_backward_matches_reference(case, dtype)


@pytest.mark.parametrize("case", CASES + [SHARED_KEYS], ids=str)
def test_bwd_wgmma_matches_mma_sync(case, monkeypatch):
    # The same forward outputs through both backward kernels: both round P and dS to bf16 and accumulate in
    # fp32 in other orders, so they agree to a few ulps of the largest gradient.
    args = bwd_inputs(make_inputs(case, torch.bfloat16))
    wg = grads(args)
    monkeypatch.setenv("GLM5_WGMMA", "0")
    mma = grads(args)
    eps = torch.finfo(torch.bfloat16).eps
    for name, a, b in zip(("dq", "dkv"), wg, mma):
        top = max(float(b.abs().max()), 1e-30)
        err = float((a.double() - b.double()).abs().max())
        assert err <= 4 * eps * top, f"{name}: wgmma vs mma.sync max difference {err:.3e}, max |value| {top:.3e}"


def test_bwd_wgmma_deterministic(monkeypatch):
    args = bwd_inputs(make_inputs(SHARED_KEYS, torch.bfloat16))
    first = grads(args)
    assert all(torch.equal(a, b) for a, b in zip(first, grads(args)))
    monkeypatch.setenv("GLM5_SPARSE_MLA_BWD_CHUNK_BYTES", "1")  # one query per chunk
    assert all(torch.equal(a, b) for a, b in zip(first, grads(args)))
