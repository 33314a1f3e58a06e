"""The MoE CUDA kernels (csrc/cuda/moe) on the CPU simulator, against the references.

The launches mirror api.cu (sim_moe.cpp): moe_route, moe_permute's four kernels, moe_unpermute and its
backward, and the SIMT grouped GEMMs with their device-built group layout. The CUTLASS grouped GEMMs
cannot be simulated, but the kernels that build their arguments on the device can
(sim_moe_cutlass_args.cpp): their shapes, pointers and strides are checked against what the offsets
imply, then a GEMM emulated from those arrays alone must give the reference's result.

Cases are tests/ops' (test_moe.py, test_moe_route.py, test_cuda_moe.py), the larger GPU cases cut down
where the simulator would be slow (every CUDA thread is a simulated thread). Integer outputs are
compared exactly, float outputs with the CUDA tests' rule (FA3's: twice the reference's own error at
the input precision plus a rounding floor, against fp64; calc_diff for the GEMMs). "Run twice" checks
are weak here (the simulator's schedule is seeded), but they catch reads of unwritten memory: every
output api.cu allocates with at::empty starts as 0xff bytes.
"""

from __future__ import annotations

import pytest
import torch

from glm5.ops import reference
from numerics import assert_close_to_ref, calc_diff
from sim_build import load_sim, reseeded
from test_cuda_moe import GPU_GEMM_CASES, GPU_PERM_CASES, GPU_ROUTE_CASES, WGRAD_CASES
from test_moe import DTYPES, GEMM_CASES, PERM_CASES, GemmCase, PermCase, dname, gemm_inputs, make_topk, perm_inputs
from test_moe_route import CASES as ROUTE_CASES
from test_moe_route import Case as RouteCase
from test_moe_route import make_inputs as route_inputs
from test_moe_route import route_kwargs
from test_sparse_mla import floor as mla_floor

ROUTE_SMEM = 48 * 1024  # api.cu's bound on the router's group scores per block
COUNTER_SMEM = 32 * 1024  # api.cu's bound on moe_permute's per-chunk counters in shared memory


@pytest.fixture(scope="module")
def sim():
    return load_sim("glm5_cuda_sim_moe", "sim_moe.cpp")


@pytest.fixture(scope="module")
def sim_args():
    return load_sim("glm5_cuda_sim_moe_cutlass_args", "sim_moe_cutlass_args.cpp", cutlass=True)


def gemm_tols(out, truth, lowp, K):
    """test_cuda_moe's rule, except fp64 (whose truth is itself a rounded fp64 sum): test_sparse_mla's K-term floor.

    test_cuda_moe's 4-eps floor for fp64 is tighter than two fp64 summation orders agree (seen here at
    K = 100 and with 515 rows), so it would fail on a GPU too.
    """
    floor = mla_floor(truth, torch.float64, K) if out.dtype == torch.float64 else None
    assert_close_to_ref(out, truth, lowp, floor=floor)
    assert calc_diff(out, truth) < 1e-5


# ---- moe_route ---------------------------------------------------------------------------------

# test_cuda_moe's GPU cases, the first cut from 2000 tokens to 203 (51 blocks, the last one partial).
SIM_ROUTE_CASES = [
    RouteCase(N=203, E=256, topk=8, scale=2.5),
    *GPU_ROUTE_CASES[1:],  # 8 groups with ties; 48 groups, more than a warp's lanes
    RouteCase(N=10, E=24, topk=4, dtype=torch.float16),
    RouteCase(N=9, E=20, topk=20, n_group=5, topk_group=5, dtype=torch.float16),  # every expert, every group
]


def route(sim, case: RouteCase, logits, bias, smem: int = ROUTE_SMEM):
    kw = route_kwargs(case)
    return sim.moe_route(logits, bias, case.topk, kw["n_group"], kw["topk_group"], kw["norm_topk_prob"],
                         kw["routed_scaling_factor"], smem)


