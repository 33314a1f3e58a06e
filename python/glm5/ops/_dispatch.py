"""The kernel-or-reference switch behind every public op.

`glm5.ops.set_impl("reference")` (or the environment variable GLM5_OPS_IMPL=reference) makes every
model-facing op run its plain-PyTorch reference instead of the compiled kernel: for tests, for
debugging a numerical difference, and on a checkout whose extension is not built. "kernel" requires
the extension and fails loudly without it; None (the default) uses the kernel when it is built.
"""

from __future__ import annotations

import contextlib
import os

import glm5

_VALID = (None, "kernel", "reference")
_impl: str | None = os.environ.get("GLM5_OPS_IMPL") or None
if _impl not in _VALID:
    raise ValueError(f"GLM5_OPS_IMPL must be 'kernel' or 'reference', got {_impl!r}")


def set_impl(impl: str | None) -> None:
    """Select 'kernel', 'reference' or None (kernel when built, else reference) for all ops."""
    global _impl
    if impl not in _VALID:
        raise ValueError(f"impl must be one of {_VALID}, got {impl!r}")
    if impl == "kernel" and not glm5.HAS_EXT:
        raise RuntimeError(f"glm5 kernels are not built: {glm5.EXT_ERROR}")
    _impl = impl


def get_impl() -> str:
    """The implementation the ops use right now: 'kernel' or 'reference'."""
    if _impl is None:
        return "kernel" if glm5.HAS_EXT else "reference"
    return _impl


@contextlib.contextmanager
def use_impl(impl: str | None):
    """Context manager form of set_impl."""
    global _impl
    old = _impl
    set_impl(impl)
    try:
        yield
    finally:
        _impl = old


def use_kernel() -> bool:
    return get_impl() == "kernel"
