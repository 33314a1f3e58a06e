"""Shared test set-up: devices, markers, seeding, and a loud failure when the kernels are missing."""

from __future__ import annotations

import os

import pytest
import torch

import glm5


def pytest_configure(config):
    # The suite tests the compiled kernels; a silent fallback to the references would make every
    # kernel test compare the reference with itself. GLM5_ALLOW_NO_EXT=1 runs it without a build.
    if not glm5.HAS_EXT and not os.environ.get("GLM5_ALLOW_NO_EXT"):
        raise pytest.UsageError(f"glm5._C is not built ({glm5.EXT_ERROR}); run `pip install --no-build-isolation -e .`")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()  # asked here, never at import time of a test module
    is_sm90 = has_cuda and torch.cuda.get_device_capability() == (9, 0)
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "sm90" in item.keywords and not is_sm90:
            item.add_marker(pytest.mark.skip(reason="needs a Hopper (sm_90) GPU"))


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", _devices())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
