"""Expert parallelism (glm5.distributed), tested at two levels (STYLE.md practice 18):

1. the layout functions, single-process, against naive Python loops;
2. ExpertParallel under torch.multiprocessing.spawn with 2 and 4 Gloo/CPU ranks (one spawn per world
   size, all cases batched into it), output and gradients against single-process
   glm5.ops.moe_experts on the same full inputs; the world of one, in this process; and, on a
   machine with 2 GPUs, the same cases over NCCL.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _ep_workers import Case, check_dispatch, compare, expert_parallel, make_inputs, reference, worker

from glm5.distributed import (
    ExpertParallel,
    all_to_all_autograd,
    block_transpose_index,
    group_offsets,
    inverse_permutation,
    local_expert_range,
    shard_experts,
)

# ---- layout functions ------------------------------------------------------------------------------


@dataclass
class Grid:
    name: str
    counts: list[list[int]]  # [A, B] block sizes, blocks arriving in (a, b) order

    def __str__(self) -> str:
        return self.name


GRIDS = [
    Grid("1x1", [[3]]),
    Grid("1x3", [[2, 0, 1]]),  # a world of one: the identity
    Grid("2x2", [[1, 2], [3, 4]]),
    Grid("2x3-zero-blocks", [[0, 2, 0], [1, 0, 3]]),  # experts with no rows from some ranks
    Grid("3x2-zero-row", [[2, 1], [0, 0], [1, 4]]),  # a source rank that sent nothing
    Grid("4x2-all-empty", [[0, 0]] * 4),  # nothing received at all
    Grid("4x3-uneven", [[0, 0, 9], [0, 0, 0], [5, 0, 0], [1, 1, 1]]),
]


def naive_block_transpose(counts: list[list[int]]) -> list[int]:
    starts, pos = {}, 0
    for a, row in enumerate(counts):
        for b, c in enumerate(row):
            starts[a, b] = pos
            pos += c
    return [starts[a, b] + i for b in range(len(counts[0])) for a in range(len(counts)) for i in range(counts[a][b])]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_block_transpose_matches_naive(grid):
    idx = block_transpose_index(torch.tensor(grid.counts))
    assert idx.dtype == torch.int64
    assert idx.tolist() == naive_block_transpose(grid.counts)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_block_transpose_inverse(grid):
    c = torch.tensor(grid.counts)
    total = int(c.sum())
    idx, inv = block_transpose_index(c, total), block_transpose_index(c.t(), total)
    assert torch.equal(idx[inv], torch.arange(total))
    assert torch.equal(inv[idx], torch.arange(total))
    assert torch.equal(inverse_permutation(idx), inv)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_group_offsets(grid):
    per_expert = [sum(col) for col in zip(*grid.counts)]
    expected = [sum(per_expert[:i]) for i in range(len(per_expert) + 1)]
    assert group_offsets(torch.tensor(grid.counts)).tolist() == expected


def test_block_transpose_rejects_1d():
    with pytest.raises(ValueError, match="counts_AB"):
        block_transpose_index(torch.tensor([1, 2]))


@pytest.mark.parametrize(("E", "W"), [(1, 1), (8, 1), (8, 2), (8, 4), (256, 32)])
def test_local_expert_range_tiles_experts(E, W):
    ranges = [local_expert_range(E, W, r) for r in range(W)]
    assert [e for lo, hi in ranges for e in range(lo, hi)] == list(range(E))
    assert len({hi - lo for lo, hi in ranges}) == 1


@pytest.mark.parametrize(("E", "W", "r", "match"), [(6, 4, 0, "num_experts"), (0, 1, 0, "num_experts"), (8, 2, 2, "rank"), (8, 0, 0, "rank")])
def test_local_expert_range_errors(E, W, r, match):
    with pytest.raises(ValueError, match=match):
        local_expert_range(E, W, r)


def test_shard_experts():
    w = torch.arange(8 * 3).view(8, 3)
    assert torch.equal(shard_experts(w, 4, 2), w[4:6])
    assert torch.equal(shard_experts(w, 1, 0), w)


# ---- a world of one, in this process -------------------------------------------------------------

ONE = [
    Case("random", (9,), experts=4, topk=2),
    Case("hot", (5,), experts=6, topk=3, routing="hot"),  # experts 3..5 get no tokens
    Case("no-tokens", (0,), experts=4, topk=2),
    Case("dropped-slots", (8,), experts=4, topk=2, routing="dropped"),
]


@pytest.mark.parametrize("case", ONE, ids=str)
def test_world_of_one_without_process_group(case):
    assert not dist.is_initialized()
    inp = make_inputs(case)
    compare(case, expert_parallel(case, inp), reference(case, inp))
    check_dispatch(case, inp)()


def test_world_of_one_gloo_group(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1, timeout=datetime.timedelta(seconds=30)
    )
    try:
        for case in ONE:
            inp = make_inputs(case)
            compare(case, expert_parallel(case, inp), reference(case, inp))
        # the exchange itself with a world of one: identity, and its backward too
        x = torch.randn(4, 3, requires_grad=True)
        y = all_to_all_autograd(x, [4], [4])
        y.backward(torch.ones_like(y))
        assert torch.equal(y, x) and torch.equal(x.grad, torch.ones_like(x))
    finally:
        dist.destroy_process_group()


# ---- 2 and 4 Gloo ranks under spawn (one spawn per world size) -----------------------------------

SPAWN_CASES = {
    2: [
        Case("random", (5, 7), experts=4, topk=2),
        Case("rank0-no-tokens", (0, 6), experts=4, topk=2),
        Case("all-to-rank0", (4, 3), experts=4, topk=2, routing="hot"),  # rank 1 receives nothing
        Case("all-to-last-rank", (3, 5), experts=6, topk=2, routing="last_rank"),  # rank 0 receives nothing
        Case("top1", (6, 2), experts=8, topk=1),
        Case("dropped-slots", (7, 5), experts=4, topk=3, routing="dropped"),
        Case("one-expert-per-rank", (3, 4), experts=2, topk=2),
        Case("no-tokens-anywhere", (0, 0), experts=4, topk=2),
        Case("bf16", (9, 4), experts=4, topk=2, dtype=torch.bfloat16),
    ],
    4: [
        Case("random", (3, 5, 0, 7), experts=8, topk=3),
        Case("all-to-one-expert-pair", (4, 4, 4, 4), experts=8, topk=2, routing="hot"),  # ranks 1-3 idle
        Case("all-to-last-rank", (2, 0, 5, 1), experts=8, topk=2, routing="last_rank"),
        Case("every-expert", (2, 3, 1, 0), experts=4, topk=4),
        Case("dropped-slots", (4, 6, 3, 5), experts=8, topk=2, routing="dropped"),
        Case("bf16", (6, 6, 6, 6), experts=8, topk=2, dtype=torch.bfloat16),
    ],
}


@pytest.mark.parametrize("world", sorted(SPAWN_CASES))
def test_gloo_ranks_match_moe_experts(world, tmp_path):
    mp.spawn(worker, args=(world, str(tmp_path / "store"), SPAWN_CASES[world]), nprocs=world, join=True)


@pytest.mark.cuda
def test_nccl_ranks_match_moe_experts(tmp_path):
    """The same cases over NCCL, one GPU per rank (skipped with fewer than 2 GPUs)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs (NCCL runs one rank per GPU)")
    mp.spawn(worker, args=(2, str(tmp_path / "store"), SPAWN_CASES[2], "nccl"), nprocs=2, join=True)


# ---- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    ep = ExpertParallel(4, 8, 6)
    x, idx, w = torch.randn(3, 8), torch.zeros(3, 2, dtype=torch.int32), torch.rand(3, 2)
    with pytest.raises(ValueError, match="x must be"):
        ep(torch.randn(3, 7), idx, w)
    with pytest.raises(ValueError, match="topk_idx"):
        ep(x, idx[:2], w)
    with pytest.raises(ValueError, match="topk_w"):
        ep(x, idx, w[:, :1])
    with pytest.raises(ValueError, match="w_gate_up"):
        ep.load_full_weights(torch.randn(4, 12, 7), torch.randn(4, 8, 6))
    with pytest.raises(ValueError, match="w_down"):
        ep.load_full_weights(torch.randn(4, 12, 8), torch.randn(3, 8, 6))
