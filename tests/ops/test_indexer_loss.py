"""glm5.ops.indexer_kl_loss (the DSA indexer's KL training loss) against reference.indexer_kl_loss.

The target p comes from a real main attention: a dense attention over the visible keys (dense mode)
or reference.sparse_mla over the selected keys (sparse mode), whose lse the loss recomputes p from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

import glm5
from glm5.ops import reference
from numerics import assert_close_to_ref

LOSS_FWD = torch.ops.glm5.indexer_kl_loss_fwd
LOSS_BWD = torch.ops.glm5.indexer_kl_loss_bwd


@dataclass(frozen=True)
class Case:
    T: int
    S: int
    HI: int = 4
    DI: int = 16
    H: int = 4
    D: int = 24
    K: int | None = None  # None: dense mode (every visible key); else the sparse stage's top-k width
    docs: int = 1  # packed documents: queries after the first boundary have ks > 0
    empty_every: int = 0  # every n-th query (from the 2nd) sees no key: ke = ks
    outside: float = 0.0  # sparse: share of slots holding a key outside [ks, ke) (dropped by the loss)
    pad: float = 0.0  # sparse: share of -1 slots
    dup: bool = False  # sparse: a key repeated in two slots of a row (counts twice)
    dead_rows: int = 0  # sparse: rows whose every slot is invalid (main lse = +inf, empty set)
    lse_inf: bool = False  # some rows (all heads) and some single heads get lse = +inf: p = 0 there

    def __str__(self) -> str:
        mode = "dense" if self.K is None else f"K{self.K}"
        s = f"{mode}-T{self.T}-S{self.S}-HI{self.HI}x{self.DI}-H{self.H}x{self.D}"
        for f in ("docs", "empty_every", "outside", "pad", "dup", "dead_rows", "lse_inf"):
            v, default = getattr(self, f), Case.__dataclass_fields__[f].default
            if v != default:
                s += f"-{f}" if v is True else f"-{f}{v}"
        return s


DENSE = [
    Case(T=1, S=1),  # one key: p = softmax(I) = 1, KL = 0
    Case(T=13, S=13, HI=3, DI=5, H=3, D=7),  # irregular head counts and widths
    Case(T=40, S=300, docs=3),  # the last 40 queries of 300 keys: spans several 256-key chunks
    Case(T=37, S=37, docs=4, empty_every=5),  # packed documents, rows with an empty key set
    Case(T=70, S=70, HI=8, H=16, D=20),  # several 16-query blocks (and dk_idx groups)
    Case(T=21, S=21, lse_inf=True),  # the main attention saw nothing on some rows / heads
]
SPARSE = [
    Case(T=9, S=20, K=4),
    Case(T=37, S=100, K=16, docs=3, outside=0.25, pad=0.2),  # -1 padding, invisible selected keys
    Case(T=20, S=20, K=24),  # more slots than visible keys: -1 padded rows
    Case(T=25, S=60, K=8, dup=True, dead_rows=3, empty_every=7),  # repeated keys, rows without keys
    Case(T=21, S=40, K=8, lse_inf=True),
]
CASES = DENSE + SPARSE
TINY = [Case(T=5, S=7, HI=2, DI=3, H=2, D=4), Case(T=5, S=7, HI=2, DI=3, H=2, D=4, K=4, outside=0.25, pad=0.25)]


@dataclass
class Inputs:
    q_idx: torch.Tensor
    k_idx: torch.Tensor
    w: torch.Tensor
    q: torch.Tensor
    kv: torch.Tensor
    lse: torch.Tensor
    ks: torch.Tensor
    ke: torch.Tensor
    sm_scale: float
    indices: torch.Tensor | None

    def args(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def to(self, indexer_dtype: torch.dtype, main_dtype: torch.dtype | None = None) -> Inputs:
        """A copy with the indexer inputs (and q, kv) in other dtypes; lse is fp64 when anything is."""
        main_dtype = main_dtype or indexer_dtype
        wide = torch.float64 in (indexer_dtype, main_dtype)
        return dataclasses.replace(
            self,
            q_idx=self.q_idx.detach().to(indexer_dtype),
            k_idx=self.k_idx.detach().to(indexer_dtype),
            w=self.w.detach().to(indexer_dtype),
            q=self.q.to(main_dtype),
            kv=self.kv.to(main_dtype),
            lse=self.lse.to(torch.float64 if wide else torch.float32),
        )


def key_ranges(case: Case, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries are the last T of S causal positions, packed in `docs` documents of irregular lengths."""
    if case.S == 0:
        return torch.zeros(case.T, dtype=torch.int32), torch.zeros(case.T, dtype=torch.int32)
    pos = torch.arange(case.S - case.T, case.S)
    cuts = (torch.randperm(max(case.S - 1, 0), generator=gen)[: case.docs - 1] + 1).sort().values
    starts = torch.cat([torch.zeros(1, dtype=torch.long), cuts])
    ks = starts[torch.searchsorted(starts, pos, right=True) - 1]
    ke = pos + 1
    if case.empty_every:
        ke[1 :: case.empty_every] = ks[1 :: case.empty_every]
    return ks.int(), ke.int()


