"""The model on the compiled kernels vs on the references (STYLE practice 20): logits, losses and
gradients of a tiny GLM-5 agree, and two optimizer steps follow the same loss curve."""

from __future__ import annotations

import functools

import pytest
import torch

import glm5
from glm5.model import GLM5ForCausalLM
from model_helpers import tiny_config

_OPS = ("indexer_topk", "sparse_mla_fwd", "sparse_mla_bwd", "indexer_kl_loss_fwd", "indexer_kl_loss_bwd",
        "moe_route", "moe_permute", "moe_unpermute", "grouped_gemm", "grouped_gemm_wgrad")


def _missing_cpu_kernels() -> list[str]:
    if not glm5.HAS_EXT:
        return list(_OPS)
    return [op for op in _OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"glm5::{op}", "CPU")]


pytestmark = pytest.mark.skipif(bool(_missing_cpu_kernels()), reason=f"CPU kernels missing: {_missing_cpu_kernels()}")


_GROUPS = {  # public glm5.ops functions the model calls, by kernel family
    "dsa": ("indexer_topk", "sparse_mla", "indexer_kl_loss"),
    "moe": ("moe_route", "moe_experts"),
}


@functools.cache
def _reference_run():
    return _run("reference", 2)


def _run(impl: str, steps: int):
    cfg = tiny_config(indexer_types="FSF")
    torch.manual_seed(0)
    model = GLM5ForCausalLM(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=g)  # 40 > top-16: really sparse
    losses, grads = [], None
    with glm5.ops.use_impl(impl):
        for step in range(steps):
            out = model(ids, labels=ids, indexer_loss="sparse")
            out.loss.backward()
            if step == 0:
                grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
                logits = out.logits.detach()
            opt.step()
            opt.zero_grad()
            losses.append(out.loss.item())
    return logits, grads, losses


@pytest.mark.parametrize("family", ["dsa", "moe", "all"])
def test_kernels_match_references_on_the_model(family, monkeypatch):
    """One kernel family at a time on the kernels (the rest on references), then all of them."""
    ref_logits, ref_grads, ref_losses = _reference_run()
    for other, names in _GROUPS.items():
        if family not in ("all", other):
            for name in names:
                fn = getattr(glm5.ops.reference, name)
                monkeypatch.setattr(glm5.ops, name, fn)
    k_logits, k_grads, k_losses = _run("kernel", 2)
    torch.testing.assert_close(k_logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert k_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(k_grads[name], ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)
    assert max(abs(a - b) for a, b in zip(k_losses, ref_losses)) < 1e-3, (k_losses, ref_losses)
