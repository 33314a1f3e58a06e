"""Model tests run on the public glm5.ops functions: the kernels where a CPU kernel is registered,
the plain-PyTorch references otherwise (while the kernels are being written)."""

from __future__ import annotations

import pytest
import torch

import glm5

# Ops the model calls (schema names); if any lacks a CPU kernel the whole model runs on references.
_MODEL_OPS = ("indexer_topk", "sparse_mla_fwd", "indexer_kl_loss_fwd", "moe_route")


def _cpu_kernels_complete() -> bool:
    if not glm5.HAS_EXT:
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"glm5::{op}", "CPU") for op in _MODEL_OPS)


@pytest.fixture(autouse=True)
def _ops_impl():
    with glm5.ops.use_impl(None if _cpu_kernels_complete() else "reference"):
        yield
