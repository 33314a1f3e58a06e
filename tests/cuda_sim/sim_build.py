"""Builds (once, cached under build/cuda_sim/) the simulator extensions of this folder: glm5's CUDA
kernels compiled for the CPU with cuda_sim.h. Needs the CUDA toolkit's headers (cuda_bf16.h and
friends, found from CUDA_HOME or nvcc), not a GPU; without them the tests that need one skip.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


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


def cutlass_include() -> Path | None:
    """CUTLASS/CuTe headers of the pinned nvidia-cutlass wheel, located without importing it."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    inc = Path(spec.submodule_search_locations[0]) / "source" / "include"
    return inc if (inc / "cute").is_dir() else None


def load_sim(name: str, source: str, cutlass: bool = False):
    """The extension `name` built from tests/cuda_sim/<source> (skips the test when it cannot be)."""
    inc = cuda_include()
    if inc is None:
        pytest.skip("CUDA toolkit headers not found (CUDA_HOME or nvcc): the CUDA simulator needs cuda_bf16.h")
    extra = [inc]
    if cutlass:
        cut = cutlass_include()
        if cut is None:
            pytest.skip("needs the CUTLASS headers: pip install --no-deps nvidia-cutlass==4.2.0.0")
        extra += [inc / "cccl", cut]
    from torch.utils import cpp_extension

    build = ROOT / "build" / "cuda_sim" / name  # one folder per extension: each gets its own build.ninja
    build.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(HERE / source)],
        extra_include_paths=[str(p) for p in extra],
        extra_cflags=["-std=c++20", "-O1", "-Wno-attributes"],
        build_directory=str(build),
        verbose=False,
    )


@contextlib.contextmanager
def reseeded(seed: int):
    """Launches inside resume the simulated threads in another seeded order (cuda_sim.h): a kernel
    whose result depends on the interleaving of its threads gives other bits."""
    old = os.environ.get("GLM5_SIM_SEED")
    os.environ["GLM5_SIM_SEED"] = str(seed)
    try:
        yield
    finally:
        if old is None:
            del os.environ["GLM5_SIM_SEED"]
        else:
            os.environ["GLM5_SIM_SEED"] = old