def choose(choice: torch.Tensor, topk: int, n_group: int, topk_group: int) -> torch.Tensor:
    """reference.moe_route's selection, restated on given biased scores (checked against it below)."""
    N, E = choice.shape
    if n_group > 1:
        gs = E // n_group
        group_scores = choice.view(N, n_group, gs).topk(min(2, gs), dim=-1).values.sum(dim=-1)
        keep = torch.sort(group_scores, dim=1, descending=True, stable=True).indices[:, :topk_group]
        kept = torch.zeros(N, n_group, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~kept.repeat_interleave(gs, dim=1), float("-inf"))
    return torch.sort(choice, dim=1, descending=True, stable=True).indices[:, :topk].int()


def check_route(sim, case: RouteCase, logits, bias, idx, w) -> None:
    """idx: exactly the reference's choice on the kernel's own scores; w: the fp64 weights of idx."""
    kw = route_kwargs(case)
    acc = reference.acc_dtype(logits)
    assert idx.dtype == torch.int32 and w.dtype == acc and idx.shape == w.shape == (case.N, case.topk)
    # The kernel's sigmoid (1 / (1 + exp(-x)), as ATen's CUDA sigmoid) and ATen's CPU sigmoid may differ
    # by an ulp, so the exact choice is the reference's selection applied to the kernel's scores.
    scores = sim.route_scores(logits)
    assert scores.dtype == acc
    assert_close_to_ref(scores, logits.double().sigmoid(), name="scores")
    ref_idx, _ = reference.moe_route(logits, bias, case.topk, **kw)
    torch_choice = logits.to(acc).sigmoid() + (0 if bias is None else bias.to(acc))
    restated = choose(torch_choice, case.topk, case.n_group, case.topk_group)
    assert torch.equal(restated, ref_idx), "choose() restates the reference"
    expect = choose(scores + (0 if bias is None else bias.to(acc)), case.topk, case.n_group, case.topk_group)
    assert torch.equal(idx, expect), f"choice differs in rows {(idx != expect).any(1).nonzero().flatten().tolist()}"
    s = logits.double().sigmoid().gather(1, idx.long())
    if case.norm:
        s = s / (s.sum(dim=-1, keepdim=True) + reference.ROUTE_NORM_EPS)
    assert_close_to_ref(w, s * case.scale, name="topk_w")


@pytest.mark.parametrize("case", ROUTE_CASES + SIM_ROUTE_CASES, ids=str)
def test_route_matches_reference(sim, case):
    logits, bias = route_inputs(case)
    idx, w, warps = route(sim, case, logits, bias)
    assert warps == 4
    check_route(sim, case, logits, bias, idx, w)


@pytest.mark.parametrize("case", [ROUTE_CASES[5], ROUTE_CASES[12], SIM_ROUTE_CASES[2]], ids=str)
def test_route_one_warp_per_block(sim, case):
    # group scores beyond the shared-memory bound: api.cu drops to one warp (one token) per block
    logits, bias = route_inputs(case)
    idx4, w4, _ = route(sim, case, logits, bias)
    idx1, w1, warps = route(sim, case, logits, bias, smem=4 * case.n_group * 4 - 1)
    assert warps == 1 and torch.equal(idx1, idx4) and torch.equal(w1, w4)
    with pytest.raises(ValueError, match="n_group"):
        route(sim, case, logits, bias, smem=case.n_group * 4 - 1)


