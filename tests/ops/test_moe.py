"""glm5.ops MoE kernels (moe_permute, moe_unpermute, grouped_gemm, grouped_gemm_wgrad) and the
moe_experts composite, against glm5.ops.reference.

Permutation is pure data movement: compared with torch.equal. GEMM-shaped outputs follow the FA3
rule (twice the error of the reference at the input precision, plus a rounding floor) and
calc_diff; integer-valued inputs make them exact, compared with torch.equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import glm5
from glm5.ops import reference
from numerics import assert_close_to_ref, calc_diff

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def dname(dt: torch.dtype) -> str:
    return str(dt).split(".")[-1]


def make_topk(N: int, E: int, k: int, load: str, gen: torch.Generator) -> torch.Tensor:
    """[N, k] int32 expert choices (distinct per token) with a given load pattern.

    uniform: random experts; skewed: geometric preference for the low experts (very uneven, some
    experts empty); hot: every token picks experts 0..k-1 (all others empty); dropped: uniform with
    30% of the slots -1; dup: a token may pick one expert twice (legal for permute / unpermute).
    """
    if load == "hot":
        return torch.arange(k, dtype=torch.int32).repeat(N, 1)
    if load == "dup":
        return torch.randint(0, E, (N, k), generator=gen, dtype=torch.int32)
    p = torch.ones(E) if load in ("uniform", "dropped") else 0.5 ** torch.arange(E, dtype=torch.float64)
    idx = torch.multinomial(p.expand(N, E).float() if N else p[None].float(), k, generator=gen)[:N].int()
    if load == "dropped":
        idx[torch.rand(N, k, generator=gen) < 0.3] = -1
    return idx


@dataclass(frozen=True)
class PermCase:
    N: int
    E: int
    k: int
    D: int = 8
    alignment: int = 1
    load: str = "uniform"

    def __str__(self) -> str:
        return f"N{self.N}-E{self.E}-k{self.k}-D{self.D}-align{self.alignment}-{self.load}"


PERM_CASES = [
    PermCase(N=16, E=8, k=2),
    PermCase(N=37, E=13, k=3, D=5),  # irregular
    PermCase(N=37, E=13, k=3, D=5, alignment=8),
    PermCase(N=50, E=7, k=4, D=3, alignment=128),  # alignment larger than any expert
    PermCase(N=64, E=32, k=4, load="skewed"),  # very uneven, empty experts
    PermCase(N=20, E=9, k=3, alignment=8, load="hot"),  # all but k experts empty
    PermCase(N=30, E=6, k=3, alignment=8, load="dropped"),  # -1 slots
    PermCase(N=25, E=5, k=3, load="dup"),  # one expert twice in a token
    PermCase(N=9, E=4, k=4),  # topk == num_experts
    PermCase(N=1, E=1, k=1, D=1),
    PermCase(N=0, E=3, k=2),  # no tokens
]


def perm_inputs(case: PermCase, dtype=torch.float32):
    gen = torch.Generator().manual_seed(case.N * 7 + case.E)
    x = torch.randn(case.N, case.D, generator=gen).to(dtype)
    return x, make_topk(case.N, case.E, case.k, case.load, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("case", PERM_CASES, ids=str)
def test_permute_matches_reference(case, dtype):
    x, idx = perm_inputs(case, dtype)
    out = glm5.ops.moe_permute(x, idx, case.E, case.alignment)
    ref = reference.moe_permute(x, idx, case.E, case.alignment)
    for name, a, b in zip(("x_sorted", "row_map", "offsets"), out, ref):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    x_sorted, row_map, offsets = out
    # the layout contract, checked directly
    counts = glm5.ops.expert_load(idx, case.E)
    seg = offsets.diff()
    assert int(offsets[0]) == 0 and bool((offsets[:-1] % case.alignment == 0).all())
    assert torch.equal(seg, (counts + case.alignment - 1) // case.alignment * case.alignment)
    assert x_sorted.shape == (case.N * case.k + case.E * (case.alignment - 1), case.D)
    valid = row_map >= 0
    assert torch.equal(x_sorted[row_map[valid].long()], x[:, None].expand(-1, case.k, -1)[valid])
    used = torch.zeros(x_sorted.shape[0], dtype=torch.bool)
    used[row_map[valid].long()] = True
    assert not x_sorted[~used].any(), "padding rows must be zero"


@pytest.mark.parametrize("case", PERM_CASES, ids=str)
def test_unpermute_matches_reference(case):
    x, idx = perm_inputs(case)
    gen = torch.Generator().manual_seed(3)
    _, row_map, _ = reference.moe_permute(x, idx, case.E, case.alignment)
    M = case.N * case.k + case.E * (case.alignment - 1)
    for dtype in DTYPES:
        y = torch.randn(M, case.D, generator=gen).to(dtype)
        w = torch.rand(case.N, case.k, generator=gen)
        out = glm5.ops.moe_unpermute(y, row_map, w)
        truth = reference.moe_unpermute(y.double(), row_map, w.double())
        lowp = reference.moe_unpermute(y, row_map, w)
        assert out.dtype == dtype
        assert_close_to_ref(out, truth, lowp, name=f"out {dname(dtype)}")


def test_permute_unpermute_exact_integers():
    # integer-valued rows and weights: every sum is exact, so both orders agree bit for bit
    gen = torch.Generator().manual_seed(0)
    case = PermCase(N=40, E=11, k=3, D=6, alignment=8, load="dropped")
    idx = make_topk(case.N, case.E, case.k, case.load, gen)
    x = torch.randint(-8, 9, (case.N, case.D), generator=gen).float()
    w = torch.randint(-3, 4, (case.N, case.k), generator=gen).float()
    x_sorted, row_map, _ = glm5.ops.moe_permute(x, idx, case.E, case.alignment)
    out = glm5.ops.moe_unpermute(x_sorted, row_map, w)
    expect = (w * (idx >= 0)).sum(1, keepdim=True) * x
    assert torch.equal(out, expect)


@dataclass(frozen=True)
class GemmCase:
    counts: tuple[int, ...]  # rows per expert
    K: int
    N: int
    lead: int = 0  # rows before offsets[0] (zero in the output)
    tail: int = 0  # rows after offsets[E] (zero in the output)

    def __str__(self) -> str:
        c = self.counts if len(self.counts) <= 6 else f"{len(self.counts)}x~{sum(self.counts) // len(self.counts)}"
        s = f"E{len(self.counts)}-rows{c}-K{self.K}-N{self.N}".replace(" ", "")
        return s + (f"-lead{self.lead}" if self.lead else "") + (f"-tail{self.tail}" if self.tail else "")


def _counts(E: int, lo: int, hi: int, seed: int) -> tuple[int, ...]:
    return tuple(torch.randint(lo, hi + 1, (E,), generator=torch.Generator().manual_seed(seed)).tolist())


GEMM_CASES = [
    GemmCase(counts=(16, 16, 16, 16), K=32, N=24),
    GemmCase(counts=(5, 0, 17, 1, 0, 9), K=19, N=13),  # irregular, empty experts
    GemmCase(counts=(0, 0, 0), K=8, N=8),  # no rows at all
    GemmCase(counts=(0, 33, 0), K=8, N=40, lead=3, tail=4),  # one expert, rows outside the groups
    GemmCase(counts=(150, 90, 0), K=40, N=24),  # big experts: one multi-threaded GEMM each
    GemmCase(counts=_counts(70, 0, 3, 1), K=24, N=16),  # many tiny experts: experts in parallel
    GemmCase(counts=_counts(12, 0, 80, 2), K=72, N=48, tail=5),  # very uneven
]


def gemm_inputs(case: GemmCase, dtype, trans_w=False, integer=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    E, M = len(case.counts), case.lead + sum(case.counts) + case.tail

    def draw(*shape):
        return torch.randint(-4, 5, shape, generator=gen).float() if integer else torch.randn(*shape, generator=gen)

    x = draw(M, case.K).to(dtype)
    w = (draw(E, case.K, case.N) if trans_w else draw(E, case.N, case.K)).to(dtype)
    offsets = torch.tensor([0, *case.counts]).cumsum(0) + case.lead
    return x, w, offsets


def gemm_tols(out, truth, lowp):
    assert_close_to_ref(out, truth, lowp)
    assert calc_diff(out, truth) < 1e-5


@pytest.mark.parametrize("trans_w", [False, True], ids=["nt", "nn"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("case", GEMM_CASES, ids=str)
def test_grouped_gemm_matches_reference(case, dtype, trans_w):
    x, w, offsets = gemm_inputs(case, dtype, trans_w)
    y = glm5.ops.grouped_gemm(x, w, offsets, trans_w)
    assert y.dtype == dtype
    truth = reference.grouped_gemm(x.double(), w.double(), offsets, trans_w)
    gemm_tols(y, truth, reference.grouped_gemm(x, w, offsets, trans_w))
    if case.lead or case.tail:
        assert not y[: case.lead].any() and not y[y.shape[0] - case.tail :].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("case", GEMM_CASES, ids=str)
def test_grouped_gemm_wgrad_matches_reference(case, dtype):
    x, w, offsets = gemm_inputs(case, dtype)
    dy = torch.randn(x.shape[0], case.N, generator=torch.Generator().manual_seed(1)).to(dtype)
    dw = glm5.ops.grouped_gemm_wgrad(dy, x, offsets)
    assert dw.shape == (len(case.counts), case.N, case.K) and dw.dtype == dtype
    truth = reference.grouped_gemm_wgrad(dy.double(), x.double(), offsets)
    gemm_tols(dw, truth, reference.grouped_gemm_wgrad(dy, x, offsets))
    empty = torch.tensor(case.counts) == 0
    assert not dw[empty].any(), "experts without rows get a zero gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dname)
@pytest.mark.parametrize("case", [GEMM_CASES[1], GEMM_CASES[4], GEMM_CASES[5]], ids=str)
def test_grouped_gemm_exact_integers(case, dtype):
    # small integers: every product and partial sum is exact in fp32 accumulation
    for trans_w in (False, True):
        x, w, offsets = gemm_inputs(case, dtype, trans_w, integer=True)
        exact = reference.grouped_gemm(x.double(), w.double(), offsets, trans_w).to(dtype)
        assert torch.equal(glm5.ops.grouped_gemm(x, w, offsets, trans_w), exact)
    x, _, offsets = gemm_inputs(case, dtype, integer=True)
    dy = torch.randint(-3, 4, (x.shape[0], 5), generator=torch.Generator().manual_seed(2)).to(dtype)
    exact = reference.grouped_gemm_wgrad(dy.double(), x.double(), offsets).to(dtype)
    assert torch.equal(glm5.ops.grouped_gemm_wgrad(dy, x, offsets), exact)


# ---- moe_experts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoECase:
    N: int
    E: int
    k: int
    D: int
    F: int
    load: str = "uniform"

    def __str__(self) -> str:
        return f"N{self.N}-E{self.E}-k{self.k}-D{self.D}-F{self.F}-{self.load}"


MOE_CASES = [
    MoECase(N=24, E=8, k=2, D=32, F=16),
    MoECase(N=37, E=13, k=3, D=20, F=12),  # irregular
    MoECase(N=64, E=32, k=4, D=16, F=8, load="skewed"),  # uneven, empty experts
    MoECase(N=30, E=6, k=3, D=12, F=10, load="dropped"),  # -1 slots contribute nothing
    MoECase(N=12, E=4, k=4, D=8, F=8),  # topk == num_experts
]
TINY = MoECase(N=6, E=4, k=2, D=5, F=3, load="skewed")


def moe_inputs(case: MoECase, dtype, requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.N, case.D, generator=gen)
    w_gate_up = torch.randn(case.E, 2 * case.F, case.D, generator=gen) * case.D**-0.5
    w_down = torch.randn(case.E, case.D, case.F, generator=gen) * case.F**-0.5
    topk_w = torch.rand(case.N, case.k, generator=gen) + 0.1
    idx = make_topk(case.N, case.E, case.k, case.load, gen)
    ts = [t.to(dtype).requires_grad_(requires_grad) for t in (x, w_gate_up, w_down)]
    topk_w = topk_w.to(reference.acc_dtype(ts[0])).requires_grad_(requires_grad)
    return ts[0], idx, topk_w, ts[1], ts[2]


def _grads(fn, x, idx, w, wg, wd, gout):
    out = fn(x, idx, w, wg, wd)
    return (out.detach(), *torch.autograd.grad(out, (x, w, wg, wd), gout))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dname)  # fp64: gradcheck
@pytest.mark.parametrize("case", MOE_CASES, ids=str)
def test_moe_experts_fwd_bwd_matches_reference(case, dtype):
    x, idx, w, wg, wd = moe_inputs(case, dtype, requires_grad=True)
    gout = torch.randn(case.N, case.D, generator=torch.Generator().manual_seed(9)).to(dtype)
    got = _grads(glm5.ops.moe_experts, x, idx, w, wg, wd, gout)
    lowp = _grads(reference.moe_experts, x, idx, w, wg, wd, gout)
    up = [t.detach().double().requires_grad_(True) for t in (x, w, wg, wd)]
    truth = _grads(reference.moe_experts, up[0], idx, up[1], up[2], up[3], gout.double())
    for name, a, t, lp in zip(("out", "dx", "dtopk_w", "dw_gate_up", "dw_down"), got, truth, lowp):
        assert a.dtype == lp.dtype, name
        assert_close_to_ref(a, t, lp, factor=3.0, name=name)


def test_moe_experts_plumbing_exact():
    # SwiGLU rules out exact integer outputs, so check the composite's plumbing exactly instead:
    # the grouped GEMM over the permuted buffer equals the per-expert loop's GEMMs bit for bit
    case = MOE_CASES[1]
    x, idx, w, wg, wd = moe_inputs(case, torch.float64)
    x_sorted, row_map, offsets = glm5.ops.moe_permute(x, idx, case.E)
    h = glm5.ops.grouped_gemm(x_sorted, wg, offsets)
    for e in range(case.E):
        tok, _ = torch.where(idx == e)
        assert torch.equal(h[offsets[e] : offsets[e + 1]], x[tok] @ wg[e].T)


def test_moe_experts_gradcheck_fp64():
    x, idx, w, wg, wd = moe_inputs(TINY, torch.float64, requires_grad=True)
    fn = lambda *a: glm5.ops.moe_experts(a[0], idx, *a[1:])  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, wg, wd), fast_mode=True)  # 222 inputs: a random projection


def test_ops_gradcheck_fp64():
    gen = torch.Generator().manual_seed(0)
    case = PermCase(N=5, E=4, k=2, D=3, alignment=4, load="dropped")
    x, idx = perm_inputs(case, torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: glm5.ops.moe_permute(t, idx, case.E, case.alignment)[0], (x,))
    _, row_map, _ = reference.moe_permute(x, idx, case.E, case.alignment)
    y = torch.randn(case.N * case.k + case.E * 3, case.D, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(case.N, case.k, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: glm5.ops.moe_unpermute(a, row_map, b), (y, w))
    for trans_w in (False, True):
        xg, wgt, offsets = gemm_inputs(GemmCase(counts=(2, 0, 3), K=3, N=4, lead=1, tail=1), torch.float64, trans_w)
        xg.requires_grad_(True)
        wgt.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda a, b: glm5.ops.grouped_gemm(a, b, offsets, trans_w), (xg, wgt))


def _opcheck_samples():
    case = PermCase(N=5, E=4, k=2, D=3, alignment=4, load="dropped")
    x, idx = perm_inputs(case)
    _, row_map, _ = reference.moe_permute(x, idx, case.E, case.alignment)
    M = case.N * case.k + case.E * 3
    y, w = torch.randn(M, case.D), torch.rand(case.N, case.k)
    xg, wg, off = gemm_inputs(GemmCase(counts=(2, 0, 3), K=3, N=4, lead=1, tail=1), torch.float32)
    xt, wt, _ = gemm_inputs(GemmCase(counts=(2, 0, 3), K=3, N=4, lead=1, tail=1), torch.float32, trans_w=True)
    rg = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    ops = torch.ops.glm5
    return [
        ("permute", ops.moe_permute.default, (x, idx, case.E, case.alignment)),
        ("permute_grad", ops.moe_permute.default, (rg(x), idx, case.E, 1)),
        ("unpermute", ops.moe_unpermute.default, (rg(y), row_map, rg(w))),
        ("unpermute_bwd", ops.moe_unpermute_bwd.default, (torch.randn(case.N, case.D), y, row_map, w)),
        ("gemm", ops.grouped_gemm.default, (rg(xg), rg(wg), off, False)),
        ("gemm_nn", ops.grouped_gemm.default, (rg(xt), rg(wt), off, True)),
        ("gemm_bf16", ops.grouped_gemm.default, (xg.bfloat16(), wg.bfloat16(), off)),
        ("wgrad", ops.grouped_gemm_wgrad.default, (torch.randn(xg.shape[0], 4), xg, off)),
    ]


@pytest.mark.parametrize("name, op, args", _opcheck_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, op, args):
    if name == "permute_grad":
        # opcheck's aot check sums all outputs into the first (x_sorted); row_map and offsets are
        # integers, which that sum cannot hold: check autograd registration and fakes with grads.
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    else:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_fwd_bwd():
    x, idx, w, wg, wd = moe_inputs(MOE_CASES[0], torch.float32, requires_grad=True)
    logits = torch.randn(x.shape[0], MOE_CASES[0].E, requires_grad=True)

    def layer(x, logits, wg, wd):
        topk_idx, topk_w = glm5.ops.moe_route(logits, None, 2, routed_scaling_factor=2.5)
        return glm5.ops.moe_experts(x, topk_idx, topk_w, wg, wd)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager_out = layer(x, logits, wg, wd)
    out = compiled(x, logits, wg, wd)
    assert torch.equal(out, eager_out)
    g_eager = torch.autograd.grad(eager_out.square().sum(), (x, logits, wg, wd))
    g_comp = torch.autograd.grad(out.square().sum(), (x, logits, wg, wd))
    for a, b in zip(g_comp, g_eager):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_deterministic_fwd_bwd():
    case = MoECase(N=200, E=16, k=4, D=64, F=32, load="skewed")
    x, idx, w, wg, wd = moe_inputs(case, torch.bfloat16, requires_grad=True)
    gout = torch.randn(case.N, case.D).bfloat16()
    a = _grads(glm5.ops.moe_experts, x, idx, w, wg, wd, gout)
    b = _grads(glm5.ops.moe_experts, x, idx, w, wg, wd, gout)
    for s, t in zip(a, b):
        assert torch.equal(s, t)


def test_data_movement_thread_independent():
    case = PermCase(N=300, E=16, k=4, D=40, alignment=8, load="dropped")
    x, idx = perm_inputs(case, torch.bfloat16)
    gen = torch.Generator().manual_seed(5)
    w = torch.rand(case.N, case.k, generator=gen)
    g = torch.randn(case.N, case.D, generator=gen).bfloat16()

    def run():
        x_sorted, row_map, offsets = glm5.ops.moe_permute(x, idx, case.E, case.alignment)
        out = glm5.ops.moe_unpermute(x_sorted, row_map, w)
        return (x_sorted, row_map, offsets, out, *torch.ops.glm5.moe_unpermute_bwd(g, x_sorted, row_map, w))

    many = run()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
    finally:
        torch.set_num_threads(threads)
    for s, t in zip(many, one):
        assert torch.equal(s, t)


def test_reference_impl_switch():
    x, idx, w, wg, wd = moe_inputs(MOE_CASES[1], torch.float64)
    with glm5.ops.use_impl("reference"):
        ref = glm5.ops.moe_experts(x, idx, w, wg, wd)
        assert torch.equal(glm5.ops.moe_permute(x, idx, 13)[0], reference.moe_permute(x, idx, 13)[0])
    assert torch.allclose(glm5.ops.moe_experts(x, idx, w, wg, wd), ref, rtol=1e-12, atol=1e-12)


# ---- bad input ---------------------------------------------------------------------------------

_x, _idx = torch.randn(4, 3), torch.tensor([[0, 1], [2, 0], [1, 1], [2, -1]], dtype=torch.int32)
_y, _rm, _w = torch.randn(8, 3), torch.tensor([[0, 1], [2, 3], [4, 5], [6, -1]], dtype=torch.int32), torch.rand(4, 2)
_gx, _gw, _off = torch.randn(6, 4), torch.randn(2, 5, 4), torch.tensor([0, 2, 6])

ops = glm5.ops
BOTH, KERNEL = ("kernel", "reference"), ("kernel",)  # the reference does not check dtypes
SHAPE = (RuntimeError, ValueError)  # the kernels' shape checks raise RuntimeError, the references' ValueError
_gidx = torch.tensor([[0], [1], [2], [0], [1], [2]], dtype=torch.int32)

BAD = [
    # (name, function, expected exception, message must mention, impls that must raise it)
    ("permute-idx-high", lambda: ops.moe_permute(_x, _idx, 2), IndexError, "topk_idx", BOTH),
    ("permute-idx-neg", lambda: ops.moe_permute(_x, _idx - 2, 3), IndexError, "topk_idx", BOTH),
    ("permute-idx-int64", lambda: ops.moe_permute(_x, _idx.long(), 3), SHAPE, "topk_idx", BOTH),
    ("permute-idx-rows", lambda: ops.moe_permute(_x, _idx[:3], 3), SHAPE, "topk_idx", BOTH),
    ("permute-x-3d", lambda: ops.moe_permute(_x[None], _idx, 3), SHAPE, "x", BOTH),
    ("permute-x-int", lambda: ops.moe_permute(_x.int(), _idx, 3), RuntimeError, "x", KERNEL),
    ("permute-align0", lambda: ops.moe_permute(_x, _idx, 3, 0), ValueError, "alignment", BOTH),
    ("permute-experts0", lambda: ops.moe_permute(_x, _idx, 0), ValueError, "num_experts", BOTH),
    ("unpermute-row-high", lambda: ops.moe_unpermute(_y, _rm + 2, _w), IndexError, "row_map", BOTH),
    ("unpermute-row-twice", lambda: ops.moe_unpermute(_y, _rm.clamp(max=4), _w), ValueError, "row_map", BOTH),
    ("unpermute-w-shape", lambda: ops.moe_unpermute(_y, _rm, _w[:, :1]), SHAPE, "topk_w", BOTH),
    ("unpermute-y-int", lambda: ops.moe_unpermute(_y.int(), _rm, _w), RuntimeError, "y_sorted", KERNEL),
    ("unpermute-bwd-grad", lambda: torch.ops.glm5.moe_unpermute_bwd(torch.randn(3, 3), _y, _rm, _w), RuntimeError, "grad",
     KERNEL),
    ("gemm-offsets-decreasing", lambda: ops.grouped_gemm(_gx, _gw, torch.tensor([0, 4, 3])), ValueError, "offsets", BOTH),
    ("gemm-offsets-past-M", lambda: ops.grouped_gemm(_gx, _gw, torch.tensor([0, 2, 7])), ValueError, "offsets", BOTH),
    ("gemm-offsets-negative", lambda: ops.grouped_gemm(_gx, _gw, torch.tensor([-1, 2, 6])), ValueError, "offsets", BOTH),
    ("gemm-offsets-length", lambda: ops.grouped_gemm(_gx, _gw, torch.tensor([0, 6])), ValueError, "offsets", BOTH),
    ("gemm-offsets-int32", lambda: ops.grouped_gemm(_gx, _gw, _off.int()), ValueError, "offsets", BOTH),
    ("gemm-K", lambda: ops.grouped_gemm(_gx, _gw[..., :3], _off), SHAPE, "K", BOTH),
    ("gemm-K-trans", lambda: ops.grouped_gemm(_gx, _gw, _off, True), SHAPE, "K", BOTH),
    ("gemm-w-2d", lambda: ops.grouped_gemm(_gx, _gw[0], _off), SHAPE, "w", BOTH),
    ("gemm-w-dtype", lambda: ops.grouped_gemm(_gx, _gw.double(), _off), RuntimeError, "w", KERNEL),
    ("wgrad-M", lambda: ops.grouped_gemm_wgrad(torch.randn(5, 5), _gx, _off), SHAPE, "x|M", BOTH),
    ("wgrad-offsets", lambda: ops.grouped_gemm_wgrad(torch.randn(6, 5), _gx, torch.tensor([0, 3, 2])), ValueError,
     "offsets", BOTH),
    ("experts-shapes", lambda: ops.moe_experts(_gx, _gidx, torch.rand(6, 1), torch.randn(3, 6, 4), torch.randn(3, 4, 2)),
     SHAPE, "w_down|shape", BOTH),
    ("experts-idx", lambda: ops.moe_experts(_x, _idx, torch.rand(4, 2), torch.randn(2, 4, 3), torch.randn(2, 3, 2)),
     IndexError, "topk_idx", BOTH),
]


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("name, fn, exc, match, impls", BAD, ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(name, fn, exc, match, impls, impl):
    if impl not in impls:
        pytest.skip(f"{name}: only the kernel checks this")
    with glm5.ops.use_impl(impl), pytest.raises(exc, match=match):
        fn()


# ---- weight layouts, schedules, transformers ----------------------------------------------------


@pytest.mark.parametrize("layout", ["expanded", "overlapping", "transposed"])
def test_grouped_gemm_weight_views(layout):
    # expert weights as views: no copy when every w[e] is a contiguous matrix, a copy otherwise
    gen = torch.Generator().manual_seed(0)
    E, N, K, M = 5, 12, 16, 30
    if layout == "expanded":
        w = torch.randn(N, K, generator=gen)[None].expand(E, N, K)
    elif layout == "overlapping":
        w = torch.randn(N * K + 8 * E, generator=gen).as_strided((E, N, K), (8, K, 1))
    else:
        w = torch.randn(E, K, N, generator=gen).transpose(1, 2)
    x = torch.randn(M, K, generator=gen)
    offsets = torch.tensor([0, 4, 4, 13, 29, 30])
    gemm_tols(glm5.ops.grouped_gemm(x, w, offsets), reference.grouped_gemm(x.double(), w.double(), offsets), None)


@pytest.mark.parametrize("schedule", ["serial", "experts", "auto"])
def test_grouped_gemm_schedules(schedule, monkeypatch):
    # every expert on its own multi-threaded GEMM, or runs of experts in parallel: same results
    monkeypatch.setenv("GLM5_MOE_GEMM_SCHEDULE", schedule)
    case = GemmCase(counts=(300, 3, 0, 40, 1, 260, 7), K=24, N=20, lead=2)
    x, w, offsets = gemm_inputs(case, torch.float32)
    gemm_tols(glm5.ops.grouped_gemm(x, w, offsets), reference.grouped_gemm(x.double(), w.double(), offsets), None)
    dy = torch.randn(x.shape[0], case.N, generator=torch.Generator().manual_seed(1))
    dw = glm5.ops.grouped_gemm_wgrad(dy, x, offsets)
    gemm_tols(dw, reference.grouped_gemm_wgrad(dy.double(), x.double(), offsets), None)


def test_grouped_gemm_bad_schedule(monkeypatch):
    monkeypatch.setenv("GLM5_MOE_GEMM_SCHEDULE", "fastest")
    x, w, offsets = gemm_inputs(GEMM_CASES[0], torch.float32)
    with pytest.raises(ValueError, match="GLM5_MOE_GEMM_SCHEDULE"):
        glm5.ops.grouped_gemm(x, w, offsets)


def test_moe_experts_matches_transformers():
    hf = pytest.importorskip("transformers.models.glm_moe_dsa.modeling_glm_moe_dsa")
    from transformers import GlmMoeDsaConfig

    cfg = GlmMoeDsaConfig(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4,
                          n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5)
    moe = hf.GlmMoeDsaMoE(cfg).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * p.shape[-1] ** -0.5)
        moe.gate.e_score_correction_bias.copy_(torch.randn(16, generator=gen) * 0.1)
    h = torch.randn(2, 20, 32, generator=gen, dtype=torch.float64)
    logits = torch.nn.functional.linear(h.view(-1, 32).float(), moe.gate.weight.float())  # an fp32 router, as HF
    idx, w = glm5.ops.moe_route(logits, moe.gate.e_score_correction_bias, 4, n_group=4, topk_group=2,
                                routed_scaling_factor=2.5)
    out = glm5.ops.moe_experts(h.view(-1, 32), idx, w.to(h.dtype), moe.experts.gate_up_proj, moe.experts.down_proj)
    out = out.view_as(h) + moe.shared_experts(h)
    with torch.no_grad():
        expect = moe(h)
    # the fp32 router weights may differ by an ulp (the order of their sum): fp32-level agreement
    assert torch.allclose(out, expect, rtol=1e-6, atol=1e-6)
