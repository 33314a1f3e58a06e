"""glm5.ops: the public kernel API, the only door to compiled code.

Every op has a plain-PyTorch reference in `glm5.ops.reference` (the specification); `set_impl`
switches all of them between the compiled kernels and the references.
"""

from . import reference
from ._dispatch import get_impl, set_impl, use_impl
from .indexer_loss import indexer_kl_loss
from .lightning_indexer import indexer_logits, indexer_topk
from .moe import (
    expert_load,
    grouped_gemm,
    grouped_gemm_wgrad,
    moe_experts,
    moe_permute,
    moe_route,
    moe_unpermute,
    sequence_balance_loss,
    update_router_bias,
)
from .sparse_attention import sparse_mla

# Every op in the TORCH_LIBRARY schema (csrc/glm5_ops.cpp); a test holds this list to the schema.
OP_NAMES = (
    "indexer_logits",
    "indexer_logits_bwd",
    "indexer_topk",
    "sparse_mla_fwd",
    "sparse_mla_bwd",
    "indexer_kl_loss_fwd",
    "indexer_kl_loss_bwd",
    "moe_route",
    "moe_permute",
    "moe_unpermute",
    "moe_unpermute_bwd",
    "grouped_gemm",
    "grouped_gemm_wgrad",
)

__all__ = [
    "reference",
    "get_impl",
    "set_impl",
    "use_impl",
    "indexer_logits",
    "indexer_topk",
    "sparse_mla",
    "indexer_kl_loss",
    "moe_route",
    "moe_permute",
    "moe_unpermute",
    "grouped_gemm",
    "grouped_gemm_wgrad",
    "moe_experts",
    "expert_load",
    "update_router_bias",
    "sequence_balance_loss",
]
