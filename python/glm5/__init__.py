"""glm5: GLM-5 (DeepSeek Sparse Attention + MLA + MoE) kernels, model and training for PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

import torch  # noqa: F401  (loads libtorch, which _C links against)

try:  # loading the extension runs its op registrations (TORCH_LIBRARY / TORCH_LIBRARY_IMPL)
    from . import _C  # noqa: F401

    HAS_EXT = True
    EXT_ERROR: str | None = None
except ImportError as e:  # a source checkout without a build: every op falls back to its reference
    HAS_EXT = False
    EXT_ERROR = str(e)

from . import ops  # noqa: E402
from .info import build_info  # noqa: E402


def from_pretrained(path, *, dtype=None, device="cpu", **kwargs):
    """Load a Hugging Face `glm_moe_dsa` checkpoint directory: see glm5.model.from_pretrained."""
    from .model import from_pretrained as _from_pretrained

    return _from_pretrained(path, dtype=dtype, device=device, **kwargs)


__all__ = ["ops", "build_info", "from_pretrained", "HAS_EXT", "__version__"]