def test_route_ties_and_groups(sim):
    case = RouteCase(N=3, E=8, topk=3, bias=False)
    idx, w, _ = route(sim, case, torch.zeros(3, 8), None)
    assert idx.tolist() == [[0, 1, 2]] * 3 and torch.equal(w, torch.full((3, 3), 1 / 3))
    bias = torch.zeros(8)
    bias[6] = 0.25
    idx, w, _ = route(sim, case, torch.zeros(3, 8), bias)
    assert idx.tolist() == [[6, 0, 1]] * 3 and torch.equal(w, torch.full((3, 3), 1 / 3))
    idx, _, _ = route(sim, RouteCase(N=2, E=8, topk=4, n_group=4, topk_group=2), torch.zeros(2, 8), None)
    assert idx.tolist() == [[0, 1, 2, 3]] * 2
    logits = torch.tensor([[0.0, 1.2, 1.2, 0.0, 0.0, 0.0, -5.0, 3.0]])
    assert route(sim, RouteCase(N=1, E=8, topk=2, n_group=2, topk_group=1), logits, None)[0].tolist() == [[1, 2]]
    assert route(sim, RouteCase(N=1, E=8, topk=2), logits, None)[0].tolist() == [[7, 1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dname)
def test_route_nan_rows(sim, dtype):
    # Without GLM5_CUDA_VALIDATE nothing raises: a NaN row gets expert 0 with weight 0 (the CPU kernel's
    # values before it raises), every other row its normal choice.
    case = RouteCase(N=9, E=64, topk=6, n_group=8, topk_group=3, scale=2.5, dtype=dtype)
    logits, bias = route_inputs(case)
    clean = route(sim, case, logits, bias)
    bad = logits.clone()
    bad[2, 5] = float("nan")
    bad[7, 63] = float("nan")
    idx, w, _ = route(sim, case, bad, bias)
    nan = torch.tensor([r in (2, 7) for r in range(case.N)])
    assert not idx[nan].any() and not w[nan].any()
    assert torch.equal(idx[~nan], clean[0][~nan]) and torch.equal(w[~nan], clean[1][~nan])
    nan_bias = bias.clone()
    nan_bias[11] = float("nan")
    idx, w, _ = route(sim, case, logits, nan_bias)
    assert not idx.any() and not w.any()


def test_route_empty_and_deterministic(sim):
    case = SIM_ROUTE_CASES[0]
    idx, w, _ = route(sim, case, torch.zeros(0, case.E), None)
    assert idx.shape == w.shape == (0, case.topk)
    logits, bias = route_inputs(case)
    a, b = route(sim, case, logits, bias), route(sim, case, logits, bias)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---- moe_permute -------------------------------------------------------------------------------

# test_cuda_moe's GPU cases (several 1024-slot chunks, E > 512 for several scan rounds, E > 8192 for
# counters in global memory), plus one with k > 1 and no padding over two chunks.
SIM_PERM_CASES = GPU_PERM_CASES + [PermCase(N=300, E=40, k=4, D=24, alignment=16, load="dropped")]


def copy_width(row_bytes: int) -> int:
    """The row copy's vector width: torch's CPU allocations are 64-byte aligned, so row_bytes decides."""
    return next(a for a in (16, 8, 4, 2, 1) if row_bytes % a == 0) if row_bytes else 0


def check_permute(out, x, idx, E, alignment, vec=None):
    x_sorted, row_map, offsets, counts, width = out
    ref = reference.moe_permute(x, idx, E, alignment)
    for name, a, b in zip(("x_sorted", "row_map", "offsets"), (x_sorted, row_map, offsets), ref):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    valid = idx[idx >= 0].long()
    assert torch.equal(counts, torch.bincount(valid, minlength=E)), "counts"
    if vec is not None:
        assert width == vec, f"copy width {width}, expected {vec}"


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("case", PERM_CASES + SIM_PERM_CASES, ids=str)
def test_permute_matches_reference(sim, case, dtype):
    x, idx = perm_inputs(case, dtype)
    out = sim.moe_permute(x, idx, case.E, case.alignment, COUNTER_SMEM)
    rows = case.N * case.k + case.E * (case.alignment - 1)
    check_permute(out, x, idx, case.E, case.alignment, copy_width(case.D * x.element_size()) if rows else 0)


@pytest.mark.parametrize("case", [PERM_CASES[1], PERM_CASES[6], PERM_CASES[10], SIM_PERM_CASES[3]], ids=str)
def test_permute_counters_in_global_memory(sim, case):
    # api.cu keeps the per-chunk counters in chunk_counts when E * 4 bytes exceed 32 KiB
    x, idx = perm_inputs(case, torch.float32)
    check_permute(sim.moe_permute(x, idx, case.E, case.alignment, 0), x, idx, case.E, case.alignment)


@pytest.mark.parametrize("shift", [1, 2, 4], ids=lambda s: f"shift{s}")
def test_permute_unaligned_rows(sim, shift):
    # x's base 2, 4 or 8 bytes off 16: the copy narrows to what both bases and the row length allow
    case = PermCase(N=37, E=13, k=3, D=8, alignment=8)
    x, idx = perm_inputs(case, torch.bfloat16)
    buf = torch.empty(x.numel() + shift, dtype=x.dtype)
    xs = buf[shift:].view(case.N, case.D)
    xs.copy_(x)
    assert xs.is_contiguous() and xs.data_ptr() % 16 == 2 * shift
    check_permute(sim.moe_permute(xs, idx, case.E, case.alignment, COUNTER_SMEM), x, idx, case.E, case.alignment,
                  vec=2 * shift)


def test_permute_invalid_experts_are_dropped(sim):
    # without GLM5_CUDA_VALIDATE an expert outside [0, E) counts as a dropped slot (memory-safe)
    case = PermCase(N=40, E=6, k=3, D=5, alignment=4)
    x, idx = perm_inputs(case)
    bad = idx.clone()
    bad[0, 1], bad[5, 0], bad[17, 2], bad[39, 0] = 6, -5, 1 << 30, -(1 << 31)
    dropped = bad.clone()
    dropped[(bad < 0) | (bad >= case.E)] = -1
    check_permute(sim.moe_permute(x, bad, case.E, case.alignment, COUNTER_SMEM), x, dropped, case.E, case.alignment)


def test_permute_deterministic(sim):
    case = SIM_PERM_CASES[0]
    x, idx = perm_inputs(case, torch.bfloat16)
    a = sim.moe_permute(x, idx, case.E, case.alignment, COUNTER_SMEM)
    with reseeded(7):  # the simulated threads in another order
        b = sim.moe_permute(x, idx, case.E, case.alignment, COUNTER_SMEM)
    assert all(torch.equal(s, t) for s, t in zip(a[:4], b[:4]))


# ---- moe_unpermute and its backward ------------------------------------------------------------


def unpermute_grads(fn, y, row_map, w, g):
    y, w = y.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    out = fn(y, row_map, w)
    if out.numel() == 0:
        return out.detach(), torch.zeros_like(y), torch.zeros_like(w)
    return (out.detach(), *torch.autograd.grad(out, (y, w), g))


# The backward runs 256 threads with 9 barriers per slot: full case list in fp32, fewer for the rest.
UNPERMUTE_CASES = [(c, torch.float32) for c in PERM_CASES] + [
    (c, dt) for dt in DTYPES[1:] for c in (PERM_CASES[1], PERM_CASES[3], PERM_CASES[6], PERM_CASES[7], PERM_CASES[10])
]


def case_id(v) -> str:
    return dname(v) if isinstance(v, torch.dtype) else str(v)


@pytest.mark.parametrize("case, dtype", UNPERMUTE_CASES, ids=case_id)
def test_unpermute_fwd_bwd_matches_reference(sim, case, dtype):
    x, idx = perm_inputs(case)
    gen = torch.Generator().manual_seed(3)
    _, row_map, _ = reference.moe_permute(x, idx, case.E, case.alignment)
    M = case.N * case.k + case.E * (case.alignment - 1)
    y = torch.randn(M, case.D, generator=gen).to(dtype)
    w = torch.rand(case.N, case.k, generator=gen)
    g = torch.randn(case.N, case.D, generator=gen).to(dtype)
    out = sim.moe_unpermute(y, row_map, w)
    dy, dw = sim.moe_unpermute_bwd(g, y, row_map, w)
    assert out.dtype == dtype and dy.dtype == dtype and dw.dtype == w.dtype
    truth = unpermute_grads(reference.moe_unpermute, y.double(), row_map, w.double(), g.double())
    lowp = unpermute_grads(reference.moe_unpermute, y, row_map, w, g) if dtype != torch.float64 else (None,) * 3
    for name, a, t, lp in zip(("out", "dy", "dtopk_w"), (out, dy, dw), truth, lowp):
        assert_close_to_ref(a, t, lp, name=f"{name} {dname(dtype)}")
    untouched = torch.ones(M, dtype=torch.bool)
    untouched[row_map[row_map >= 0].long()] = False
    assert not dy[untouched].any(), "rows no slot points at get a zero gradient"


def test_permute_unpermute_exact_integers(sim):
    # integer rows and weights: every sum is exact, so the round trip is exact
    gen = torch.Generator().manual_seed(0)
    case = PermCase(N=120, E=11, k=3, D=6, alignment=8, load="dropped")
    idx = make_topk(case.N, case.E, case.k, case.load, gen)
    x = torch.randint(-8, 9, (case.N, case.D), generator=gen).float()
    w = torch.randint(-3, 4, (case.N, case.k), generator=gen).float()
    x_sorted, row_map, _, _, _ = sim.moe_permute(x, idx, case.E, case.alignment, COUNTER_SMEM)
    assert torch.equal(sim.moe_unpermute(x_sorted, row_map, w), (w * (idx >= 0)).sum(1, keepdim=True) * x)
    # backward with unit weights: dy is grad scattered to each slot's row, dw the dot products
    g = torch.randint(-2, 3, (case.N, case.D), generator=gen).float()
    dy, dw = sim.moe_unpermute_bwd(g, x_sorted, row_map, torch.ones(case.N, case.k))
    valid = row_map >= 0
    assert torch.equal(dy[row_map[valid].long()], g[:, None].expand(-1, case.k, -1)[valid])
    assert torch.equal(dw, torch.where(valid, (g * x).sum(1, keepdim=True), 0.0))


def test_unpermute_invalid_rows_are_skipped(sim):
    # without GLM5_CUDA_VALIDATE rows outside [0, M) count as dropped slots (memory-safe)
    gen = torch.Generator().manual_seed(1)
    y, w, g = torch.randn(8, 3, generator=gen), torch.rand(4, 2, generator=gen), torch.randn(4, 3, generator=gen)
    rm = torch.tensor([[0, 100], [1, -7], [2, 3], [4, 8]], dtype=torch.int32)
    dropped = torch.tensor([[0, -1], [1, -1], [2, 3], [4, -1]], dtype=torch.int32)
    assert torch.equal(sim.moe_unpermute(y, rm, w), sim.moe_unpermute(y, dropped, w))
    for a, b in zip(sim.moe_unpermute_bwd(g, y, rm, w), sim.moe_unpermute_bwd(g, y, dropped, w)):
        assert torch.equal(a, b)


def test_unpermute_deterministic(sim):
    case = PERM_CASES[4]
    x, idx = perm_inputs(case, torch.bfloat16)
    x_sorted, row_map, _, _, _ = sim.moe_permute(x, idx, case.E, case.alignment, COUNTER_SMEM)
    gen = torch.Generator().manual_seed(5)
    w, g = torch.rand(case.N, case.k, generator=gen), torch.randn(case.N, case.D, generator=gen).bfloat16()
    a = (sim.moe_unpermute(x_sorted, row_map, w), *sim.moe_unpermute_bwd(g, x_sorted, row_map, w))
    with reseeded(7):
        b = (sim.moe_unpermute(x_sorted, row_map, w), *sim.moe_unpermute_bwd(g, x_sorted, row_map, w))
    assert all(torch.equal(s, t) for s, t in zip(a, b))


# ---- group layout and SIMT grouped GEMMs --------------------------------------------------------


def sanitised(offsets: list[int], M: int) -> list[int]:
    """api.cu's contract for offsets it does not validate: clamped into [0, M], made non-decreasing."""
    out, run = [], 0
    for o in offsets:
        run = max(run, min(max(o, 0), M))
        out.append(run)
    return out


def layout_expect(offsets: list[int], M: int, tile: int):
    """group_layout_kernel's rows of every expert (ordered and disjoint) and the prefix of its M tiles."""
    bounds = sanitised(offsets, M)
    start, end = bounds[:-1], bounds[1:]
    tiles = [(t - s + tile - 1) // tile for s, t in zip(start, end)]
    prefix = [0]
    for t in tiles:
        prefix.append(prefix[-1] + t)
    return start, end, prefix


@pytest.mark.parametrize(
    "offsets, M",
    [
        ([0, 16, 32, 48, 64], 64),
        ([3, 8, 8, 25, 26, 26, 35], 40),
        ([0, 0, 0, 0], 5),
        ([-3, 2, 60], 6),  # clamped into [0, M]
        ([0, 5, 3, 6, 200, 7], 9),  # decreasing: made non-decreasing (disjoint experts)
        ([4, 2, 1, 3], 9),  # offsets[0] above later ones
        (list(range(0, 3 * 1500 + 1, 3)), 4500),  # E = 1500: two rounds of the 1024-thread scan
        ([0] + [64 * 7 + 1] * 2000, 64 * 7 + 1),  # E = 2000, all rows in the first expert: 8 tiles
    ],
    ids=["even", "irregular", "empty", "clamped", "decreasing", "first-high", "E1500", "E2000"],
)
def test_group_layout(sim, offsets, M):
    bounds, tile_start = sim.group_layout(torch.tensor(offsets), len(offsets) - 1, M)
    start, end, prefix = layout_expect(offsets, M, sim.kTileM)
    assert bounds[0].tolist() == start and bounds[1].tolist() == end and tile_start.tolist() == prefix


# Several M, N and K tiles (64 x 64 x 16) and uneven experts, as test_cuda_moe, in every dtype; the
# largest wgrad case (a 1500-row expert, 392 x 264) in fp32, whose rounding it tests.
GEMM_ALL = GEMM_CASES + GPU_GEMM_CASES
WGRAD_ALL = [(c, dt) for c in GEMM_ALL + WGRAD_CASES[:-1] for dt in DTYPES] + [(WGRAD_CASES[-1], torch.float32)]


@pytest.mark.parametrize("trans_w", [False, True], ids=["nt", "nn"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("case", GEMM_ALL, ids=str)
def test_grouped_gemm_matches_reference(sim, case, dtype, trans_w):
    x, w, offsets = gemm_inputs(case, dtype, trans_w)
    y = sim.grouped_gemm(x, w, offsets, trans_w)
    assert y.dtype == dtype and y.shape == (x.shape[0], w.shape[2] if trans_w else w.shape[1])
    truth = reference.grouped_gemm(x.double(), w.double(), offsets, trans_w)
    gemm_tols(y, truth, reference.grouped_gemm(x, w, offsets, trans_w), case.K)
    if case.lead or case.tail:
        assert not y[: case.lead].any() and not y[y.shape[0] - case.tail :].any()


@pytest.mark.parametrize("case, dtype", WGRAD_ALL, ids=case_id)
def test_grouped_gemm_wgrad_matches_reference(sim, case, dtype):
    x, _, offsets = gemm_inputs(case, dtype, seed=4)
    dy = torch.randn(x.shape[0], case.N, generator=torch.Generator().manual_seed(5)).to(dtype)
    dw = sim.grouped_gemm_wgrad(dy, x, offsets)
    assert dw.shape == (len(case.counts), case.N, case.K) and dw.dtype == dtype
    truth = reference.grouped_gemm_wgrad(dy.double(), x.double(), offsets)
    gemm_tols(dw, truth, reference.grouped_gemm_wgrad(dy, x, offsets), max(case.counts))
    empty = torch.tensor(case.counts) == 0
    assert torch.equal(dw[empty], torch.zeros_like(dw[empty])), "experts without rows get exact zeros"


EXACT_CASES = [(c, dt) for c in (GEMM_CASES[1], GPU_GEMM_CASES[0]) for dt in DTYPES] + [(GEMM_CASES[5], torch.float32)]


@pytest.mark.parametrize("case, dtype", EXACT_CASES, ids=case_id)
def test_grouped_gemm_exact_integers(sim, case, dtype):
    # small integers: every product and partial sum is exact in the accumulator, so the output is the
    # exact result rounded once
    for trans_w in (False, True):
        x, w, offsets = gemm_inputs(case, dtype, trans_w, integer=True)
        expect = reference.grouped_gemm(x.double(), w.double(), offsets, trans_w).to(dtype)
        assert torch.equal(sim.grouped_gemm(x, w, offsets, trans_w), expect)
    x, _, offsets = gemm_inputs(case, dtype, integer=True)
    dy = torch.randint(-3, 4, (x.shape[0], 5), generator=torch.Generator().manual_seed(2)).to(dtype)
    expect = reference.grouped_gemm_wgrad(dy.double(), x.double(), offsets).to(dtype)
    assert torch.equal(sim.grouped_gemm_wgrad(dy, x, offsets), expect)


@pytest.mark.parametrize("layout", ["transposed_view", "expanded", "sliced"])
def test_grouped_gemm_weight_views(sim, layout):
    # the SIMT kernel reads w through its strides (api.cu passes views as they are)
    x, w, offsets = gemm_inputs(GEMM_CASES[6], torch.float32)
    if layout == "transposed_view":  # [E, K, N] storage seen as [E, N, K]: k is not the fast index
        w = w.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "expanded":  # every expert the same weight, stride 0 over experts
        w = w[:1].expand_as(w)
    else:
        w = torch.cat([w, w], dim=2)[:, :, ::2]
    assert torch.equal(sim.grouped_gemm(x, w, offsets, False), sim.grouped_gemm(x, w.contiguous(), offsets, False))


def test_grouped_gemm_edge_shapes(sim):
    x, w, offsets = gemm_inputs(GemmCase(counts=(2, 3), K=3, N=4, lead=1, tail=1), torch.float32)
    y = sim.grouped_gemm(x, w, torch.tensor([-3, 2, 60]), False)  # offsets clamped to [0, 2, 7]
    assert torch.equal(y, sim.grouped_gemm(x, w, torch.tensor([0, 2, 7]), False))
    assert torch.equal(sim.grouped_gemm(x, w[:0], torch.tensor([0]), False), torch.zeros(7, 4))  # no experts
    assert sim.grouped_gemm(x[:, :0], w[:, :, :0], offsets, False).count_nonzero() == 0  # K = 0: zeros
    dw = sim.grouped_gemm_wgrad(torch.randn(0, 4), torch.randn(0, 3), torch.tensor([0, 0, 0]))
    assert torch.equal(dw, torch.zeros(2, 4, 3))  # M = 0: every expert empty


def test_grouped_gemm_invalid_offsets(sim):
    # Without GLM5_CUDA_VALIDATE decreasing or out-of-range offsets are not rejected; the device makes
    # them non-decreasing within [0, M], so the experts' rows never overlap (no two CTAs write one row).
    x, w, _ = gemm_inputs(GemmCase(counts=(2, 3, 1, 3), K=5, N=7), torch.float32)
    for bad in ([0, 5, 3, 6, 9], [4, 2, 1, 3, 12], [-2, 0, 8, 7, 7]):
        good = torch.tensor(sanitised(bad, x.shape[0]))
        assert torch.equal(sim.grouped_gemm(x, w, torch.tensor(bad), False), sim.grouped_gemm(x, w, good, False))
        dy = torch.randn(x.shape[0], 7)
        assert torch.equal(sim.grouped_gemm_wgrad(dy, x, torch.tensor(bad)), sim.grouped_gemm_wgrad(dy, x, good))


def test_grouped_gemm_deterministic(sim):
    case = GPU_GEMM_CASES[0]
    x, w, offsets = gemm_inputs(case, torch.bfloat16)
    dy = torch.randn(x.shape[0], case.N).bfloat16()
    y, dw = sim.grouped_gemm(x, w, offsets, False), sim.grouped_gemm_wgrad(dy, x, offsets)
    with reseeded(7):
        assert torch.equal(sim.grouped_gemm(x, w, offsets, False), y)
        assert torch.equal(sim.grouped_gemm_wgrad(dy, x, offsets), dw)


# ---- the CUTLASS path's argument kernels ---------------------------------------------------------

# bf16 with N and K multiples of 8 (the host's conditions for CUTLASS): test_cuda_moe's aligned wgrad
# cases, the forward on the same shapes, and 300 groups (three blocks of the fill kernels).
ARG_CASES = WGRAD_CASES + [GemmCase(counts=tuple(range(300)), K=16, N=8, lead=2, tail=3)]


def check_buffer_layout(layout: list[int], E: int) -> None:
    # seven arrays, each 256-byte aligned, in order, disjoint and inside the buffer
    starts, total = layout[:7], layout[7]
    sizes = [12 * E, 8 * E, 8 * E, 8 * E, 8 * E, 8 * E, 8 * E]  # (int, int, int) shapes; pointers; 8-byte strides
    assert starts[0] == 0 and all(s % 256 == 0 for s in starts)
    for s, n, nxt in zip(starts, sizes, starts[1:] + [total]):
        assert s + n <= nxt


def emulate(base_a, base_b, base_d, shapes, ptrs, strides):
    """What a grouped GEMM given only these arrays computes: D_g = A_g @ B_g^T (CuTe: A (M, K), B (N, K))."""
    d = base_d.clone().double().flatten()
    a, b = base_a.double().flatten(), base_b.double().flatten()
    for (m, n, k), (pa, pb, pd), (sa, sb, sd) in zip(shapes.tolist(), ptrs.tolist(), strides.tolist()):
        if m == 0 or n == 0:
            continue  # no tiles
        assert k > 0, "CUTLASS must never be given K = 0 (it would store uncleared accumulators)"
        A = a.as_strided((m, k), sa[:2], pa)
        B = b.as_strided((n, k), sb[:2], pb)
        d.as_strided((m, n), sd[:2], pd).copy_(A @ B.T)
    return d.view(base_d.shape)


@pytest.mark.parametrize("trans_w", [False, True], ids=["nt", "nn"])
@pytest.mark.parametrize("case", ARG_CASES, ids=str)
def test_cutlass_forward_arrays(sim, sim_args, case, trans_w):
    x, w, offsets = gemm_inputs(case, torch.bfloat16, trans_w)
    E, M, K, N = len(case.counts), x.shape[0], case.K, case.N
    bounds, _ = sim.group_layout(offsets, E, M)
    y = torch.zeros(M, N, dtype=torch.bfloat16)
    shapes, ptrs, strides, layout = sim_args.forward_arrays(x, w, bounds[0].clone(), bounds[1].clone(), y, trans_w)
    check_buffer_layout(layout, E)
    off = offsets.tolist()
    rows = [b - a for a, b in zip(off, off[1:])]
    assert shapes.tolist() == [[r, N, K] for r in rows]
    assert ptrs.tolist() == [[off[e] * K, e * w.stride(0), off[e] * N] for e in range(E)]
    sb = [1, N, 0] if trans_w else [K, 1, 0]  # B over (N, K): w[e] [K, N] (n fastest) or [N, K] (k fastest)
    assert strides.tolist() == [[[K, 1, 0], sb, [N, 1, 0]]] * E
    # the arrays describe the grouped GEMM: emulated from them alone, it gives the reference's y
    got = emulate(x, w, y, shapes, ptrs, strides)
    assert torch.allclose(got, reference.grouped_gemm(x.double(), w.double(), offsets, trans_w), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ARG_CASES, ids=str)
def test_cutlass_wgrad_arrays_and_zero_fill(sim, sim_args, case):
    x, _, offsets = gemm_inputs(case, torch.bfloat16, seed=4)
    E, M, K, N = len(case.counts), x.shape[0], case.K, case.N
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(5)).bfloat16()
    bounds, _ = sim.group_layout(offsets, E, M)
    dw = torch.full((E, N, K), float("nan"), dtype=torch.bfloat16)  # the garbage of at::empty
    shapes, ptrs, strides, layout = sim_args.wgrad_arrays(dy, x, bounds[0].clone(), bounds[1].clone(), dw)
    check_buffer_layout(layout, E)
    off = offsets.tolist()
    rows = [b - a for a, b in zip(off, off[1:])]
    assert shapes.tolist() == [[N, K, r] if r else [0, 0, 0] for r in rows]
    assert ptrs.tolist() == [[off[e] * N, off[e] * K, e * N * K] for e in range(E)]
    # A = dy^T over (n, r): n fastest, ld N; B = x over (k, r): k fastest, ld K; D = dw[e] over (n, k)
    assert strides.tolist() == [[[1, N, 0], [1, K, 0], [K, 1, 0]]] * E
    empty = torch.tensor(rows) == 0
    assert not dw[empty].view(torch.int16).any(), "zero_empty_experts_kernel writes +0.0 into empty experts"
    assert dw[~empty].isnan().all(), "dw of experts with rows is CUTLASS's to write"
    got = emulate(dy, x, dw, shapes, ptrs, strides)
    assert torch.allclose(got, reference.grouped_gemm_wgrad(dy.double(), x.double(), offsets), rtol=1e-12, atol=1e-12)
