"""The op surface holds together: one schema file, and every op has a kernel, a fake and a reference."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import glm5
from glm5.ops import reference

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _schema_ops() -> set[str]:
    return {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("glm5::")}


def test_exactly_one_schema_file():
    hits = [p for p in (ROOT / "csrc").rglob("*.c*") if "TORCH_LIBRARY(glm5" in p.read_text()]
    assert [p.name for p in hits] == ["glm5_ops.cpp"]


def test_op_names_match_schema():
    assert _schema_ops() == set(glm5.ops.OP_NAMES)


@pytest.mark.parametrize("op", glm5.ops.OP_NAMES)
def test_every_op_has_cpu_kernel_and_fake(op):
    qualname = f"glm5::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU"), f"{qualname} has no CPU kernel"
    entry = torch._library.simple_registry.singleton.find(qualname)
    assert entry.fake_impl.kernel is not None, f"{qualname} has no register_fake"


@pytest.mark.parametrize("op", glm5.ops.OP_NAMES)
def test_every_forward_op_has_a_reference(op):
    if op.endswith("_bwd") or op.endswith("_wgrad"):
        return  # backward ops are specified by autograd of their forward's reference
    public = re.sub(r"_fwd$", "", op)
    assert callable(getattr(reference, public, None)), f"reference.{public} is missing"
    assert callable(getattr(glm5.ops, public, None)), f"glm5.ops.{public} is missing"


def test_every_cuda_source_registers_cuda_kernels():
    for api in (ROOT / "csrc" / "cuda").rglob("api.cu"):
        assert "TORCH_LIBRARY_IMPL(glm5, CUDA" in api.read_text(), f"{api} registers no CUDA kernels"


def test_impl_switch():
    assert glm5.ops.get_impl() == "kernel"
    with glm5.ops.use_impl("reference"):
        assert glm5.ops.get_impl() == "reference"
    assert glm5.ops.get_impl() == "kernel"
    with pytest.raises(ValueError, match="impl must be one of"):
        glm5.ops.set_impl("fast")


def test_info_cli():
    out = subprocess.run([sys.executable, "-m", "glm5.cli", "info", "--json"], check=True, capture_output=True, text=True)
    info = json.loads(out.stdout)
    assert info["extension_loaded"] is True
    assert info["torch"] == torch.__version__
    assert set(info["ops"]) == set(glm5.ops.OP_NAMES)
    assert all("CPU" in backends for backends in info["ops"].values())
