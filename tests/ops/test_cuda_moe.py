"""CUDA kernels of the MoE ops against the references (skipped without a GPU).

Status: the CUDA kernels are compiled for sm_90a but have not yet run on a GPU; these tests are the
first thing to run on one (`pytest -m cuda tests/ops/test_cuda_moe.py`).

The inputs are the CPU tests' named cases (tests/ops/test_moe.py, test_moe_route.py), built on the
CPU and moved to the GPU, plus cases sized for the GPU paths the CPU cases do not reach (more than one
1024-slot chunk in moe_permute, experts with counters in global memory, several GEMM tiles). Data
movement is compared with torch.equal, float outputs with the FA3 rule against the fp64 reference.

Documented differences from the CPU kernels (nothing syncs with the host): checks of tensor values
(expert indices and row_map in range, no repeated row, offsets in range and non-decreasing, NaN
router logits) run only with GLM5_CUDA_VALIDATE=1, and then raise the CPU kernels' errors. Without
it an out-of-range expert or row counts as a dropped slot, offsets are clamped into [0, M] and made
non-decreasing, and a NaN router row gets expert 0 with weight 0.
"""

from __future__ import annotations

import pytest
import torch

import glm5
from glm5.ops import reference
from numerics import assert_close_to_ref, calc_diff
from test_moe import DTYPES, GEMM_CASES, MOE_CASES, PERM_CASES, GemmCase, MoECase, PermCase, dname
from test_moe import _counts, _grads, _opcheck_samples, gemm_inputs, make_topk, moe_inputs, perm_inputs
from test_moe_route import CASES as ROUTE_CASES
from test_moe_route import Case as RouteCase
from test_moe_route import TINY as ROUTE_TINY
from test_moe_route import make_inputs as route_inputs
from test_moe_route import route_kwargs

pytestmark = pytest.mark.cuda


def cuda(*ts):
    return tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in ts)


# GPU-only paths: several permute chunks (N*k > 1024), per-chunk counters in global memory (E > 8192).
GPU_PERM_CASES = [
    PermCase(N=3000, E=40, k=4, D=24, alignment=16, load="dropped"),
    PermCase(N=1500, E=256, k=8, D=7, load="skewed"),
    PermCase(N=700, E=9000, k=3, D=4, alignment=2),
]
GPU_ROUTE_CASES = [
    RouteCase(N=2000, E=256, topk=8, scale=2.5),  # many warps and blocks
    RouteCase(N=300, E=256, topk=8, n_group=8, topk_group=4, ties="coarse"),
    RouteCase(N=40, E=96, topk=40, n_group=48, topk_group=20),  # more groups than lanes
]
# Several M, N and K tiles (64 x 64 x 16) and uneven experts.
GPU_GEMM_CASES = [
    GemmCase(counts=(130, 0, 64, 1, 257), K=100, N=200, lead=5, tail=70),
    GemmCase(counts=tuple([0] * 20 + [300] + [0] * 20), K=33, N=65),
]


# k-grouped wgrad shapes for the CUTLASS path (bf16 with N and K multiples of 8); other dtypes take the
# SIMT kernel on the same cases. Row counts are deliberately not multiples of 8, 64 (the CUTLASS K
# tile) or 128, and empty experts (which CUTLASS must never be given: it would not write them) appear
# in the first, last and middle positions.
WGRAD_CASES = [
    GemmCase(counts=(5, 0, 17, 1, 0, 130, 63, 257), K=72, N=40, lead=3, tail=9),  # odd row offsets
    GemmCase(counts=(0, 0, 515, 0), K=136, N=264),  # one expert holds every row
    GemmCase(counts=(128, 256, 0, 384, 128), K=128, N=256),  # offsets aligned to 128 (moe_permute alignment)
    GemmCase(counts=(64, 0, 192, 7), K=8, N=8, lead=64),  # the smallest aligned N and K, far below a tile
    GemmCase(counts=tuple(0 if i % 7 == 0 else c for i, c in enumerate(_counts(70, 1, 40, 3))), K=32, N=48),  # > 32 groups
    GemmCase(counts=(0, 0, 0), K=16, N=24, lead=5, tail=5),  # rows exist but every expert is empty
    GemmCase(counts=(1500, 3, 700, 0), K=264, N=392),  # several M, N and K tiles
]


