"""Expert parallelism: routed experts sharded over a process group, tokens exchanged all-to-all.

Each rank holds a contiguous slice of the experts (`ep_layout.local_expert_range`) and its own
tokens. A forward pass is dispatch -> local experts -> combine:

1. dispatch: `glm5.ops.moe_permute` sorts the rank's (token, slot) pairs by global expert, which also
   groups them by destination rank; the per-expert counts are exchanged with one small
   all_to_all_single; the rows follow with an uneven all_to_all_single; the received rows (grouped by
   source rank, then local expert) are regrouped by local expert (a block transpose).
2. local experts: two `glm5.ops.grouped_gemm` calls around SwiGLU over the contiguous groups.
3. combine: the inverse regroup, the reverse all_to_all_single, and `glm5.ops.moe_unpermute`, which
   sums each token's k expert outputs weighted by the router weights.

Autograd runs through both exchanges: the backward of an all-to-all is the all-to-all with input
and output splits swapped. The backend comes from the process group (Gloo on CPU, NCCL on GPU) and
the code is the same. With a world of one, no collective is issued. Expert weight gradients need no
extra reduction over the EP group: each rank's experts see every token routed to them.

Legend: N local tokens, k slots per token, D model width, F expert width, E global experts,
W ranks, El = E / W local experts, M rows received by this rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import glm5

from .ep_layout import block_transpose_index, group_offsets, inverse_permutation, local_expert_range, shard_experts

__all__ = ["ExpertParallel", "DispatchHandle", "ExchangeBuffers", "all_to_all_autograd"]


def _group_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(world size, rank) of `group`; (1, 0) when torch.distributed is not initialised."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, out=None) -> torch.Tensor:
    if out is None:
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 with uneven splits; the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, out):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _all_to_all(x, out_splits, in_splits, group, out)

    @staticmethod
    def backward(ctx, grad_out):
        return _all_to_all(grad_out, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None, None


def all_to_all_autograd(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Differentiable `dist.all_to_all_single` of the rows of x.

    Args:
        x [sum(in_splits), ...]: rows sent to rank r are x[sum(in_splits[:r]) : sum(in_splits[:r+1])].
        out_splits / in_splits: rows received from / sent to each rank of `group`.
        out: where to receive (x's dtype, [sum(out_splits), ...]); a new tensor when None. The
            backward always allocates.
    Returns:
        [sum(out_splits), ...]: the rows received from rank 0, then rank 1, ...
    """
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group, out)


class _Permute(torch.autograd.Function):
    """y = x[idx] for a permutation idx whose inverse inv is known; the backward is a gather too."""

    @staticmethod
    def forward(ctx, x, idx, inv, out):
        ctx.save_for_backward(inv)
        return x.index_select(0, idx) if out is None else torch.index_select(x, 0, idx, out=out)

    @staticmethod
    def backward(ctx, grad_out):
        (inv,) = ctx.saved_tensors
        return grad_out.index_select(0, inv), None, None, None


class ExchangeBuffers:
    """Scratch rows that the exchanges reuse from call to call and from layer to layer.

    Two tensors of a forward die inside it: the rows the dispatch receives (read once, by the
    regroup) and the rows the combine sends (written by the inverse regroup, read by the
    all-to-all). Nothing saves them for the backward, so one buffer per (role, device, dtype, row
    shape) can serve every ExpertParallel module of the process, which spares the allocator (on
    CPU: fresh pages, faulted in on every call) two buffers of M rows per layer. Not thread-safe;
    `clear()` frees the memory; enabled=False allocates afresh on every call.
    """

    def __init__(self, enabled: bool = True, headroom: float = 1.125):
        self.enabled, self.headroom = enabled, headroom
        self._bufs: dict[tuple, torch.Tensor] = {}

    def rows(self, role: str, n: int, like: torch.Tensor) -> torch.Tensor | None:
        """[n, *like.shape[1:]] rows of the `role` buffer (None when disabled)."""
        if not self.enabled:
            return None
        key = (role, like.device, like.dtype, tuple(like.shape[1:]))
        buf = self._bufs.get(key)
        if buf is None or buf.shape[0] < n:
            self._bufs.pop(key, None)  # free the old one before allocating the larger one
            buf = self._bufs[key] = like.new_empty((int(n * self.headroom) + 1, *like.shape[1:]))
        return buf[:n]

    def clear(self) -> None:
        self._bufs.clear()


