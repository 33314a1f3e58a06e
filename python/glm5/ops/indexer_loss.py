"""The indexer's training loss: KL from the main attention's head-summed probabilities.

Precise semantics: see `glm5.ops.reference.indexer_kl_loss`.
"""

from __future__ import annotations

import torch

import glm5

from . import reference
from ._dispatch import use_kernel


def indexer_kl_loss(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    w: torch.Tensor,
    q: torch.Tensor,
    kv: torch.Tensor,
    lse: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    sm_scale: float,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_t KL(p_t || softmax(I_t)): dense warm-up when indices is None, sparse stage otherwise.

    Args:
        q_idx [T, HI, DI], k_idx [S, DI], w [T, HI]: indexer inputs (one dtype).
        q [T, H, D_qk], kv [S, D_qk], lse [T, H] fp32: the main attention and its saved lse (detached).
        ks, ke [T] int32: visible key ranges. indices [T, K] int32 or None.
    Returns:
        scalar fp32, differentiable in q_idx, k_idx and w only. Never builds an [S, S, H] tensor.
    """
    if not use_kernel():
        return reference.indexer_kl_loss(q_idx, k_idx, w, q, kv, lse, ks, ke, sm_scale, indices)
    per_query = torch.ops.glm5.indexer_kl_loss_fwd(
        q_idx, k_idx, w, q.detach(), kv.detach(), lse.detach(), ks, ke, sm_scale, indices
    )
    return per_query.sum()


if glm5.HAS_EXT:

    @torch.library.register_fake("glm5::indexer_kl_loss_fwd")
    def _(q_idx, k_idx, w, q, kv, lse, ks, ke, sm_scale, indices=None):
        return q_idx.new_empty((q_idx.shape[0],), dtype=reference.acc_dtype(q_idx))

    @torch.library.register_fake("glm5::indexer_kl_loss_bwd")
    def _(grad, q_idx, k_idx, w, q, kv, lse, ks, ke, sm_scale, indices=None):
        return torch.empty_like(q_idx), torch.empty_like(k_idx), torch.empty_like(w)

    def _setup_context(ctx, inputs, output):
        q_idx, k_idx, w, q, kv, lse, ks, ke, sm_scale, indices = inputs
        ctx.save_for_backward(q_idx, k_idx, w, q, kv, lse, ks, ke, indices)
        ctx.sm_scale = sm_scale

    def _backward(ctx, grad):
        q_idx, k_idx, w, q, kv, lse, ks, ke, indices = ctx.saved_tensors
        dq_idx, dk_idx, dw = torch.ops.glm5.indexer_kl_loss_bwd(
            grad.contiguous(), q_idx, k_idx, w, q, kv, lse, ks, ke, ctx.sm_scale, indices
        )
        return dq_idx, dk_idx, dw, None, None, None, None, None, None, None

    torch.library.register_autograd("glm5::indexer_kl_loss_fwd", _backward, setup_context=_setup_context)
