"""Layout arithmetic of expert parallelism: pure tensor functions, no communication.

Experts are sharded contiguously: with E experts over W ranks, rank r holds experts
[r * E/W, (r+1) * E/W), so that the local expert l of rank r is the global expert r * E/W + l.

After the token exchange a rank holds its received rows grouped by source rank, then by local
expert (each source sends its rows sorted by global expert). The grouped GEMM needs them grouped by
local expert, then by source rank. That regrouping is a block transpose of a [W, E_local] grid of
row blocks, and its inverse is the block transpose of the transposed grid (`block_transpose_index`).

Legend: W ranks, E global experts, El = E / W local experts, M received rows.
"""

from __future__ import annotations

import torch

__all__ = ["local_expert_range", "shard_experts", "block_transpose_index", "inverse_permutation", "group_offsets"]


def local_expert_range(num_experts: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of the global experts that `rank` holds."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if num_experts < 1 or num_experts % world_size:
        raise ValueError(f"num_experts ({num_experts}) must be a positive multiple of world_size ({world_size})")
    per_rank = num_experts // world_size
    return rank * per_rank, (rank + 1) * per_rank


def shard_experts(w_full: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """The local shard [E/W, ...] of a full per-expert weight [E, ...] (a view, not a copy)."""
    start, end = local_expert_range(w_full.shape[0], world_size, rank)
    return w_full[start:end]


def block_transpose_index(counts_AB: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Gather index that reorders row blocks from (a, b) order to (b, a) order.

    Args:
        counts_AB [A, B] integer: rows arrive as A*B contiguous blocks in row-major (a, b) order,
            block (a, b) holding counts_AB[a, b] rows.
        total: sum of counts_AB when the caller already knows it (saves a device-to-host sync).
    Returns:
        idx [M] int64 with M = counts_AB.sum(): rows[idx] lists the same blocks in (b, a) order, each
        block's rows in their original order. The inverse permutation is
        block_transpose_index(counts_AB.t()).
    """
    if counts_AB.dim() != 2:
        raise ValueError(f"counts_AB must be 2-D [A, B], got shape {tuple(counts_AB.shape)}")
    c = counts_AB.long()
    flat_src = c.reshape(-1)
    src_start = (torch.cumsum(flat_src, 0) - flat_src).view_as(c)  # start of block (a, b) in (a, b) order
    c_t = c.t().reshape(-1)  # block sizes in (b, a) order
    dst_start = torch.cumsum(c_t, 0) - c_t
    if total is None:
        total = int(flat_src.sum())
    block = torch.repeat_interleave(torch.arange(c_t.numel(), device=c.device), c_t, output_size=total)
    within = torch.arange(total, device=c.device) - dst_start[block]
    return src_start.t().reshape(-1)[block] + within


def inverse_permutation(idx: torch.Tensor) -> torch.Tensor:
    """inv [M] int64 with inv[idx[i]] = i, for a permutation idx [M] of 0..M-1."""
    return torch.empty_like(idx).scatter_(0, idx, torch.arange(idx.numel(), device=idx.device, dtype=idx.dtype))


def group_offsets(counts_WL: torch.Tensor) -> torch.Tensor:
    """[El + 1] int64 offsets of the local experts' row groups, from counts [W, El] per source rank."""
    per_expert = counts_WL.long().sum(0)
    return torch.cat([per_expert.new_zeros(1), torch.cumsum(per_expert, 0)])
