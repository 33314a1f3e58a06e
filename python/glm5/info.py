"""What this copy of glm5 was built with, and what it runs on."""

from __future__ import annotations

import torch

import glm5


def build_info() -> dict:
    """A dict of build and runtime facts: torch version, CPU capability, threads, CUDA archs, ops."""
    info = {
        "glm5": glm5.__version__,
        "extension_loaded": glm5.HAS_EXT,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "num_threads": torch.get_num_threads(),
        "openmp": torch.backends.openmp.is_available(),
        "ops_impl": glm5.ops.get_impl(),
    }
    if glm5.HAS_EXT:
        from . import _build_info as b

        info.update(
            built_against_torch=b.TORCH_VERSION,
            cxx_compiler=b.CXX_COMPILER,
            cpu_arch_flags=b.CPU_ARCH,
            openmp_version=b.OPENMP,
            cuda_kernels=b.CUDA_BUILT,
            cuda_archs=b.CUDA_ARCHS,
            nvcc=b.CUDA_COMPILER_VERSION or None,
        )
        info["ops"] = {name: _backends(name) for name in glm5.ops.OP_NAMES}
    else:
        info["extension_error"] = glm5.EXT_ERROR
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def _backends(op: str) -> list[str]:
    """The dispatch keys ('CPU', 'CUDA') that have a kernel for torch.ops.glm5.<op>."""
    qualname = f"glm5::{op}"
    return [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, k)]
