"""Model tests run on the plain-PyTorch references of glm5.ops (the specification), so they test
the model itself; test_kernels.py runs the same model on the compiled kernels and compares."""

from __future__ import annotations

import pytest

import glm5


@pytest.fixture(autouse=True)
def _reference_ops():
    with glm5.ops.use_impl("reference"):
        yield
