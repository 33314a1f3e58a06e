"""The tensor-core sparse MLA forward (csrc/cuda/sparse_mla/fwd_tc.cu) against the fp64 reference.

bf16 / fp16 inputs with D % 16 == 0 and d_v % 32 == 0 take the tensor-core kernel; these cases cover
its tilings (1 to 4 m-tiles of 16 heads, padded heads, several head groups), key blocks of 32 with a
partial last block, -1 padding, repeated keys, queries without any key, and wide score spreads that
move the running max. GLM5_SPARSE_MLA_SIMT=1 forces the CUDA-core kernel, for the cross-check;
GLM5_WGMMA=0 keeps the Hopper wgmma kernel (test_cuda_sparse_mla_wgmma.py) off the GLM-5
shapes, so these tests stay on mma.sync. Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

import glm5
from test_sparse_mla import Case, assert_kernel_forward, make_inputs

pytestmark = pytest.mark.cuda

FWD = torch.ops.glm5.sparse_mla_fwd

TC_CASES = [
    Case(T=4, S=64, K=32, H=4, D=64, dv=32),  # one m-tile, 12 padded heads, one full block
    Case(T=3, S=256, K=64, H=16, D=64, dv=64),  # d_v == D
    Case(T=5, S=300, K=77, H=32, D=128, dv=64, pad=0.2),  # two m-tiles, partial last block
    Case(T=6, S=500, K=100, H=40, D=96, dv=64, dup=True, dead_rows=2),  # three m-tiles, padded
    Case(T=3, S=700, K=129, H=80, D=64, dv=32, spread=6.0),  # two head groups (64 + 16 padded)
    Case(T=7, S=40, K=70, H=8, D=32, dv=32, pad=0.5),  # K > S: many -1 slots
    Case(T=2, S=4096, K=2048, H=64, D=576, dv=512),  # GLM-5
    Case(T=2, S=3000, K=2048, H=128, D=576, dv=512, spread=3.0),  # two groups of 64 heads
]


@pytest.fixture(autouse=True)
def _mma_sync_only(monkeypatch):
    monkeypatch.setenv("GLM5_WGMMA", "0")


def run(x: tuple, monkeypatch, simt: bool) -> tuple:
    monkeypatch.setenv("GLM5_SPARSE_MLA_SIMT", "1" if simt else "0")
    q, kv, idx, scale, dv = x
    out, lse = FWD(q.cuda(), kv.cuda(), idx.cuda(), scale, dv)
    return out.cpu(), lse.cpu()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", TC_CASES, ids=str)
def test_tc_forward_matches_reference(case, dtype, monkeypatch):
    x = make_inputs(case, dtype)
    out, lse = run(x, monkeypatch, simt=False)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_kernel_forward(x, case, out, lse)


@pytest.mark.parametrize("case", TC_CASES[:6], ids=str)
def test_tc_forward_agrees_with_simt(case, monkeypatch):
    x = make_inputs(case, torch.bfloat16)
    out_tc, lse_tc = run(x, monkeypatch, simt=False)
    out_simt, lse_simt = run(x, monkeypatch, simt=True)
    # Both accumulate in fp32; the tensor-core path also rounds P to bf16: a few ulps of out.
    torch.testing.assert_close(out_tc.float(), out_simt.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse_tc, lse_simt, rtol=1e-5, atol=1e-4)


def test_tc_forward_deterministic(monkeypatch):
    x = make_inputs(TC_CASES[4], torch.bfloat16)
    first = run(x, monkeypatch, simt=False)
    second = run(x, monkeypatch, simt=False)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_misaligned_input_falls_back(monkeypatch):
    # kv viewed at an odd element offset is contiguous but not 16-byte aligned: the SIMT kernel runs.
    case = TC_CASES[1]
    q, kv, idx, scale, dv = make_inputs(case, torch.bfloat16)
    storage = torch.zeros(kv.numel() + 1, dtype=kv.dtype, device="cuda")
    storage[1:] = kv.flatten().cuda()
    kv_odd = storage[1:].view_as(kv)
    assert kv_odd.data_ptr() % 16 != 0
    monkeypatch.setenv("GLM5_SPARSE_MLA_SIMT", "0")
    got = FWD(q.cuda(), kv_odd, idx.cuda(), scale, dv)
    want = FWD(q.cuda(), kv.cuda(), idx.cuda(), scale, dv)
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2e-2, atol=2e-2)


def test_tc_forward_through_autograd(monkeypatch):
    # The public op (autograd wrapper) uses the same kernel; the backward consumes its lse.
    monkeypatch.setenv("GLM5_SPARSE_MLA_SIMT", "0")
    q, kv, idx, scale, dv = (t.cuda() if isinstance(t, torch.Tensor) else t for t in make_inputs(TC_CASES[2], torch.bfloat16))
    q.requires_grad_()
    kv.requires_grad_()
    out, lse = glm5.ops.sparse_mla(q, kv, idx, scale, dv)
    out.float().square().sum().backward()
    assert torch.isfinite(q.grad.float()).all() and torch.isfinite(kv.grad.float()).all()
