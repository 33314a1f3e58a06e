"""The Hopper warpgroup-MMA sparse MLA forward (csrc/cuda/sparse_mla/fwd_wgmma.cu) against the fp64
reference and against the mma.sync kernel.

bf16 / fp16 inputs with D % 64 == 0 and d_v in {128, 512} take it on an sm_90 GPU; these cases cover
64-head groups (padded below 64, two groups at 80 and 128), blocks of 64 keys with a partial last one,
-1 padding, repeated keys, queries without any key and wide score spreads. GLM5_WGMMA=0
switches it off (the mma.sync kernel then runs the same shapes). Skipped without an sm_90 GPU.
"""

from __future__ import annotations

import pytest
import torch

import glm5
from test_sparse_mla import Case, assert_kernel_forward, make_inputs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                       reason="the wgmma kernel needs an sm_90 GPU"),
]

FWD = torch.ops.glm5.sparse_mla_fwd

CASES = [
    Case(T=4, S=200, K=64, H=64, D=128, dv=128),  # one full block
    Case(T=5, S=300, K=77, H=16, D=128, dv=128, pad=0.2),  # 48 padded heads, partial last block
    Case(T=3, S=700, K=150, H=80, D=192, dv=128, spread=6.0),  # two head groups, the max moves
    Case(T=6, S=500, K=100, H=40, D=128, dv=128, dup=True, dead_rows=2),
    Case(T=7, S=40, K=70, H=8, D=128, dv=128, pad=0.5),  # K > S: many -1 slots
    Case(T=2, S=4096, K=2048, H=64, D=576, dv=512),  # GLM-5
    Case(T=2, S=3000, K=2048, H=128, D=576, dv=512, spread=3.0),  # two groups of 64 heads
    Case(T=3, S=5000, K=2000, H=32, D=576, dv=512, pad=0.1),  # partial last block at GLM-5 dims
]


def run(x: tuple, monkeypatch, wgmma: bool = True) -> tuple:
    monkeypatch.setenv("GLM5_SPARSE_MLA_SIMT", "0")
    monkeypatch.setenv("GLM5_WGMMA", "1" if wgmma else "0")
    q, kv, idx, scale, dv = x
    out, lse = FWD(q.cuda(), kv.cuda(), idx.cuda(), scale, dv)
    return out.cpu(), lse.cpu()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_wgmma_forward_matches_reference(case, dtype, monkeypatch):
    x = make_inputs(case, dtype)
    out, lse = run(x, monkeypatch)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_kernel_forward(x, case, out, lse)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_wgmma_forward_agrees_with_mma_sync(case, monkeypatch):
    x = make_inputs(case, torch.bfloat16)
    out_w, lse_w = run(x, monkeypatch, wgmma=True)
    out_m, lse_m = run(x, monkeypatch, wgmma=False)
    # Both round P to bf16 and accumulate in fp32, over other block sizes: a few ulps of out.
    torch.testing.assert_close(out_w.float(), out_m.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse_w, lse_m, rtol=1e-5, atol=1e-4)


def test_wgmma_forward_deterministic(monkeypatch):
    x = make_inputs(CASES[5], torch.bfloat16)
    first = run(x, monkeypatch)
    second = run(x, monkeypatch)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_wgmma_forward_through_autograd_and_compile(monkeypatch):
    monkeypatch.setenv("GLM5_WGMMA", "1")
    x = make_inputs(CASES[1], torch.bfloat16)
    q, kv, idx, scale, dv = (t.cuda() if isinstance(t, torch.Tensor) else t for t in x)
    q.requires_grad_()
    kv.requires_grad_()
    out, _ = glm5.ops.sparse_mla(q, kv, idx, scale, dv)
    out.float().square().sum().backward()
    assert torch.isfinite(q.grad.float()).all() and torch.isfinite(kv.grad.float()).all()
    compiled = torch.compile(lambda a, b: glm5.ops.sparse_mla(a, b, idx, scale, dv)[0], fullgraph=True)
    torch.testing.assert_close(compiled(q.detach(), kv.detach()), out.detach(), rtol=0, atol=0)
