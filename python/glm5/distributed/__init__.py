"""glm5.distributed: parallelism over torch.distributed process groups (Gloo on CPU, NCCL on GPU)."""

from .ep_layout import block_transpose_index, group_offsets, inverse_permutation, local_expert_range, shard_experts
from .expert_parallel import DispatchHandle, ExchangeBuffers, ExpertParallel, all_to_all_autograd

__all__ = [
    "ExpertParallel",
    "DispatchHandle",
    "ExchangeBuffers",
    "all_to_all_autograd",
    "block_transpose_index",
    "group_offsets",
    "inverse_permutation",
    "local_expert_range",
    "shard_experts",
]