CUTLASS_GEMM = "cutlass::device_kernel"  # the CUTLASS kernel's name (our own helper kernels are not named so)


def cuda_kernels(fn) -> set[str]:
    """Names of the CUDA kernels that fn() launches (skips if the profiler sees none: no CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    if not names:
        pytest.skip("the profiler recorded no CUDA kernels")
    return names


def dirty_cache(nbytes: int) -> None:
    """Leaves NaN-filled (all-ones bytes) blocks of nbytes in the caching allocator, so an output allocated next
    starts as garbage rather than zeros (an unwritten output then fails the test)."""
    blocks = [torch.full((nbytes,), 0xFF, dtype=torch.uint8, device="cuda") for _ in range(4)]
    del blocks


# ---- moe_route ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ROUTE_CASES + GPU_ROUTE_CASES, ids=str)
def test_route_matches_reference(case):
    logits, bias = cuda(*route_inputs(case))
    idx, w = glm5.ops.moe_route(logits, bias, case.topk, **route_kwargs(case))
    # the reference on the same device: the same sigmoid bits, so the same choice, exactly
    ref_idx, ref_w = reference.moe_route(logits, bias, case.topk, **route_kwargs(case))
    assert idx.is_cuda and idx.dtype == torch.int32 and w.dtype == reference.acc_dtype(logits)
    assert torch.equal(idx, ref_idx), f"choice differs in rows {(idx != ref_idx).any(1).nonzero().flatten().tolist()}"
    assert_close_to_ref(w.cpu(), ref_w.cpu(), name="topk_w")


def test_route_ties_and_groups():
    idx, w = glm5.ops.moe_route(torch.zeros(3, 8, device="cuda"), None, 3)
    assert idx.tolist() == [[0, 1, 2]] * 3 and torch.equal(w.cpu(), torch.full((3, 3), 1 / 3))
    bias = torch.zeros(8, device="cuda")
    bias[6] = 0.25
    idx, w = glm5.ops.moe_route(torch.zeros(3, 8, device="cuda"), bias, 3)
    assert idx.tolist() == [[6, 0, 1]] * 3 and torch.equal(w.cpu(), torch.full((3, 3), 1 / 3))
    idx, _ = glm5.ops.moe_route(torch.zeros(2, 8, device="cuda"), None, 4, n_group=4, topk_group=2)
    assert idx.tolist() == [[0, 1, 2, 3]] * 2
    logits = torch.tensor([[0.0, 1.2, 1.2, 0.0, 0.0, 0.0, -5.0, 3.0]], device="cuda")
    assert glm5.ops.moe_route(logits, None, 2, n_group=2, topk_group=1)[0].tolist() == [[1, 2]]
    assert glm5.ops.moe_route(logits, None, 2)[0].tolist() == [[7, 1]]


@pytest.mark.parametrize("case", [c for c in ROUTE_CASES if c.ties != "all" and c.dtype != torch.bfloat16], ids=str)
def test_route_backward_matches_reference(case):
    logits, bias = route_inputs(case, requires_grad=True)
    gw = torch.randn(case.N, case.topk, dtype=reference.acc_dtype(logits))
    lc = logits.detach().cuda().requires_grad_(True)
    _, w = glm5.ops.moe_route(lc, None if bias is None else bias.cuda(), case.topk, **route_kwargs(case))
    (grad,) = torch.autograd.grad(w, lc, gw.cuda())
    truth_logits = logits.detach().double().requires_grad_(True)
    _, w_ref = reference.moe_route(truth_logits, bias, case.topk, **route_kwargs(case))
    (truth,) = torch.autograd.grad(w_ref, truth_logits, gw.double())
    floor = 8 * torch.finfo(grad.dtype).eps * max(1.0, float(truth.abs().max()))
    assert_close_to_ref(grad.cpu(), truth, name="dlogits", floor=floor)


def test_route_opcheck_and_deterministic():
    case = ROUTE_TINY[0]
    logits, bias = cuda(*route_inputs(case))
    args = (logits, bias, case.topk, case.n_group, case.topk_group, case.norm, case.scale)
    torch.library.opcheck(torch.ops.glm5.moe_route, args)
    big = GPU_ROUTE_CASES[0]
    logits, bias = cuda(*route_inputs(big))
    a = glm5.ops.moe_route(logits, bias, big.topk, **route_kwargs(big))
    b = glm5.ops.moe_route(logits, bias, big.topk, **route_kwargs(big))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---- moe_permute / moe_unpermute --------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("case", PERM_CASES + GPU_PERM_CASES, ids=str)
def test_permute_matches_reference(case, dtype):
    x, idx = perm_inputs(case, dtype)
    out = glm5.ops.moe_permute(*cuda(x, idx), case.E, case.alignment)
    ref = reference.moe_permute(x, idx, case.E, case.alignment)
    for name, a, b in zip(("x_sorted", "row_map", "offsets"), out, ref):
        assert a.is_cuda and a.dtype == b.dtype and torch.equal(a.cpu(), b), name


@pytest.mark.parametrize("case", PERM_CASES + GPU_PERM_CASES[:1], ids=str)
def test_unpermute_fwd_bwd_matches_reference(case):
    x, idx = perm_inputs(case)
    gen = torch.Generator().manual_seed(3)
    _, row_map, _ = reference.moe_permute(x, idx, case.E, case.alignment)
    M = case.N * case.k + case.E * (case.alignment - 1)
    for dtype in DTYPES:
        y = torch.randn(M, case.D, generator=gen).to(dtype)
        w = torch.rand(case.N, case.k, generator=gen)
        g = torch.randn(case.N, case.D, generator=gen).to(dtype)
        yc, wc = (t.cuda().requires_grad_(True) for t in (y, w))
        out = glm5.ops.moe_unpermute(yc, row_map.cuda(), wc)
        dy, dw = torch.autograd.grad(out, (yc, wc), g.cuda()) if out.numel() else (torch.zeros_like(yc), torch.zeros_like(wc))
        yt, wt = (t.double().requires_grad_(True) for t in (y, w))
        truth = reference.moe_unpermute(yt, row_map, wt)
        dy_t, dw_t = torch.autograd.grad(truth, (yt, wt), g.double()) if truth.numel() else (torch.zeros_like(yt), torch.zeros_like(wt))
        yl, wl = (t.clone().requires_grad_(True) for t in (y, w))
        lowp = reference.moe_unpermute(yl, row_map, wl)
        dy_l, dw_l = torch.autograd.grad(lowp, (yl, wl), g) if lowp.numel() else (torch.zeros_like(yl), torch.zeros_like(wl))
        assert out.dtype == dtype and dy.dtype == dtype and dw.dtype == w.dtype
        assert_close_to_ref(out.detach().cpu(), truth.detach(), lowp.detach(), name=f"out {dname(dtype)}")
        assert_close_to_ref(dy.cpu(), dy_t, dy_l, name=f"dy {dname(dtype)}")
        assert_close_to_ref(dw.cpu(), dw_t, dw_l, name=f"dtopk_w {dname(dtype)}")


def test_permute_unpermute_exact_integers():
    gen = torch.Generator().manual_seed(0)
    case = PermCase(N=2000, E=11, k=3, D=6, alignment=8, load="dropped")
    idx = make_topk(case.N, case.E, case.k, case.load, gen)
    x = torch.randint(-8, 9, (case.N, case.D), generator=gen).float()
    w = torch.randint(-3, 4, (case.N, case.k), generator=gen).float()
    x_sorted, row_map, _ = glm5.ops.moe_permute(*cuda(x, idx), case.E, case.alignment)
    out = glm5.ops.moe_unpermute(x_sorted, row_map, w.cuda())
    assert torch.equal(out.cpu(), (w * (idx >= 0)).sum(1, keepdim=True) * x)


def test_permute_deterministic():
    case = GPU_PERM_CASES[0]
    x, idx = cuda(*perm_inputs(case, torch.bfloat16))
    w = torch.rand(case.N, case.k, device="cuda")
    g = torch.randn(case.N, case.D, device="cuda").bfloat16()

    def run():
        x_sorted, row_map, offsets = glm5.ops.moe_permute(x, idx, case.E, case.alignment)
        out = glm5.ops.moe_unpermute(x_sorted, row_map, w)
        return (x_sorted, row_map, offsets, out, *torch.ops.glm5.moe_unpermute_bwd(g, x_sorted, row_map, w))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


# ---- grouped GEMMs ----------------------------------------------------------------------------


def gemm_tols(out, truth, lowp, reduce_len):
    # fp64 has no lower-precision reference to measure against: allow the worst case of a
    # reduce_len-term fp64 sum in another order (as test_sparse_mla's floor); 4 eps was too tight.
    floor = None
    if out.dtype == torch.float64:
        floor = max(reduce_len, 4) * torch.finfo(torch.float64).eps * max(1.0, float(truth.abs().max()))
    assert_close_to_ref(out.cpu(), truth, lowp, floor=floor)
    assert calc_diff(out.cpu(), truth) < 1e-5


@pytest.mark.parametrize("trans_w", [False, True], ids=["nt", "nn"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("case", GEMM_CASES + GPU_GEMM_CASES, ids=str)
def test_grouped_gemm_matches_reference(case, dtype, trans_w):
    x, w, offsets = gemm_inputs(case, dtype, trans_w)
    y = glm5.ops.grouped_gemm(*cuda(x, w, offsets), trans_w)
    assert y.is_cuda and y.dtype == dtype
    truth = reference.grouped_gemm(x.double(), w.double(), offsets, trans_w)
    gemm_tols(y, truth, reference.grouped_gemm(x, w, offsets, trans_w), case.K)
    if case.lead or case.tail:
        assert not y[: case.lead].any() and not y[y.shape[0] - case.tail :].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("case", GEMM_CASES + GPU_GEMM_CASES, ids=str)
def test_grouped_gemm_wgrad_matches_reference(case, dtype):
    x, _, offsets = gemm_inputs(case, dtype)
    dy = torch.randn(x.shape[0], case.N, generator=torch.Generator().manual_seed(1)).to(dtype)
    dw = glm5.ops.grouped_gemm_wgrad(*cuda(dy, x, offsets))
    assert dw.shape == (len(case.counts), case.N, case.K) and dw.dtype == dtype
    truth = reference.grouped_gemm_wgrad(dy.double(), x.double(), offsets)
    gemm_tols(dw, truth, reference.grouped_gemm_wgrad(dy, x, offsets), max(case.counts, default=0))
    assert not dw[torch.tensor(case.counts, device="cuda") == 0].any(), "experts without rows get a zero gradient"


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("case", WGRAD_CASES, ids=str)
def test_grouped_gemm_wgrad_aligned_matches_reference(case, dtype):
    # bf16: CUTLASS's k-grouped GEMM; fp16, fp32, fp64: the SIMT kernel
    x, _, offsets = gemm_inputs(case, dtype, seed=4)
    dy = torch.randn(x.shape[0], case.N, generator=torch.Generator().manual_seed(5)).to(dtype)
    E = len(case.counts)
    args = cuda(dy, x, offsets)
    dirty_cache(E * case.N * case.K * x.element_size())
    dw = glm5.ops.grouped_gemm_wgrad(*args)
    assert dw.is_cuda and dw.shape == (E, case.N, case.K) and dw.dtype == dtype
    truth = reference.grouped_gemm_wgrad(dy.double(), x.double(), offsets)
    gemm_tols(dw, truth, reference.grouped_gemm_wgrad(dy, x, offsets), max(case.counts, default=0))
    empty = torch.tensor(case.counts, device="cuda") == 0
    assert torch.equal(dw[empty], torch.zeros_like(dw[empty])), "experts without rows get exact zeros"


@pytest.mark.sm90
@pytest.mark.parametrize("case", [WGRAD_CASES[0], WGRAD_CASES[4], WGRAD_CASES[5]], ids=str)
def test_grouped_gemm_wgrad_takes_cutlass_for_aligned_bf16(case):
    x, _, offsets = cuda(*gemm_inputs(case, torch.bfloat16))
    dy = torch.randn(x.shape[0], case.N, device="cuda").bfloat16()
    names = cuda_kernels(lambda: glm5.ops.grouped_gemm_wgrad(dy, x, offsets))
    assert any(CUTLASS_GEMM in n for n in names) and not any("grouped_wgrad_simt" in n for n in names), names
    for other in (torch.float16, torch.float32, torch.float64):  # no CUTLASS instantiation: SIMT
        names = cuda_kernels(lambda: glm5.ops.grouped_gemm_wgrad(dy.to(other), x.to(other), offsets))
        assert any("grouped_wgrad_simt" in n for n in names) and not any(CUTLASS_GEMM in n for n in names), names
    # N not a multiple of 8: TMA cannot read dy, so SIMT
    names = cuda_kernels(lambda: glm5.ops.grouped_gemm_wgrad(dy[:, :-1], x, offsets))
    assert any("grouped_wgrad_simt" in n for n in names) and not any(CUTLASS_GEMM in n for n in names), names


@pytest.mark.sm90
@pytest.mark.parametrize("trans_w", [False, True], ids=["nt", "nn"])
def test_grouped_gemm_takes_cutlass_for_aligned_bf16(trans_w):
    x, w, offsets = cuda(*gemm_inputs(WGRAD_CASES[0], torch.bfloat16, trans_w))
    names = cuda_kernels(lambda: glm5.ops.grouped_gemm(x, w, offsets, trans_w))
    assert any(CUTLASS_GEMM in n for n in names) and not any("grouped_gemm_simt" in n for n in names), names


@pytest.mark.parametrize("case", WGRAD_CASES, ids=str)
def test_grouped_gemm_wgrad_aligned_exact_integers_and_deterministic(case):
    # small integers: every product and partial sum is exact in fp32, so the bf16 output is the exact
    # result rounded once, as the fp64 reference rounded to bf16
    x, _, offsets = gemm_inputs(case, torch.bfloat16, integer=True)
    dy = torch.randint(-3, 4, (x.shape[0], case.N), generator=torch.Generator().manual_seed(6)).bfloat16()
    expect = reference.grouped_gemm_wgrad(dy.double(), x.double(), offsets).bfloat16()
    a = glm5.ops.grouped_gemm_wgrad(*cuda(dy, x, offsets))
    assert torch.equal(a.cpu(), expect)
    assert torch.equal(glm5.ops.grouped_gemm_wgrad(*cuda(dy, x, offsets)), a)
    # non-contiguous inputs are copied first: the same result
    dyt = dy.cuda().t().contiguous().t()
    assert not dyt.is_contiguous() and torch.equal(glm5.ops.grouped_gemm_wgrad(dyt, x.cuda(), offsets.cuda()), a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=dname)
@pytest.mark.parametrize("case", [GEMM_CASES[1], GEMM_CASES[5], GPU_GEMM_CASES[0]], ids=str)
def test_grouped_gemm_exact_integers(case, dtype):
    for trans_w in (False, True):
        x, w, offsets = gemm_inputs(case, dtype, trans_w, integer=True)
        expect = reference.grouped_gemm(x.double(), w.double(), offsets, trans_w).to(dtype)
        assert torch.equal(glm5.ops.grouped_gemm(*cuda(x, w, offsets), trans_w).cpu(), expect)
    x, _, offsets = gemm_inputs(case, dtype, integer=True)
    dy = torch.randint(-3, 4, (x.shape[0], 5), generator=torch.Generator().manual_seed(2)).to(dtype)
    expect = reference.grouped_gemm_wgrad(dy.double(), x.double(), offsets).to(dtype)
    assert torch.equal(glm5.ops.grouped_gemm_wgrad(*cuda(dy, x, offsets)).cpu(), expect)


@pytest.mark.parametrize("layout", ["transposed_view", "expanded", "sliced"])
def test_grouped_gemm_weight_views(layout):
    case = GPU_GEMM_CASES[0]
    x, w, offsets = cuda(*gemm_inputs(case, torch.float32))
    if layout == "transposed_view":  # [E, K, N] storage seen as [E, N, K]
        w = w.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "expanded":  # every expert the same weight, stride 0 over experts
        w = w[:1].expand_as(w)
    else:
        w = torch.cat([w, w], dim=2)[:, :, ::2]
    y = glm5.ops.grouped_gemm(x, w, offsets)
    assert torch.equal(y, glm5.ops.grouped_gemm(x, w.contiguous(), offsets))


# ---- moe_experts, autograd, opcheck, compile --------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dname)
@pytest.mark.parametrize("case", MOE_CASES, ids=str)
def test_moe_experts_fwd_bwd_matches_reference(case, dtype):
    x, idx, w, wg, wd = moe_inputs(case, dtype, requires_grad=True)
    gout = torch.randn(case.N, case.D, generator=torch.Generator().manual_seed(9)).to(dtype)
    dev = [t.detach().cuda().requires_grad_(True) for t in (x, w, wg, wd)]
    got = _grads(glm5.ops.moe_experts, dev[0], idx.cuda(), dev[1], dev[2], dev[3], gout.cuda())
    lowp = _grads(reference.moe_experts, x, idx, w, wg, wd, gout)
    up = [t.detach().double().requires_grad_(True) for t in (x, w, wg, wd)]
    truth = _grads(reference.moe_experts, up[0], idx, up[1], up[2], up[3], gout.double())
    for name, a, t, lp in zip(("out", "dx", "dtopk_w", "dw_gate_up", "dw_down"), got, truth, lowp):
        assert a.dtype == lp.dtype, name
        assert_close_to_ref(a.cpu(), t, lp, factor=3.0, name=name)


def test_deterministic_fwd_bwd():
    case = MoECase(N=600, E=16, k=4, D=64, F=96, load="skewed")
    x, idx, w, wg, wd = moe_inputs(case, torch.bfloat16)
    dev = [t.cuda().requires_grad_(True) for t in (x, w, wg, wd)]
    gout = torch.randn(case.N, case.D, device="cuda").bfloat16()
    a = _grads(glm5.ops.moe_experts, dev[0], idx.cuda(), dev[1], dev[2], dev[3], gout)
    b = _grads(glm5.ops.moe_experts, dev[0], idx.cuda(), dev[1], dev[2], dev[3], gout)
    for s, t in zip(a, b):
        assert torch.equal(s, t)


@pytest.mark.parametrize("name, op, args", _opcheck_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, op, args):
    args = tuple(a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)
    if name == "permute_grad":
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    else:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_fwd_bwd():
    case = MOE_CASES[0]
    x, idx, w, wg, wd = moe_inputs(case, torch.float32)
    x, wg, wd = (t.cuda().requires_grad_(True) for t in (x, wg, wd))
    logits = torch.randn(case.N, case.E, device="cuda", requires_grad=True)

    def layer(x, logits, wg, wd):
        topk_idx, topk_w = glm5.ops.moe_route(logits, None, 2, routed_scaling_factor=2.5)
        return glm5.ops.moe_experts(x, topk_idx, topk_w, wg, wd)

    eager = layer(x, logits, wg, wd)
    out = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, logits, wg, wd)
    assert torch.equal(out, eager)
    for a, b in zip(torch.autograd.grad(out.square().sum(), (x, logits, wg, wd)),
                    torch.autograd.grad(eager.square().sum(), (x, logits, wg, wd))):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


# ---- bad input --------------------------------------------------------------------------------


def _bad_cases():
    x, idx = torch.randn(4, 3), torch.tensor([[0, 1], [2, 0], [1, 1], [2, -1]], dtype=torch.int32)
    y, rm = torch.randn(8, 3), torch.tensor([[0, 1], [2, 3], [4, 5], [6, -1]], dtype=torch.int32)
    w, gx, gw, off = torch.rand(4, 2), torch.randn(6, 4), torch.randn(2, 5, 4), torch.tensor([0, 2, 6])
    x, idx, y, rm, w, gx, gw, off = cuda(x, idx, y, rm, w, gx, gw, off)
    ops = glm5.ops
    # (name, fn, exception, message must mention, needs GLM5_CUDA_VALIDATE=1)
    return [
        ("permute-idx-high", lambda: ops.moe_permute(x, idx, 2), IndexError, "topk_idx", True),
        ("permute-idx-neg", lambda: ops.moe_permute(x, idx - 2, 3), IndexError, "topk_idx", True),
        ("permute-idx-int64", lambda: ops.moe_permute(x, idx.long(), 3), RuntimeError, "topk_idx", False),
        ("permute-idx-rows", lambda: ops.moe_permute(x, idx[:3], 3), RuntimeError, "topk_idx", False),
        ("permute-idx-cpu", lambda: ops.moe_permute(x, idx.cpu(), 3), RuntimeError, "topk_idx", False),
        ("permute-x-int", lambda: ops.moe_permute(x.int(), idx, 3), RuntimeError, "x", False),
        ("permute-align0", lambda: ops.moe_permute(x, idx, 3, 0), ValueError, "alignment", False),
        ("unpermute-row-high", lambda: ops.moe_unpermute(y, rm + 2, w), IndexError, "row_map", True),
        ("unpermute-row-twice", lambda: ops.moe_unpermute(y, rm.clamp(max=4), w), ValueError, "row_map", True),
        ("unpermute-w-shape", lambda: ops.moe_unpermute(y, rm, w[:, :1]), RuntimeError, "topk_w", False),
        ("unpermute-bwd-grad", lambda: torch.ops.glm5.moe_unpermute_bwd(y[:3], y, rm, w), RuntimeError, "grad", False),
        ("gemm-offsets-decreasing", lambda: ops.grouped_gemm(gx, gw, torch.tensor([0, 4, 3], device="cuda")), ValueError, "offsets", True),
        ("gemm-offsets-past-M", lambda: ops.grouped_gemm(gx, gw, off + 1), ValueError, "offsets", True),
        ("gemm-offsets-int32", lambda: ops.grouped_gemm(gx, gw, off.int()), ValueError, "offsets", False),
        ("gemm-offsets-cpu", lambda: ops.grouped_gemm(gx, gw, off.cpu()), RuntimeError, "offsets", False),
        ("gemm-K", lambda: ops.grouped_gemm(gx, gw[..., :3], off), RuntimeError, "K", False),
        ("gemm-w-dtype", lambda: ops.grouped_gemm(gx, gw.double(), off), RuntimeError, "w", False),
        ("wgrad-M", lambda: ops.grouped_gemm_wgrad(gx[:5], gx, off), RuntimeError, "x", False),
        ("wgrad-offsets", lambda: ops.grouped_gemm_wgrad(gx, gx, torch.tensor([0, 3, 2], device="cuda")), ValueError, "offsets", True),
        ("route-nan", lambda: ops.moe_route(torch.full((3, 8), float("nan"), device="cuda"), None, 2), ValueError, "NaN", True),
        ("route-topk", lambda: ops.moe_route(torch.zeros(3, 8, device="cuda"), None, 9), ValueError, "topk", False),
        ("route-bias", lambda: ops.moe_route(torch.zeros(3, 8, device="cuda"), torch.zeros(7, device="cuda"), 2), RuntimeError, "bias", False),
    ]


@pytest.mark.parametrize("index", range(22))
def test_bad_input(index, monkeypatch):
    name, fn, exc, match, needs_validate = _bad_cases()[index]
    if needs_validate:
        monkeypatch.setenv("GLM5_CUDA_VALIDATE", "1")
    with pytest.raises(exc, match=match):
        fn()


def test_invalid_values_without_validation_are_memory_safe(monkeypatch):
    # without GLM5_CUDA_VALIDATE nothing syncs: out-of-range experts / rows act as dropped slots
    monkeypatch.delenv("GLM5_CUDA_VALIDATE", raising=False)
    x = torch.randn(4, 3, device="cuda")
    idx = torch.tensor([[0, 7], [1, -5], [0, 1], [2, 0]], dtype=torch.int32, device="cuda")
    x_sorted, row_map, offsets = glm5.ops.moe_permute(x, idx, 3)
    assert row_map[0, 1] == -1 and row_map[1, 1] == -1 and offsets.tolist() == [0, 3, 5, 6]
    assert torch.equal(x_sorted[row_map[0, 0]], x[0])
    rm = torch.tensor([[0, 100], [1, -7], [2, 3], [4, 5]], dtype=torch.int32, device="cuda")
    out = glm5.ops.moe_unpermute(x_sorted, rm, torch.ones(4, 2, device="cuda"))
    assert torch.equal(out[0], x_sorted[0])
    gx, gw = torch.randn(6, 4, device="cuda"), torch.randn(2, 5, 4, device="cuda")
    y = glm5.ops.grouped_gemm(gx, gw, torch.tensor([-3, 2, 60], device="cuda"))  # clamped to [0, 2, 6]
    assert torch.allclose(y, glm5.ops.grouped_gemm(gx, gw, torch.tensor([0, 2, 6], device="cuda")))
