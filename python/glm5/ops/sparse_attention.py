"""Sparse MLA attention over the indexer's top-k keys (MQA / absorbed form, as FlashMLA's sparse kernels).

Precise semantics: see `glm5.ops.reference.sparse_mla`.
"""

from __future__ import annotations

import torch

import glm5

from . import reference
from ._dispatch import use_kernel


def sparse_mla(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query's heads over its selected latent keys.

    Args:
        q [T, H, D_qk]: queries (fp32 / bf16 / fp16 / fp64), D_qk = 576 in GLM-5.
        kv [S, D_qk]: latent keys shared by all heads, same dtype; the value is kv[:, :d_v].
        indices [T, K] int32: selected keys, -1 = empty slot; other values must be in [0, S).
        sm_scale: softmax scale. d_v: value width (512 in GLM-5).
    Returns:
        out [T, H, d_v] (q's dtype) and lse [T, H] fp32; a query with no valid index gets out = 0 and
        lse = +inf. Differentiable in q and kv (dkv is a scatter-add); lse carries no gradient.
    """
    if not use_kernel():
        return reference.sparse_mla(q, kv, indices, sm_scale, d_v)
    return torch.ops.glm5.sparse_mla_fwd(q, kv, indices, sm_scale, d_v)


if glm5.HAS_EXT:

    @torch.library.register_fake("glm5::sparse_mla_fwd")
    def _(q, kv, indices, sm_scale, d_v):
        torch._check(q.dim() == 3 and kv.dim() == 2 and indices.dim() == 2, lambda: "sparse_mla: bad ranks")
        T, H = q.shape[0], q.shape[1]
        return q.new_empty((T, H, d_v)), q.new_empty((T, H), dtype=reference.acc_dtype(q))

    @torch.library.register_fake("glm5::sparse_mla_bwd")
    def _(grad_out, q, kv, indices, out, lse, sm_scale, d_v):
        return torch.empty_like(q), torch.empty_like(kv)

    def _setup_context(ctx, inputs, output):
        q, kv, indices, sm_scale, d_v = inputs
        out, lse = output
        ctx.save_for_backward(q, kv, indices, out, lse)
        ctx.sm_scale, ctx.d_v = sm_scale, d_v

    def _backward(ctx, grad_out, _grad_lse):
        q, kv, indices, out, lse = ctx.saved_tensors
        dq, dkv = torch.ops.glm5.sparse_mla_bwd(grad_out.contiguous(), q, kv, indices, out, lse, ctx.sm_scale, ctx.d_v)
        return dq, dkv, None, None, None

    torch.library.register_autograd("glm5::sparse_mla_fwd", _backward, setup_context=_setup_context)