def sparse_indices(case: Case, ks: torch.Tensor, ke: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    T, S, K = case.T, case.S, case.K
    idx = torch.full((T, K), -1, dtype=torch.int32)
    for t in range(T):
        lo, hi = int(ks[t]), int(ke[t])
        sel = (torch.randperm(hi - lo, generator=gen)[:K] + lo).int()
        idx[t, : len(sel)] = sel
        outside = [s for s in range(S) if not lo <= s < hi]
        slots = torch.randperm(K, generator=gen)
        n_out = round(case.outside * K) if outside else 0
        for j in slots[:n_out].tolist():
            idx[t, j] = outside[int(torch.randint(len(outside), (1,), generator=gen))]
        idx[t, slots[n_out : n_out + round(case.pad * K)]] = -1
        if case.dup and K >= 2 and (idx[t] >= lo).sum() >= 2:
            valid = ((idx[t] >= lo) & (idx[t] < hi)).nonzero().flatten()
            idx[t, valid[1]] = idx[t, valid[0]]
        if t < case.dead_rows:  # nothing valid: only -1 and invisible keys
            idx[t] = -1
            if outside:
                idx[t, 0] = outside[0]
    return idx


def dense_lse(q: torch.Tensor, kv: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """lse [T, H] of a dense attention over each query's visible keys (+inf where it sees none)."""
    scores = torch.einsum("thd,sd->ths", q.double(), kv.double()) * sm_scale
    vis = reference.visible_mask(ks, ke, kv.shape[0])
    lse = torch.logsumexp(scores.masked_fill(~vis[:, None, :], float("-inf")), dim=-1)
    return lse.masked_fill(~vis.any(dim=1)[:, None], float("inf"))


def make_inputs(
    case: Case, dtype: torch.dtype = torch.float32, main_dtype: torch.dtype | None = None, seed: int = 0
) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    T, S = case.T, case.S

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    # q_idx . k_idx ~ N(0, 1), so the indexer logits are O(1); q . kv * sm_scale ~ N(0, 1).
    q_idx, k_idx = randn(T, case.HI, case.DI, scale=case.DI**-0.25), randn(S, case.DI, scale=case.DI**-0.25)
    w = randn(T, case.HI, scale=0.7)
    q, kv = randn(T, case.H, case.D), randn(S, case.D)
    sm_scale = case.D**-0.5
    ks, ke = key_ranges(case, gen)
    main_dtype = main_dtype or dtype
    q, kv = q.to(main_dtype), kv.to(main_dtype)  # the main attention sees the rounded values
    if case.S == 0:  # no keys at all (sparse_mla cannot gather from an empty kv)
        indices = None if case.K is None else torch.full((T, case.K), -1, dtype=torch.int32)
        lse = torch.full((T, case.H), float("inf"), dtype=torch.float64)
    elif case.K is None:
        indices = None
        lse = dense_lse(q, kv, ks, ke, sm_scale)
    else:
        indices = sparse_indices(case, ks, ke, gen)
        visible = (indices >= ks[:, None]) & (indices < ke[:, None])
        main_idx = indices.masked_fill(~visible, -1)  # the keys the main attention attended
        lse = reference.sparse_mla(q.double(), kv.double(), main_idx, sm_scale, case.D)[1]
    if case.lse_inf:
        lse[2::5] = float("inf")  # whole rows: the target is all zero
        lse[3::5, 0] = float("inf")  # one head only
    x = Inputs(q_idx, k_idx, w, q, kv, lse, ks, ke, sm_scale, indices)
    return x.to(dtype, main_dtype)


def with_grad(x: Inputs) -> tuple[Inputs, list[torch.Tensor]]:
    leaves = [t.detach().clone().requires_grad_() for t in (x.q_idx, x.k_idx, x.w)]
    return dataclasses.replace(x, q_idx=leaves[0], k_idx=leaves[1], w=leaves[2]), leaves


def query(x: Inputs, t: int) -> Inputs:
    """Query t alone (all keys kept)."""
    sl = slice(t, t + 1)
    idx = None if x.indices is None else x.indices[sl]
    return dataclasses.replace(
        x, q_idx=x.q_idx[sl], w=x.w[sl], q=x.q[sl], lse=x.lse[sl], ks=x.ks[sl], ke=x.ke[sl], indices=idx
    )


def reference_per_query(x: Inputs) -> torch.Tensor:
    """[T] per-query losses of the reference (which returns their sum): one call per query."""
    rows = [reference.indexer_kl_loss(*query(x, t).args()) for t in range(x.q_idx.shape[0])]
    return torch.stack(rows) if rows else torch.zeros(0, dtype=reference.acc_dtype(x.q_idx))


def grads_of_sum(x: Inputs, impl: str, g: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """d(sum_t g_t KL_t)/d(q_idx, k_idx, w) by the kernel or the reference (g = 1: one batched call)."""
    x, leaves = with_grad(x)
    with glm5.ops.use_impl(impl):
        if g is None:
            loss = glm5.ops.indexer_kl_loss(*x.args())
        elif impl == "kernel":
            loss = (LOSS_FWD(*x.args()) * g).sum()
        else:
            loss = (reference_per_query(x) * g).sum()
    return torch.autograd.grad(loss, leaves)


def compare(case: Case, dtype: torch.dtype, main_dtype: torch.dtype | None = None) -> tuple[Inputs, torch.Tensor]:
    """Kernel vs reference: per-query losses and the gradients of their sum (FA3 rule, numerics.py)."""
    x = make_inputs(case, dtype, main_dtype)
    wide = x.to(torch.float64)
    out = LOSS_FWD(*x.args())
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    with torch.no_grad():
        truth, lowp = reference_per_query(wide), reference_per_query(x)
    assert_close_to_ref(out, truth, lowp, name="per-query KL")
    grads = grads_of_sum(x, "kernel")
    truth_grads, lowp_grads = grads_of_sum(wide, "reference"), grads_of_sum(x, "reference")
    for name, a, t, lp in zip(("dq_idx", "dk_idx", "dw"), grads, truth_grads, lowp_grads):
        assert a.dtype == dtype and a.shape == t.shape, name
        assert_close_to_ref(a, t, lp, name=name)
    # The public function is the sum of the per-query losses.
    assert torch.allclose(glm5.ops.indexer_kl_loss(*x.args()), out.sum(), rtol=1e-6, atol=1e-6)
    return x, out


def empty_rows(x: Inputs) -> torch.Tensor:
    """[T] bool: queries whose key set is empty or whose target is all zero (lse = +inf on every head)."""
    S = x.k_idx.shape[0]
    if x.indices is None:
        has_key = x.ke > x.ks
    else:
        has_key = ((x.indices >= x.ks[:, None]) & (x.indices < x.ke[:, None])).any(dim=1)
    return ~has_key | torch.isposinf(x.lse).all(dim=1) | (S == 0)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference_fp32(case):
    # Tight: the kernel's error against the fp64 reference is at most twice the fp32 reference's own.
    x, out = compare(case, torch.float32)
    assert float(out.min()) >= -1e-6, "KL must be non-negative (up to rounding)"
    empty = empty_rows(x)
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "an empty row's loss must be exactly 0"


@pytest.mark.parametrize("case", [c for c in CASES if c.T >= 13], ids=str)
def test_matches_reference_bf16(case):
    # Kernel and reference both upcast the same bf16 values and compute in fp32; the gradients are then
    # rounded to bf16. So the reference run on the bf16 inputs (lowp) has the rounding error the kernel
    # may have, and the FA3 rule (2x lowp's error, plus a bf16 rounding floor) applies unchanged.
    compare(case, torch.bfloat16)


@pytest.mark.parametrize("case", [DENSE[2], SPARSE[1]], ids=str)
def test_main_attention_dtype_may_differ(case):
    # q/kv in bf16 (the main model's dtype) with an fp32 indexer: the target is computed in fp32.
    compare(case, torch.float32, main_dtype=torch.bfloat16)


@pytest.mark.parametrize("case", [DENSE[3], SPARSE[3]], ids=str)
def test_matches_reference_fp64(case):
    compare(case, torch.float64)


@pytest.mark.parametrize("case", [DENSE[3], SPARSE[3]], ids=str)
def test_per_query_grad_weights(case):
    # The backward op scales query t's gradient by grad[t] (what sum() hides: all ones).
    x = make_inputs(case)
    g = torch.rand(case.T, generator=torch.Generator().manual_seed(1)) * 2 - 0.5
    truth = grads_of_sum(x.to(torch.float64), "reference", g)
    for name, a, t in zip(("dq_idx", "dk_idx", "dw"), grads_of_sum(x, "kernel", g), truth):
        assert_close_to_ref(a, t, factor=0.0, floor=1e-5 * float(t.abs().max()), name=name)


@pytest.mark.parametrize("case", [DENSE[5], SPARSE[4], SPARSE[3]], ids=str)
def test_all_zero_target_rows_are_empty(case):
    # A row whose target is all zero (lse = +inf on every head) or whose key set is empty has loss 0 and
    # sends no gradient to its own q_idx and w rows.
    x = make_inputs(case)
    empty = empty_rows(x)
    assert empty.any()
    out = LOSS_FWD(*x.args())
    dq_idx, _, dw = LOSS_BWD(torch.ones(case.T), *x.args())
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert not dq_idx[empty].any() and not dw[empty].any()
    assert out[~empty].ge(0).all() and out[~empty].gt(0).any()


DEGENERATE = [
    Case(T=0, S=5),  # no queries
    Case(T=0, S=5, K=3),
    Case(T=3, S=0),  # no keys: every set is empty
    Case(T=3, S=0, K=2),
    Case(T=6, S=6, HI=0),  # no indexer heads: I = 0, softmax(I) uniform
    Case(T=6, S=9, K=3, HI=0),
    Case(T=6, S=6, H=0),  # no attention heads: p = 0 everywhere
    Case(T=6, S=9, K=0),  # no slots: every set is empty (not the dense set), whatever lse says
]


@pytest.mark.parametrize("case", DEGENERATE, ids=str)
def test_degenerate_sizes(case):
    x = make_inputs(case)
    if case.K == 0:  # a finite target on the visible keys, which the loss must still ignore
        x = dataclasses.replace(x, lse=dense_lse(x.q, x.kv, x.ks, x.ke, x.sm_scale).float())
    out = LOSS_FWD(*x.args())
    dq_idx, dk_idx, dw = LOSS_BWD(torch.ones(case.T), *x.args())
    assert out.shape == (case.T,)
    assert dq_idx.shape == x.q_idx.shape and dk_idx.shape == x.k_idx.shape and dw.shape == x.w.shape
    if case.T and case.S:  # (the reference cannot gather from an empty k_idx)
        assert_close_to_ref(out, reference_per_query(x.to(torch.float64)), name="per-query KL")
        for a, t in zip((dq_idx, dk_idx, dw), grads_of_sum(x.to(torch.float64), "reference")):
            assert_close_to_ref(a, t)
    else:
        assert not out.any() and not dq_idx.any() and not dk_idx.any() and not dw.any()


def test_zero_when_indexer_matches_target():
    # With one-hot keys (DI = S), one head and w = 1, the logits are relu(q_idx[t, 0, s]); setting
    # q_idx[t, 0] = log p_t + 40 makes softmax(I_t) = p_t exactly (up to rounding): KL = 0, gradient 0.
    case = Case(T=12, S=12, HI=1, DI=12, H=3, D=8, docs=2)
    x = make_inputs(case, torch.float64)
    keys = torch.arange(case.S, dtype=torch.int32).expand(case.T, case.S)
    vis = reference.visible_mask(x.ks, x.ke, case.S)
    p = reference.head_summed_probs(x.q, x.kv, x.lse, keys.masked_fill(~vis, -1), x.sm_scale)
    p = p / p.sum(dim=1, keepdim=True)
    q_idx = torch.where(vis, p.clamp_min(1e-300).log() + 40.0, torch.zeros_like(p))[:, None, :]
    one_hot, ones = torch.eye(case.S, dtype=torch.float64), torch.ones(case.T, 1, dtype=torch.float64)
    x = dataclasses.replace(x, q_idx=q_idx, k_idx=one_hot, w=ones)
    out, grads = LOSS_FWD(*x.args()), LOSS_BWD(torch.ones(case.T), *x.args())
    assert float(out.abs().max()) < 1e-13
    assert all(float(g.abs().max()) < 1e-12 for g in grads)
    shifted = dataclasses.replace(x, q_idx=q_idx * 1.01)  # any other logits: KL > 0
    assert float(LOSS_FWD(*shifted.args()).sum()) > 1e-6


@pytest.mark.parametrize("case", [DENSE[3], SPARSE[1]], ids=str)
def test_sgd_on_indexer_decreases_loss(case):
    x, leaves = with_grad(make_inputs(case))
    losses = []
    for _ in range(5):
        loss = glm5.ops.indexer_kl_loss(*x.args())
        losses.append(float(loss.detach()))
        grads = torch.autograd.grad(loss, leaves)
        with torch.no_grad():
            for leaf, g in zip(leaves, grads):
                leaf -= 0.02 * g
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("case", TINY, ids=str)
def test_opcheck(case):
    x, _ = with_grad(make_inputs(case))
    torch.library.opcheck(LOSS_FWD.default, x.args())
    plain = make_inputs(case)
    torch.library.opcheck(LOSS_BWD.default, (torch.rand(case.T),) + plain.args())


def kink_free_inputs(case: Case) -> Inputs:
    """fp64 inputs with every q_idx . k_idx at least 0.02 away from the ReLU kink at 0."""
    for seed in range(200):
        x = make_inputs(case, torch.float64, seed=seed)
        if float(torch.einsum("thd,sd->ths", x.q_idx, x.k_idx).abs().min()) > 0.02:
            return x
    raise AssertionError("no kink-free draw")


@pytest.mark.parametrize("case", TINY, ids=str)
def test_gradcheck_fp64(case):
    x, leaves = with_grad(kink_free_inputs(case))
    rest = x.args()[3:]

    def fn(q_idx, k_idx, w):
        return glm5.ops.indexer_kl_loss(q_idx, k_idx, w, *rest)

    assert float(fn(*leaves)) > 0
    assert torch.autograd.gradcheck(fn, tuple(leaves))


def test_no_gradient_to_the_target():
    x, leaves = with_grad(make_inputs(SPARSE[1]))
    q, kv, lse = (t.clone().requires_grad_() for t in (x.q, x.kv, x.lse))
    x = dataclasses.replace(x, q=q, kv=kv, lse=lse)
    glm5.ops.indexer_kl_loss(*x.args()).backward()
    assert q.grad is None and kv.grad is None and lse.grad is None
    assert all(leaf.grad is not None and leaf.grad.abs().sum() > 0 for leaf in leaves)


# aot_eager traces forward and backward through the fake kernels and the autograd registration (what
# fullgraph compilation needs from the op); inductor adds C++ code generation for the sum (~1 min here).
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph(backend):
    x = make_inputs(SPARSE[0]) if backend == "aot_eager" else make_inputs(DENSE[1])
    rest = x.args()[3:]

    def fn(q_idx, k_idx, w):
        return glm5.ops.indexer_kl_loss(q_idx, k_idx, w, *rest) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    _, leaves = with_grad(x)
    eager_loss = fn(*leaves)
    eager_grads = torch.autograd.grad(eager_loss, leaves)
    compiled_loss = compiled(*leaves)
    compiled_grads = torch.autograd.grad(compiled_loss, leaves)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


# 5 query blocks (so 5 dk_idx groups), keys across two 256-key chunks.
@pytest.mark.parametrize(
    "case", [Case(T=70, S=300, H=16, docs=2), Case(T=70, S=90, K=24, outside=0.2, pad=0.1)], ids=str
)
def test_deterministic_and_thread_independent(case):
    x = make_inputs(case)
    g = torch.rand(case.T) + 0.5

    def run():
        return (LOSS_FWD(*x.args()),) + tuple(LOSS_BWD(g, *x.args()))

    first = run()
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            again = run()
            assert all(torch.equal(a, b) for a, b in zip(first, again)), f"results differ with {n} thread(s)"
    finally:
        torch.set_num_threads(threads)


def _bad(x: Inputs, **changes) -> Inputs:
    return dataclasses.replace(x, **changes)


def _slot0(indices: torch.Tensor, value: int) -> torch.Tensor:
    return indices.index_fill(1, torch.tensor([0]), value)


BAD = {
    # name: (change to valid inputs, exception, the argument the message must name)
    "k_idx dtype": (lambda x: _bad(x, k_idx=x.k_idx.double()), RuntimeError, "k_idx"),
    "w dtype": (lambda x: _bad(x, w=x.w.half()), RuntimeError, "w"),
    "kv dtype": (lambda x: _bad(x, kv=x.kv.double()), RuntimeError, "kv"),
    "q not float": (lambda x: _bad(x, q=x.q.int(), kv=x.kv.int()), RuntimeError, "q"),
    "lse dtype": (lambda x: _bad(x, lse=x.lse.bfloat16()), RuntimeError, "lse"),
    "ks dtype": (lambda x: _bad(x, ks=x.ks.long()), RuntimeError, "ks"),
    "indices dtype": (lambda x: _bad(x, indices=x.indices.long()), RuntimeError, "indices"),
    "q_idx rank": (lambda x: _bad(x, q_idx=x.q_idx[:, 0]), RuntimeError, "q_idx"),
    "kv rank": (lambda x: _bad(x, kv=x.kv[None]), RuntimeError, "kv"),
    "indices rank": (lambda x: _bad(x, indices=x.indices[0]), RuntimeError, "indices"),
    "k_idx width": (lambda x: _bad(x, k_idx=x.k_idx[:, :-1]), RuntimeError, "k_idx"),
    "w heads": (lambda x: _bad(x, w=x.w[:, :-1]), RuntimeError, "w"),
    "q tokens": (lambda x: _bad(x, q=x.q[:-1]), RuntimeError, "q"),
    "kv width": (lambda x: _bad(x, kv=x.kv[:, :-1]), RuntimeError, "kv"),
    "kv keys": (lambda x: _bad(x, kv=x.kv[:-1]), RuntimeError, "kv"),
    "lse heads": (lambda x: _bad(x, lse=x.lse[:, :-1]), RuntimeError, "lse"),
    "ke length": (lambda x: _bad(x, ke=x.ke[:-1]), RuntimeError, "ke"),
    "indices rows": (lambda x: _bad(x, indices=x.indices[:-1]), RuntimeError, "indices"),
    "ks negative": (lambda x: _bad(x, ks=x.ks - 1), ValueError, "ks"),
    "ke past S": (lambda x: _bad(x, ke=x.ke + 1), ValueError, "ke"),
    "ke before ks": (lambda x: _bad(x, ke=torch.minimum(x.ke, x.ks + 1) - 1, ks=x.ks + 1), ValueError, "ke"),
    "index too big": (lambda x: _bad(x, indices=_slot0(x.indices, x.k_idx.shape[0])), IndexError, "indices"),
    "index below -1": (lambda x: _bad(x, indices=_slot0(x.indices, -2)), IndexError, "indices"),
    "sm_scale nan": (lambda x: _bad(x, sm_scale=float("nan")), RuntimeError, "sm_scale"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(name):
    change, exc, arg = BAD[name]
    x = change(make_inputs(SPARSE[0]))
    with pytest.raises(exc, match=rf"\b{arg}\b"):
        LOSS_FWD(*x.args())
    with pytest.raises(exc, match=rf"\b{arg}\b"):
        LOSS_BWD(torch.ones(x.q_idx.shape[0]), *x.args())


def test_bad_grad():
    x = make_inputs(SPARSE[0])
    with pytest.raises(RuntimeError, match="grad"):
        LOSS_BWD(torch.ones(x.q_idx.shape[0] + 1), *x.args())
    with pytest.raises(RuntimeError, match="grad"):
        LOSS_BWD(torch.ones(x.q_idx.shape[0], dtype=torch.int32), *x.args())
