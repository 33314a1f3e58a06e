"""Builds the simulator extensions of tests/cuda_sim (glm5's CUDA kernels on the CPU) once per session.

Needs the CUDA toolkit's headers (cuda_bf16.h and friends, found from CUDA_HOME or nvcc on PATH),
not a GPU; the tests skip without them.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "ops"))  # the kernel tests' case lists and input makers


def cuda_include() -> Path | None:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parents[1]))
    homes.append("/usr/local/cuda")
    for home in filter(None, homes):
        for inc in (Path(home) / "include", Path(home) / "targets" / "x86_64-linux" / "include"):
            if (inc / "cuda_bf16.h").exists():
                return inc
    return None


def load_sim(name: str, source: str, extra_include_paths: tuple = ()):
    """Builds (or reuses) the simulator extension `name` from tests/cuda_sim/<source>."""
    inc = cuda_include()
    if inc is None:
        pytest.skip("CUDA toolkit headers not found (CUDA_HOME or nvcc): the CUDA simulator needs cuda_bf16.h")
    from torch.utils import cpp_extension

    build = ROOT / "build" / "cuda_sim" / name  # one folder per extension: each gets its own build.ninja
    build.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(HERE / source)],
        extra_include_paths=[str(inc), *map(str, extra_include_paths)],
        extra_cflags=["-std=c++20", "-O1", "-Wno-attributes", "-pthread"],
        extra_ldflags=["-pthread"],
        build_directory=str(build),
        verbose=False,
    )


@pytest.fixture(scope="session")
def sim():
    """The tensor-core sparse MLA forward (sim_kernels.cpp)."""
    return load_sim("glm5_cuda_sim", "sim_kernels.cpp")


@pytest.fixture(scope="session")
def sim_simt():
    """The CUDA-core sparse MLA forward, backward, key sort and reduction (sim_simt_sparse_mla.cpp)."""
    return load_sim("glm5_cuda_sim_simt", "sim_simt_sparse_mla.cpp")
