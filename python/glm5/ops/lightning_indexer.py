"""Lightning indexer: scores and the fused top-k (DeepSeek Sparse Attention, stage one).

Precise semantics: see `glm5.ops.reference.indexer_logits` / `indexer_topk`.
"""

from __future__ import annotations

import torch

import glm5

from . import reference
from ._dispatch import use_kernel


def indexer_logits(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor) -> torch.Tensor:
    """logits[t,s] = sum_j w[t,j] * relu(q[t,j] . k[s]) on visible keys, -inf elsewhere.

    Args:
        q [T, HI, DI], k [S, DI], w [T, HI]: fp32 / bf16 / fp16 (fp64 for gradcheck), one dtype.
        ks, ke [T] int32: query t sees keys ks[t] <= s < ke[t].
    Returns:
        [T, S] fp32. Differentiable in q, k and w. Memory is O(T*S): for selection use indexer_topk.
    """
    if not use_kernel():
        return reference.indexer_logits(q, k, w, ks, ke)
    return torch.ops.glm5.indexer_logits(q, k, w, ks, ke)


@torch.no_grad()
def indexer_topk(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `topk` highest-scoring visible keys of each query, without materialising [T, S].

    Args: as indexer_logits, plus topk > 0 (may exceed the number of visible keys).
    Returns:
        indices [T, topk] int32 sorted by descending score (ties: smaller key index first), -1 padded;
        scores [T, topk] fp32, -inf padded. Deterministic; not differentiable (the indexer is trained
        through indexer_kl_loss). NaN scores raise.
    """
    if not use_kernel():
        return reference.indexer_topk(q, k, w, ks, ke, topk)
    return torch.ops.glm5.indexer_topk(q, k, w, ks, ke, topk)


def _fp32_like(t: torch.Tensor) -> torch.dtype:
    return reference.acc_dtype(t)


def _check_devices(q: torch.Tensor, *others: torch.Tensor) -> None:
    for name, t in zip(("k", "w", "ks", "ke"), others):
        torch._check(t.device == q.device, lambda: f"{name} is on {t.device} but q is on {q.device}")


if glm5.HAS_EXT:

    @torch.library.register_fake("glm5::indexer_logits")
    def _(q, k, w, ks, ke):
        torch._check(q.dim() == 3 and k.dim() == 2 and w.dim() == 2, lambda: "indexer_logits: bad ranks")
        _check_devices(q, k, w, ks, ke)
        return q.new_empty((q.shape[0], k.shape[0]), dtype=_fp32_like(q))

    @torch.library.register_fake("glm5::indexer_logits_bwd")
    def _(grad, q, k, w, ks, ke):
        _check_devices(q, k, w, ks, ke)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(w)

    @torch.library.register_fake("glm5::indexer_topk")
    def _(q, k, w, ks, ke, topk):
        torch._check(topk > 0, lambda: f"topk must be positive, got {topk}")
        _check_devices(q, k, w, ks, ke)
        T = q.shape[0]
        return q.new_empty((T, topk), dtype=torch.int32), q.new_empty((T, topk), dtype=_fp32_like(q))

    def _setup_context(ctx, inputs, output):
        q, k, w, ks, ke = inputs
        ctx.save_for_backward(q, k, w, ks, ke)

    def _backward(ctx, grad):
        q, k, w, ks, ke = ctx.saved_tensors
        dq, dk, dw = torch.ops.glm5.indexer_logits_bwd(grad.contiguous(), q, k, w, ks, ke)
        return dq, dk, dw, None, None

    torch.library.register_autograd("glm5::indexer_logits", _backward, setup_context=_setup_context)