_SHARED_BUFFERS = ExchangeBuffers()


@dataclass
class DispatchHandle:
    """What `combine` needs to undo a `dispatch`.

    row_map [N, k] int32: row of (token n, slot k) in the expert-sorted send buffer (moe_permute).
    send_splits / recv_splits: rows sent to / received from each rank.
    regroup / ungroup [M] int64: gather indices (source, expert) -> (expert, source) and back;
        None when that is the identity (a world of one, or one expert per rank).
    """

    row_map: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    regroup: torch.Tensor | None
    ungroup: torch.Tensor | None


class ExpertParallel(nn.Module):
    """The routed SwiGLU experts of one MoE layer, sharded over an expert-parallel process group.

    Parameters (the local shard): w_gate_up [El, 2F, D] (gate = first F rows, up = next F) and
    w_down [El, D, F], in the Hugging Face glm_moe_dsa layout of moe_experts.

    forward(x [N, D], topk_idx [N, k] int32 global expert ids (-1: a dropped slot), topk_w [N, k]
    fp32) -> [N, D] equals
    `glm5.ops.moe_experts(x, topk_idx, topk_w, w_gate_up_full, w_down_full)` on this rank's tokens,
    with every rank calling forward (collectively) on its own tokens; N may differ between ranks and
    may be 0. The backward is collective too: every rank runs it, and x.requires_grad must be the
    same on every rank. `buffers` (default: one ExchangeBuffers shared by the whole process) holds
    the scratch rows of the exchanges.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        ffn_dim: int,
        group: dist.ProcessGroup | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        buffers: ExchangeBuffers | None = None,
    ):
        super().__init__()
        self.group = group
        self.buffers = _SHARED_BUFFERS if buffers is None else buffers
        self.world_size, self.rank = _group_size_rank(group)
        self.num_experts, self.dim, self.ffn_dim = num_experts, dim, ffn_dim
        self.expert_start, self.expert_end = local_expert_range(num_experts, self.world_size, self.rank)
        n_local = self.expert_end - self.expert_start
        kw = {"device": device, "dtype": dtype}
        self.w_gate_up = nn.Parameter(torch.empty(n_local, 2 * ffn_dim, dim, **kw))
        self.w_down = nn.Parameter(torch.empty(n_local, dim, ffn_dim, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.w_gate_up, self.w_down):
            nn.init.normal_(w, std=w.shape[-1] ** -0.5)

    @property
    def num_local_experts(self) -> int:
        return self.expert_end - self.expert_start

    @classmethod
    def from_full_weights(
        cls,
        w_gate_up: torch.Tensor,
        w_down: torch.Tensor,
        group: dist.ProcessGroup | None = None,
        *,
        buffers: ExchangeBuffers | None = None,
    ) -> ExpertParallel:
        """A module holding this rank's shard of the full weights w_gate_up [E, 2F, D], w_down [E, D, F]."""
        E, two_f, D = w_gate_up.shape
        module = cls(E, D, two_f // 2, group, device=w_gate_up.device, dtype=w_gate_up.dtype, buffers=buffers)
        module.load_full_weights(w_gate_up, w_down)
        return module

    @torch.no_grad()
    def load_full_weights(self, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> None:
        """Copy this rank's experts out of the full weights w_gate_up [E, 2F, D] and w_down [E, D, F]."""
        E, F_, D = self.num_experts, self.ffn_dim, self.dim
        if tuple(w_gate_up.shape) != (E, 2 * F_, D):
            raise ValueError(f"w_gate_up must be [{E}, {2 * F_}, {D}], got {tuple(w_gate_up.shape)}")
        if tuple(w_down.shape) != (E, D, F_):
            raise ValueError(f"w_down must be [{E}, {D}, {F_}], got {tuple(w_down.shape)}")
        self.w_gate_up.copy_(shard_experts(w_gate_up, self.world_size, self.rank))
        self.w_down.copy_(shard_experts(w_down, self.world_size, self.rank))

    # ---- dispatch / experts / combine -------------------------------------------------------------

    def _check_inputs(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor | None) -> None:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be [N, {self.dim}], got {tuple(x.shape)}")
        if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
            raise ValueError(f"topk_idx must be [N={x.shape[0]}, k], got {tuple(topk_idx.shape)}")
        if topk_w is not None and topk_w.shape != topk_idx.shape:
            raise ValueError(f"topk_w must have topk_idx's shape {tuple(topk_idx.shape)}, got {tuple(topk_w.shape)}")

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        """Send each (token, slot) row to the rank owning its expert.

        Returns x_local [M, D] grouped by local expert (then by source rank), offsets [El + 1] int64
        of those groups (the grouped GEMM's layout; rows from offsets[El] on, if any, are zero
        padding), and the handle `combine` needs.
        """
        self._check_inputs(x, topk_idx, None)
        x_sorted, row_map, offsets = glm5.ops.moe_permute(x, topk_idx, self.num_experts)
        if self.world_size == 1:
            n = x_sorted.shape[0]
            return x_sorted, offsets, DispatchHandle(row_map, [n], [n], None, None)
        W, El = self.world_size, self.num_local_experts
        send_counts = offsets.diff().view(W, El)  # rows for each (destination rank, its local expert)
        recv_counts = torch.empty_like(send_counts)  # rows from each (source rank, my local expert)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits, recv_splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()  # one sync
        n_send = sum(send_splits)  # dropped slots (expert -1) sort last and are not sent
        send = x_sorted if n_send == x_sorted.shape[0] else x_sorted[:n_send]  # (a slice costs a backward copy)
        if El == 1:  # one expert per rank: rows grouped by source are already grouped by expert
            x_recv = all_to_all_autograd(send, recv_splits, send_splits, self.group)
            return x_recv, group_offsets(recv_counts), DispatchHandle(row_map, send_splits, recv_splits, None, None)
        M = sum(recv_splits)
        x_recv = all_to_all_autograd(send, recv_splits, send_splits, self.group, out=self.buffers.rows("recv", M, x))
        regroup = block_transpose_index(recv_counts, M)
        ungroup = inverse_permutation(regroup)
        x_local = _Permute.apply(x_recv, regroup, ungroup, None)
        return x_local, group_offsets(recv_counts), DispatchHandle(row_map, send_splits, recv_splits, regroup, ungroup)

    def experts(self, x_local: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """SwiGLU of each local expert over its row group: [M, D] -> [M, D]."""
        gate_up = glm5.ops.grouped_gemm(x_local, self.w_gate_up, offsets)
        gate, up = gate_up.split(self.ffn_dim, dim=-1)
        y_local = glm5.ops.grouped_gemm(F.silu(gate) * up, self.w_down, offsets)
        if x_local.shape[0] == 0 and torch.is_grad_enabled():
            # The backward exchanges are collectives, so a rank that received nothing must still run
            # them: keep its (empty) graph connected to x_local and give its experts zero gradients,
            # whatever an implementation of grouped_gemm does with zero rows.
            y_local = y_local + (x_local.sum() + self.w_gate_up[:0].sum() + self.w_down[:0].sum())
        return y_local

    def combine(self, y_local: torch.Tensor, handle: DispatchHandle, topk_w: torch.Tensor) -> torch.Tensor:
        """Return the expert outputs to their tokens' ranks and sum them weighted by topk_w: -> [N, D]."""
        if handle.ungroup is None:
            y_recv = y_local
        else:
            send = self.buffers.rows("send", y_local.shape[0], y_local)
            y_recv = _Permute.apply(y_local, handle.ungroup, handle.regroup, send)
        if self.world_size == 1:
            y_sorted = y_recv
        else:
            y_sorted = all_to_all_autograd(y_recv, handle.send_splits, handle.recv_splits, self.group)
        return glm5.ops.moe_unpermute(y_sorted, handle.row_map, topk_w)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        self._check_inputs(x, topk_idx, topk_w)
        x_local, offsets, handle = self.dispatch(x, topk_idx)
        return self.combine(self.experts(x_local, offsets), handle, topk_w)

    def extra_repr(self) -> str:
        return (
            f"experts [{self.expert_start}, {self.expert_end}) of {self.num_experts}, dim={self.dim}, "
            f"ffn_dim={self.ffn_dim}, rank {self.rank} of {self.world_size}"
        )
