"""glm5.ops.moe_route (CPU kernel) against reference.moe_route, and the load-balancing helpers.

The choice must match exactly (the kernel takes its sigmoid scores from the same ATen call as the
reference, and both break ties by the smaller index); the weights may differ by the rounding of
their sum. Gradients reach the logits through the weights only.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import glm5
from glm5.ops import reference
from numerics import assert_close_to_ref

ROUTE = torch.ops.glm5.moe_route


@dataclass(frozen=True)
class Case:
    N: int
    E: int
    topk: int
    n_group: int = 1
    topk_group: int = 1
    norm: bool = True
    scale: float = 1.0
    bias: bool = True
    ties: str = ""  # "" | "all" (every score equal) | "coarse" (logits rounded: many equal scores)
    dtype: torch.dtype = torch.float32

    def __str__(self) -> str:
        s = f"N{self.N}-E{self.E}-k{self.topk}"
        if self.n_group > 1:
            s += f"-g{self.n_group}of{self.topk_group}"
        s += ("" if self.norm else "-nonorm") + (f"-x{self.scale}" if self.scale != 1.0 else "")
        s += ("" if self.bias else "-nobias") + (f"-ties_{self.ties}" if self.ties else "")
        return s + ("" if self.dtype == torch.float32 else f"-{str(self.dtype).split('.')[-1]}")


CASES = [
    # GLM-5: 256 experts, top-8, no groups, scaling 2.5
    Case(N=33, E=256, topk=8, scale=2.5),
    # irregular sizes, no bias, no renormalisation
    Case(N=7, E=13, topk=3, bias=False),
    Case(N=5, E=9, topk=4, norm=False, scale=0.7),
    Case(N=1, E=1, topk=1),
    # topk == num_experts: every expert, ordered by biased score
    Case(N=6, E=8, topk=8),
    # DeepSeek-V3 style group-limited routing (8 groups, keep 4) and small irregular groupings
    Case(N=19, E=64, topk=8, n_group=8, topk_group=4, scale=2.5),
    Case(N=11, E=12, topk=2, n_group=6, topk_group=1),  # groups of 2: exactly the top-2 sum
    Case(N=9, E=10, topk=3, n_group=10, topk_group=3),  # groups of one expert
    Case(N=8, E=16, topk=8, n_group=4, topk_group=2),  # the kept groups hold exactly topk experts
    # ties: equal scores must go to the smaller index, exactly, in the experts and in the groups
    Case(N=4, E=16, topk=5, bias=False, ties="all"),
    Case(N=4, E=16, topk=4, n_group=4, topk_group=2, bias=False, ties="all"),
    Case(N=25, E=32, topk=6, ties="coarse"),
    Case(N=25, E=32, topk=6, n_group=4, topk_group=2, ties="coarse"),
    # input dtypes: the scores are fp32 (fp64 for fp64 logits) whatever the logits' dtype
    Case(N=10, E=24, topk=4, dtype=torch.bfloat16),
    Case(N=10, E=24, topk=4, n_group=4, topk_group=2, dtype=torch.float64),
]
TINY = [Case(N=4, E=6, topk=2, n_group=3, topk_group=2, scale=2.5)]


def make_inputs(case: Case, requires_grad: bool = False):
    g = torch.Generator().manual_seed(1000 + case.N * 31 + case.E)
    logits = torch.randn(case.N, case.E, generator=g) * 2
    bias = (torch.randn(case.E, generator=g) * 0.1) if case.bias else None
    if case.ties == "all":
        logits = torch.zeros_like(logits)
    elif case.ties == "coarse":
        logits = logits.round()
        bias = None if bias is None else (bias * 4).round() / 4  # exactly representable sums
    logits = logits.to(case.dtype).requires_grad_(requires_grad)
    return logits, bias


def route_kwargs(case: Case) -> dict:
    return dict(
        n_group=case.n_group, topk_group=case.topk_group, norm_topk_prob=case.norm, routed_scaling_factor=case.scale
    )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_route_matches_reference(case):
    logits, bias = make_inputs(case)
    idx, w = glm5.ops.moe_route(logits, bias, case.topk, **route_kwargs(case))
    ref_idx, ref_w = reference.moe_route(logits, bias, case.topk, **route_kwargs(case))
    assert idx.dtype == torch.int32 and w.dtype == reference.acc_dtype(logits)
    assert torch.equal(idx, ref_idx), f"choice differs in rows {(idx != ref_idx).any(1).nonzero().flatten().tolist()}"
    assert_close_to_ref(w, ref_w, name="topk_w")


def test_route_ties_smaller_index_wins():
    logits = torch.zeros(3, 8)
    idx, w = glm5.ops.moe_route(logits, None, 3)
    assert idx.tolist() == [[0, 1, 2]] * 3
    assert torch.equal(w, torch.full((3, 3), 1 / 3))
    # a bias lifts expert 6 above the rest; then 0 and 1 as the smaller tied indices
    bias = torch.zeros(8)
    bias[6] = 0.25
    idx, w = glm5.ops.moe_route(logits, bias, 3)
    assert idx.tolist() == [[6, 0, 1]] * 3
    assert torch.equal(w, torch.full((3, 3), 1 / 3)), "the bias must not change the weights"
    # equal group scores: groups 0 and 1 win over 2 and 3
    idx, _ = glm5.ops.moe_route(torch.zeros(2, 8), None, 4, n_group=4, topk_group=2)
    assert idx.tolist() == [[0, 1, 2, 3]] * 2


def test_route_group_limited_excludes_better_expert():
    # expert 7 alone has the best score, but its group's top-2 sum loses: it must not be chosen
    logits = torch.tensor([[0.0, 1.2, 1.2, 0.0, 0.0, 0.0, -5.0, 3.0]])
    idx, _ = glm5.ops.moe_route(logits, None, 2, n_group=2, topk_group=1)
    assert idx.tolist() == [[1, 2]]
    idx, _ = glm5.ops.moe_route(logits, None, 2)
    assert idx.tolist() == [[7, 1]]


@pytest.mark.parametrize("case", [c for c in CASES if c.ties != "all" and c.dtype != torch.bfloat16], ids=str)
def test_route_backward_matches_reference(case):
    logits, bias = make_inputs(case, requires_grad=True)
    gw = torch.randn(case.N, case.topk, dtype=reference.acc_dtype(logits))
    _, w = glm5.ops.moe_route(logits, bias, case.topk, **route_kwargs(case))
    (grad,) = torch.autograd.grad(w, logits, gw)
    truth_logits = logits.detach().double().requires_grad_(True)
    _, w_ref = reference.moe_route(truth_logits, bias, case.topk, **route_kwargs(case))
    (truth,) = torch.autograd.grad(w_ref, truth_logits, gw.double())
    assert_close_to_ref(grad, truth, name="dlogits", floor=8 * torch.finfo(grad.dtype).eps * max(1.0, float(truth.abs().max())))


@pytest.mark.parametrize("norm", [True, False])
def test_route_gradcheck_fp64(norm):
    case = TINY[0]
    logits, bias = make_inputs(Case(**{**case.__dict__, "dtype": torch.float64, "norm": norm}), requires_grad=True)
    fn = lambda lg: glm5.ops.moe_route(lg, bias, case.topk, n_group=3, topk_group=2, norm_topk_prob=norm,  # noqa: E731
                                       routed_scaling_factor=2.5)[1]
    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("case", TINY, ids=str)
def test_route_opcheck(case):
    logits, bias = make_inputs(case, requires_grad=True)
    args = (logits, bias, case.topk, case.n_group, case.topk_group, case.norm, case.scale)
    # opcheck's aot-autograd check sums every output into the first one, which is int32 here, so it
    # runs without gradients; autograd is covered by the registration check, gradcheck and compile.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ROUTE, args, test_utils=utils)
    torch.library.opcheck(ROUTE, (logits.detach(), *args[1:]))
    torch.library.opcheck(ROUTE, (logits.detach(), None, 6))


def test_route_deterministic_and_thread_independent():
    case = CASES[0]
    logits, bias = make_inputs(case)
    runs = [glm5.ops.moe_route(logits, bias, case.topk, **route_kwargs(case)) for _ in range(2)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        runs.append(glm5.ops.moe_route(logits, bias, case.topk, **route_kwargs(case)))
    finally:
        torch.set_num_threads(threads)
    for idx, w in runs[1:]:
        assert torch.equal(idx, runs[0][0]) and torch.equal(w, runs[0][1])


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(topk=9), ValueError, "topk"),
        (dict(topk=0), ValueError, "topk"),
        (dict(topk=2, n_group=3), ValueError, "n_group"),
        (dict(topk=2, n_group=4, topk_group=5), ValueError, "topk_group"),
        (dict(topk=5, n_group=4, topk_group=2), ValueError, "topk_group"),
        (dict(bias=torch.zeros(7)), (ValueError, RuntimeError), "bias"),
        (dict(logits=torch.zeros(3, 8, 1)), (ValueError, RuntimeError), "logits"),
        (dict(logits=torch.full((3, 8), float("nan"))), ValueError, "NaN"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else None,
)
def test_route_bad_input(impl, kwargs, exc, match):
    args = dict(logits=torch.randn(3, 8), bias=None, topk=2)
    args.update(kwargs)
    with glm5.ops.use_impl(impl), pytest.raises(exc, match=match):
        glm5.ops.moe_route(args.pop("logits"), args.pop("bias"), args.pop("topk"), **args)


def test_route_bad_dtype():
    with pytest.raises(RuntimeError, match="logits"):
        glm5.ops.moe_route(torch.zeros(3, 8, dtype=torch.int32), None, 2)
    with pytest.raises(RuntimeError, match="bias"):
        glm5.ops.moe_route(torch.zeros(3, 8), torch.zeros(8, dtype=torch.int64), 2)


# ---- load balancing ---------------------------------------------------------------------------


def test_expert_load_counts_and_skips_dropped():
    idx = torch.tensor([[0, 3], [3, -1], [2, 0]], dtype=torch.int32)
    assert glm5.ops.expert_load(idx, 5).tolist() == [2, 0, 1, 2, 0]
    with pytest.raises(IndexError, match="topk_idx"):
        glm5.ops.expert_load(idx, 3)


def test_update_router_bias():
    bias = torch.zeros(4)
    out = glm5.ops.update_router_bias(bias, torch.tensor([5, 1, 3, 3]), 0.01)  # mean 3
    assert out is bias
    assert torch.equal(bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    with pytest.raises(ValueError, match="load"):
        glm5.ops.update_router_bias(bias, torch.zeros(3), 0.01)


def test_balancing_evens_out_a_skewed_router():
    # a router that prefers the low experts: loss-free balancing must spread the load
    g = torch.Generator().manual_seed(0)
    E, k, N = 16, 2, 512
    skew = torch.linspace(2, -2, E)
    bias = torch.zeros(E)
    first = None
    for _ in range(300):
        logits = torch.randn(N, E, generator=g) + skew
        idx, _ = glm5.ops.moe_route(logits, bias, k)
        load = glm5.ops.expert_load(idx, E)
        first = load if first is None else first
        glm5.ops.update_router_bias(bias, load, 0.01)
    assert float(load.max()) / float(load.float().mean()) < 0.5 * float(first.max()) / float(first.float().mean())


def test_sequence_balance_loss():
    g = torch.Generator().manual_seed(0)
    N, E, k = 10, 6, 2
    logits = torch.randn(N, E, generator=g, dtype=torch.float64, requires_grad=True)
    idx, _ = glm5.ops.moe_route(logits.detach(), None, k)
    loss = glm5.ops.sequence_balance_loss(logits, idx, [4, 6])
    # the formula, one sequence at a time
    expect = 0.0
    for lo, hi in ((0, 4), (4, 10)):
        s = logits[lo:hi].sigmoid()
        p = (s / s.sum(1, keepdim=True)).mean(0)
        f = torch.bincount(idx[lo:hi].flatten().long(), minlength=E).double() * E / (k * (hi - lo))
        expect = expect + (f * p).sum() / 2
    assert torch.allclose(loss, expect)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # perfectly balanced uniform routing gives exactly 1
    uniform = glm5.ops.sequence_balance_loss(torch.zeros(4, 4), torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]], dtype=torch.int32))
    assert float(uniform) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="seq_lens"):
        glm5.ops.sequence_balance_loss(logits, idx, [4, 5])


# ---- transformers' GlmMoeDsa router (optional) --------------------------------------------------


@pytest.mark.parametrize("n_group, topk_group", [(1, 1), (4, 2)])
def test_route_matches_transformers(n_group, topk_group):
    hf = pytest.importorskip("transformers.models.glm_moe_dsa.modeling_glm_moe_dsa")
    from transformers import GlmMoeDsaConfig

    cfg = GlmMoeDsaConfig(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4,
                          n_group=n_group, topk_group=topk_group, n_shared_experts=1, routed_scaling_factor=2.5)
    gate = hf.GlmMoeDsaTopkRouter(cfg)
    with torch.no_grad():
        gate.weight.normal_(generator=torch.Generator().manual_seed(0))
        gate.e_score_correction_bias.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
    h = torch.randn(40, 32, generator=torch.Generator().manual_seed(2))
    logits, w_hf, idx_hf = gate(h)
    idx, w = glm5.ops.moe_route(logits, gate.e_score_correction_bias, 4, n_group=n_group, topk_group=topk_group,
                                routed_scaling_factor=2.5)
    # transformers' torch.topk(sorted=False) leaves the slot order unspecified: compare by expert
    order_hf, order = idx_hf.argsort(dim=1), idx.long().argsort(dim=1)
    assert torch.equal(idx_hf.gather(1, order_hf), idx.long().gather(1, order))
    assert torch.allclose(w_hf.gather(1, order_hf), w.gather(1, order), rtol=1e-6, atol=1e-7)
