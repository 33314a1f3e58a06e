"""glm5.ops indexer_logits / indexer_topk (CPU kernels indexer_logits, indexer_logits_bwd, indexer_topk)
against glm5.ops.reference.

Logits: the kernel against the reference run in fp64 on the same (rounded) inputs, FA3 rule
(tests/numerics.py): at most twice the error of the reference at the input precision plus a
rounding floor. bf16 and fp16 inputs are exact in fp32, so both the kernel and the reference at
that precision only commit fp32 accumulation error; the same rule and calc_diff < 1e-5 hold.

Top-k: (1) exactly the reference's selection rule applied to the kernel's own logits (the two
kernels share their scoring code, so the scores are bitwise equal); (2) against the reference:
the same number of valid slots, and the same indices except at genuine near-ties (fp32), or a
recall >= 0.99 with ties allowed (bf16); with integer-valued inputs every score is exact and many
are equal, so the indices must match the reference exactly (the tie rule is defined).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import glm5
from glm5.ops import reference
from numerics import assert_close_to_ref, assert_same_nonfinite, calc_diff, topk_recall

LOGITS = torch.ops.glm5.indexer_logits
LOGITS_BWD = torch.ops.glm5.indexer_logits_bwd
TOPK = torch.ops.glm5.indexer_topk
NO_BF16_DOT = "GLM5_CPU_DISABLE_AVX512BF16"  # forces the AVX2 fp32 kernel for bf16 inputs


@dataclass(frozen=True)
class Case:
    T: int
    S: int
    HI: int = 4
    DI: int = 32
    topk: int = 16
    layout: str = "end"  # end: causal queries at the end of the context; full; docs; random
    docs: tuple[int, ...] = ()  # layout "docs": document lengths (sum S), one query per token
    empty_rows: int = 0  # the first rows see no key (ks == ke)
    ints: bool = False  # integer-valued q, k, w: exact scores, many ties
    dup: bool = False  # every odd key duplicates the one before it: exact ties

    def __str__(self) -> str:
        s = f"T{self.T}-S{self.S}-HI{self.HI}-DI{self.DI}-k{self.topk}-{self.layout}"
        if self.docs:
            s += "-docs" + "_".join(map(str, self.docs))
        for f in ("empty_rows", "ints", "dup"):
            v, default = getattr(self, f), Case.__dataclass_fields__[f].default
            if v != default:
                s += f"-{f}" if v is True else f"-{f}{v}"
        return s


CASES = [
    # irregular T / S / HI / DI (odd DI: the bf16 kernel pads the head dim to pairs)
    Case(T=1, S=1, HI=1, DI=1, topk=1),
    Case(T=7, S=33, HI=3, DI=17, topk=5),
    Case(T=13, S=530, HI=5, DI=72, topk=40),  # two key chunks, the second partial
    Case(T=9, S=1100, HI=32, DI=128, topk=300),  # GLM-5 head shape, three chunks
    Case(T=70, S=300, HI=32, DI=64, topk=64, layout="full"),  # several query blocks
    Case(T=40, S=700, HI=7, DI=33, topk=100, layout="random"),
    # topk larger than the visible keys: -1 / -inf padding
    Case(T=5, S=40, HI=2, DI=8, topk=64),
    Case(T=6, S=12, HI=3, DI=5, topk=20, layout="random"),
    # rows that see no key, and a batch where no row sees any
    Case(T=12, S=90, HI=4, DI=24, topk=16, layout="random", empty_rows=5),
    Case(T=4, S=30, HI=2, DI=16, topk=8, empty_rows=4),
    # packed documents, causal within each (ks > 0)
    Case(T=63, S=63, HI=4, DI=16, topk=8, layout="docs", docs=(5, 17, 1, 40)),
    Case(T=300, S=300, HI=8, DI=32, topk=48, layout="docs", docs=(60, 170, 70)),
    # ties: integer inputs (exact scores, many equal, zeros from the relu), duplicated keys
    Case(T=20, S=700, HI=3, DI=4, topk=50, layout="random", ints=True),
    Case(T=9, S=64, HI=2, DI=3, topk=100, ints=True, empty_rows=2),
    Case(T=8, S=1030, HI=4, DI=16, topk=200, layout="full", ints=True, dup=True),
    Case(T=10, S=300, HI=5, DI=24, topk=64, layout="full", dup=True),
    # GLM-5's top-k with HI=32, DI=128 on a short context
    Case(T=16, S=3000, HI=32, DI=128, topk=2048),
]
# Few queries on a long context: the key range is split between threads and merged.
LONG = [Case(T=4, S=65536, HI=32, DI=128, topk=2048)]
TINY = Case(T=3, S=11, HI=2, DI=5, topk=4, layout="random", empty_rows=1)
BWD_CASES = [
    Case(T=7, S=33, HI=3, DI=17, layout="random", empty_rows=2),
    Case(T=9, S=600, HI=32, DI=64),
    Case(T=40, S=40, HI=4, DI=16, layout="docs", docs=(9, 30, 1)),
]
# (dtype, force the AVX2 kernel for bf16)
DTYPES = [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False)]
DTYPE_IDS = ["fp32", "bf16", "bf16-avx2", "fp16"]


def make_ranges(case: Case, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    T, S = case.T, case.S
    if case.layout == "end":  # query t sits at position S - T + t and sees keys 0..its position
        assert T <= S
        ks, ke = torch.zeros(T, dtype=torch.int64), torch.arange(S - T + 1, S + 1)
    elif case.layout == "full":
        ks, ke = torch.zeros(T, dtype=torch.int64), torch.full((T,), S)
    elif case.layout == "docs":
        assert T == S == sum(case.docs)
        starts = torch.repeat_interleave(torch.cumsum(torch.tensor((0,) + case.docs[:-1]), 0), torch.tensor(case.docs))
        ks, ke = starts, torch.arange(1, S + 1)
    elif case.layout == "random":
        ke = torch.randint(0, S + 1, (T,), generator=gen)
        ks = (torch.rand(T, generator=gen, dtype=torch.float64) * (ke + 1)).long().clamp(max=ke)
    else:
        raise ValueError(case.layout)
    ke = ke.clone()
    ke[: case.empty_rows] = ks[: case.empty_rows]
    return ks.int(), ke.int()


def make_inputs(case: Case, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple:
    """(q, k, w, ks, ke); w carries the HI^-0.5 scale, with mixed signs as a trained indexer's."""
    gen = torch.Generator().manual_seed(seed)
    T, S, HI, DI = case.T, case.S, case.HI, case.DI
    if case.ints:
        q = torch.randint(-2, 3, (T, HI, DI), generator=gen).double()
        k = torch.randint(-2, 3, (S, DI), generator=gen).double()
        w = torch.randint(-2, 3, (T, HI), generator=gen).double()
    else:
        q = torch.randn(T, HI, DI, generator=gen, dtype=torch.float64)
        k = torch.randn(S, DI, generator=gen, dtype=torch.float64)
        w = torch.randn(T, HI, generator=gen, dtype=torch.float64) * HI**-0.5
    if case.dup:
        k[1::2] = k[0 : S - S % 2 : 2][: k[1::2].shape[0]]
    ks, ke = make_ranges(case, gen)
    return q.to(dtype), k.to(dtype), w.to(dtype), ks, ke


def upcast(x: tuple, dtype: torch.dtype = torch.float64) -> tuple:
    q, k, w, ks, ke = x
    return q.to(dtype), k.to(dtype), w.to(dtype), ks, ke


def select_from_logits(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's selection rule applied to given logits."""
    T, S = logits.shape
    idx = torch.full((T, topk), -1, dtype=torch.int32)
    val = torch.full((T, topk), float("-inf"), dtype=logits.dtype)
    vals, order = torch.sort(logits, dim=1, descending=True, stable=True)
    n = min(topk, S)
    vals, order = vals[:, :n], order[:, :n].int()
    idx[:, :n], val[:, :n] = order.masked_fill(vals == float("-inf"), -1), vals
    return idx, val


@pytest.fixture
def bf16_kernel(request, monkeypatch):
    """Parametrised by DTYPES: returns the dtype, with the AVX2 kernel forced when asked."""
    dtype, force_avx2 = request.param
    if force_avx2:
        monkeypatch.setenv(NO_BF16_DOT, "1")
    return dtype


# ---------------------------------------------------------------------------------------------
# indexer_logits
# ---------------------------------------------------------------------------------------------


def check_logits(case: Case, dtype: torch.dtype) -> None:
    x = make_inputs(case, dtype)
    out = glm5.ops.indexer_logits(*x)
    assert out.dtype == torch.float32 and out.shape == (case.T, case.S)
    truth = reference.indexer_logits(*upcast(x))
    lowp = reference.indexer_logits(*x)  # the fp32 reference on the same inputs
    assert_close_to_ref(out, truth, lowp, name="logits")  # also equal -inf masks
    finite = torch.isfinite(truth)
    assert calc_diff(out[finite], truth[finite]) < 1e-5
    if case.ints:
        assert torch.equal(out, truth.float())  # integer inputs: every score is exact


@pytest.mark.parametrize("bf16_kernel", DTYPES, ids=DTYPE_IDS, indirect=True)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_logits(case, bf16_kernel):
    check_logits(case, bf16_kernel)


def test_logits_fp64():
    x = make_inputs(CASES[2], torch.float64)
    out = glm5.ops.indexer_logits(*x)
    assert out.dtype == torch.float64
    truth = reference.indexer_logits(*x)
    assert_same_nonfinite(out, truth)
    finite = torch.isfinite(truth)
    assert float((out[finite] - truth[finite]).abs().max()) < 1e-12 * float(truth[finite].abs().max())


def test_logits_noncontiguous():
    case = CASES[2]
    q, k, w, ks, ke = make_inputs(case)
    q_t = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    k_t = torch.cat([k, k], dim=1)[:, : case.DI]
    assert not q_t.is_contiguous() and not k_t.is_contiguous()
    assert torch.equal(glm5.ops.indexer_logits(q_t, k_t, w, ks, ke), glm5.ops.indexer_logits(q, k, w, ks, ke))


# ---------------------------------------------------------------------------------------------
# indexer_logits backward
# ---------------------------------------------------------------------------------------------


def grads(fn, x: tuple, g: torch.Tensor) -> tuple:
    """(dq, dk, dw) of fn at x for the output gradient g (nonzero on masked positions too)."""
    q, k, w = (t.detach().clone().requires_grad_() for t in x[:3])
    out = fn(q, k, w, *x[3:])
    return tuple(d.detach() for d in torch.autograd.grad(out, (q, k, w), grad_outputs=g.to(out.dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", BWD_CASES, ids=str)
def test_bwd(case, dtype):
    x = make_inputs(case, dtype)
    g = torch.randn(case.T, case.S, generator=torch.Generator().manual_seed(1))
    got = grads(glm5.ops.indexer_logits, x, g)
    truth = grads(reference.indexer_logits, upcast(x), g)
    lowp = grads(reference.indexer_logits, x, g)
    for name, a, t, lp in zip(("dq", "dk", "dw"), got, truth, lowp):
        assert a.dtype == dtype
        assert_close_to_ref(a, t, lp, name=name)


def test_bwd_exact_relu_at_zero():
    # Integer inputs: many dot products are exactly 0, where relu' = 0 (as torch's relu); every
    # product and sum is exact, so the gradients must equal the reference's bit for bit.
    case = Case(T=11, S=70, HI=3, DI=4, layout="random", empty_rows=2, ints=True)
    x = make_inputs(case)
    g = torch.randint(-3, 4, (case.T, case.S), generator=torch.Generator().manual_seed(1)).float()
    assert (torch.einsum("thd,sd->ths", x[0], x[1]) == 0).float().mean() > 0.05
    got, want = grads(glm5.ops.indexer_logits, x, g), grads(reference.indexer_logits, x, g)
    for name, a, b in zip(("dq", "dk", "dw"), got, want):
        assert torch.equal(a, b), name


def test_gradcheck_fp64():
    x = make_inputs(TINY, torch.float64)
    visible = reference.visible_mask(x[3], x[4], TINY.S)

    def fn(q, k, w):  # -inf on masked keys would make finite differences NaN
        return glm5.ops.indexer_logits(q, k, w, x[3], x[4]).masked_fill(~visible, 0.0)

    inputs = tuple(t.clone().requires_grad_() for t in x[:3])
    assert torch.autograd.gradcheck(fn, inputs)


# ---------------------------------------------------------------------------------------------
# indexer_topk
# ---------------------------------------------------------------------------------------------


def check_topk(case: Case, dtype: torch.dtype) -> None:
    x = make_inputs(case, dtype)
    idx, val = glm5.ops.indexer_topk(*x, topk=case.topk)
    assert idx.dtype == torch.int32 and val.dtype == torch.float32
    assert idx.shape == val.shape == (case.T, case.topk)

    # (1) Exactly the selection rule on the kernel's own (bitwise shared) scores.
    own_idx, own_val = select_from_logits(glm5.ops.indexer_logits(*x), case.topk)
    assert torch.equal(idx, own_idx)
    assert torch.equal(val, own_val)

    # (2) Against the reference.
    ref_idx, ref_val = reference.indexer_topk(*x, topk=case.topk)
    assert torch.equal((idx >= 0).sum(1), (ref_idx >= 0).sum(1)), "valid counts differ"
    assert torch.equal(idx < 0, torch.isneginf(val))
    if case.ints:  # exact scores: the tie rule decides, and it is defined
        assert torch.equal(idx, ref_idx)
        assert torch.equal(val, ref_val)
        return
    truth, lowp = reference.indexer_logits(*upcast(x)), reference.indexer_logits(*x)
    valid, at = idx >= 0, idx.clamp(min=0).long()
    # the kernel's scores are the logits of the keys it returns
    assert_close_to_ref(val[valid], truth.gather(1, at)[valid], lowp.gather(1, at)[valid], name="scores")
    if dtype == torch.float32:
        # Same indices, except where two keys' exact scores are within fp32 rounding of each other.
        differ = idx != ref_idx
        t_rows = torch.arange(case.T)[:, None].expand_as(idx)[differ]
        mine = truth[t_rows, idx[differ].long()]
        theirs = truth[t_rows, ref_idx[differ].long()]
        tol = 1e-5 * max(1.0, float(truth.nan_to_num(0.0, 0.0, 0.0).abs().max()))
        assert bool(((mine - theirs).abs() <= tol).all()), f"{int(differ.sum())} slots differ beyond near-ties"
    else:
        assert topk_recall(idx, ref_idx, lowp) >= 0.99


@pytest.mark.parametrize("bf16_kernel", DTYPES[:3], ids=DTYPE_IDS[:3], indirect=True)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_topk(case, bf16_kernel):
    check_topk(case, bf16_kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", LONG, ids=str)
def test_topk_long_context(case, dtype):
    check_topk(case, dtype)


def test_topk_fp64():
    case = CASES[5]
    x = make_inputs(case, torch.float64)
    idx, val = glm5.ops.indexer_topk(*x, topk=case.topk)
    ref_idx, ref_val = reference.indexer_topk(*x, topk=case.topk)
    assert val.dtype == torch.float64
    assert torch.equal(idx, ref_idx)
    valid = idx >= 0
    assert torch.equal(valid, torch.isfinite(ref_val))
    assert float((val[valid] - ref_val[valid]).abs().max()) < 1e-12 * float(ref_val[valid].abs().max())


def test_topk_neg_inf_scores_are_padding():
    # A visible key whose score is -inf (w = -inf on a positive dot product) is reported as
    # padding, as the reference does; the other keys keep their order.
    case = Case(T=2, S=10, HI=1, DI=1, topk=10, layout="full")
    q, k, w, ks, ke = make_inputs(case)
    q.fill_(1.0)
    k.copy_(torch.arange(-4.0, 6.0)[:, None])  # dots -4..5: relu is 0 for the first 5 keys
    w[0] = float("-inf")  # row 0: -inf on positive dots, NaN (0 * -inf) elsewhere -> raise
    w[1] = 1.0
    with pytest.raises(ValueError, match="NaN"):
        glm5.ops.indexer_topk(q, k, w, ks, ke, topk=10)
    k.copy_(torch.arange(1.0, 11.0)[:, None])  # all dots positive: row 0 scores -inf everywhere
    idx, val = glm5.ops.indexer_topk(q, k, w, ks, ke, topk=10)
    ref_idx, ref_val = reference.indexer_topk(q, k, w, ks, ke, topk=10)
    assert torch.equal(idx, ref_idx) and torch.equal(val, ref_val)
    assert (idx[0] == -1).all() and idx[1].tolist() == list(range(9, -1, -1))


# ---------------------------------------------------------------------------------------------
# opcheck, compile, determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(dtype):
    q, k, w, ks, ke = make_inputs(TINY, dtype)
    torch.library.opcheck(LOGITS.default, (q.requires_grad_(), k.requires_grad_(), w.requires_grad_(), ks, ke))
    q, k, w = q.detach(), k.detach(), w.detach()
    torch.library.opcheck(LOGITS_BWD.default, (torch.randn(TINY.T, TINY.S), q, k, w, ks, ke))
    torch.library.opcheck(TOPK.default, (q, k, w, ks, ke, TINY.topk))


def test_compile_fullgraph():
    x = make_inputs(TINY)

    def fn(q, k, w, ks, ke):
        return glm5.ops.indexer_logits(q, k, w, ks, ke), *glm5.ops.indexer_topk(q, k, w, ks, ke, 3)

    compiled = torch.compile(fn, fullgraph=True)
    for a, b in zip(compiled(*x), fn(*x)):
        assert torch.equal(a, b)


def run_all(x: tuple, topk: int) -> list[torch.Tensor]:
    g = torch.randn(x[0].shape[0], x[1].shape[0], generator=torch.Generator().manual_seed(2))
    return [glm5.ops.indexer_logits(*x), *glm5.ops.indexer_topk(*x, topk=topk), *grads(glm5.ops.indexer_logits, x, g)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deterministic_and_thread_count_independent(dtype):
    # Few queries on a long context (keys split between threads) and many query blocks.
    cases = (
        Case(T=3, S=9000, HI=8, DI=64, topk=500),
        Case(T=300, S=300, HI=4, DI=32, topk=50, layout="docs", docs=(100, 200)),
    )
    for case in cases:
        x = make_inputs(case, dtype)
        first, second = run_all(x, case.topk), run_all(x, case.topk)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = run_all(x, case.topk)
            torch.set_num_threads(max(2, threads))
            two = run_all(x, case.topk)
        finally:
            torch.set_num_threads(threads)
        names = ("logits", "indices", "scores", "dq", "dk", "dw")
        for name, a, b, c, d in zip(names, first, second, one, two):
            assert torch.equal(a, b), f"{name} differs run to run"
            assert torch.equal(c, d), f"{name} differs between 1 and {max(2, threads)} threads"


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------


def _bad(**changes):
    """Apply changes (name -> fn(args) -> new value) to TINY's fp32 arguments."""

    def make():
        args = dict(zip(("q", "k", "w", "ks", "ke"), make_inputs(TINY)))
        for name, fn in changes.items():
            args[name] = fn(args)
        return args

    return make


BAD = [
    ("q-int", _bad(q=lambda a: a["q"].long()), "q must be float32"),
    ("k-dtype", _bad(k=lambda a: a["k"].double()), "k and q must have the same dtype"),
    ("w-dtype", _bad(w=lambda a: a["w"].bfloat16()), "w and q must have the same dtype"),
    ("q-rank", _bad(q=lambda a: a["q"][:, 0]), "q must have 3 dimensions"),
    ("k-rank", _bad(k=lambda a: a["k"][None]), "k must have 2 dimensions"),
    ("w-rank", _bad(w=lambda a: a["w"][..., None]), "w must have 2 dimensions"),
    ("DI-mismatch", _bad(k=lambda a: a["k"][:, :-1].contiguous()), r"k.size\(1\)"),
    ("T-mismatch", _bad(w=lambda a: a["w"][:-1]), "w must have shape"),
    ("HI-mismatch", _bad(w=lambda a: a["w"][:, :-1]), "w must have shape"),
    ("ks-int64", _bad(ks=lambda a: a["ks"].long()), "ks must be an int32"),
    ("ke-float", _bad(ke=lambda a: a["ke"].float()), "ke must be an int32"),
    ("ks-shape", _bad(ks=lambda a: a["ks"][:-1]), "ks must be an int32 tensor of shape"),
    ("ks-negative", _bad(ks=lambda a: a["ks"] - 1 - a["ks"]), "ks/ke"),
    ("ke-beyond-S", _bad(ke=lambda a: a["ke"] + TINY.S), "ks/ke"),
    ("ks-after-ke", _bad(ks=lambda a: a["ke"] + 1, ke=lambda a: a["ke"].clamp(max=TINY.S - 1)), "ks/ke"),
]


@pytest.mark.parametrize("op", ["logits", "logits_bwd", "topk"])
@pytest.mark.parametrize("make,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs(op, make, match):
    a = make()
    args = (a["q"], a["k"], a["w"], a["ks"], a["ke"])
    with pytest.raises((RuntimeError, ValueError), match=match):
        if op == "logits":
            LOGITS(*args)
        elif op == "logits_bwd":
            LOGITS_BWD(torch.zeros(TINY.T, TINY.S), *args)
        else:
            TOPK(*args, 4)


@pytest.mark.parametrize("topk", [0, -3])
def test_bad_topk(topk):
    with pytest.raises((RuntimeError, ValueError), match="topk"):
        glm5.ops.indexer_topk(*make_inputs(TINY), topk=topk)


def test_device_mismatch():
    q, k, w, ks, ke = make_inputs(TINY)
    meta = q.to("meta")
    # through the dispatcher (meta inputs reach the fake kernel) and the CPU kernel itself
    with pytest.raises(RuntimeError, match="k is on cpu but q is on meta"):
        glm5.ops.indexer_logits(meta, k, w, ks, ke)
    with pytest.raises(RuntimeError, match="ks is on cpu but q is on meta"):
        glm5.ops.indexer_topk(meta, k.to("meta"), w.to("meta"), ks, ke, 4)
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match="q must be a CPU tensor"):
        LOGITS.default.redispatch(cpu, meta, k, w, ks, ke)
    with pytest.raises(RuntimeError, match="k is on meta but q is on cpu"):
        TOPK.default.redispatch(cpu, q, k.to("meta"), w, ks, ke, 4)
    with pytest.raises(RuntimeError, match="grad is on meta but q is on cpu"):
        LOGITS_BWD.default.redispatch(cpu, torch.zeros(TINY.T, TINY.S, device="meta"), q, k, w, ks, ke)


@pytest.mark.parametrize("where", ["q", "k", "w"])
def test_nan_input(where):
    case = Case(T=4, S=50, HI=3, DI=8, layout="full")
    x = dict(zip(("q", "k", "w", "ks", "ke"), make_inputs(case)))
    x[where].view(-1)[1] = float("nan")
    args = tuple(x.values())
    with pytest.raises(ValueError, match="NaN"):
        glm5.ops.indexer_topk(*args, topk=8)
    with pytest.raises(ValueError, match="NaN"):
        reference.indexer_topk(*args, topk=8)
    assert_same_nonfinite(glm5.ops.indexer_logits(*args), reference.indexer_logits(*args), "logits")


def test_nan_on_masked_keys_is_ignored():
    # A NaN key that no query sees does not reach any score.
    case = Case(T=4, S=50, HI=3, DI=8)
    q, k, w, ks, ke = make_inputs(case)
    ke.clamp_(max=40)
    k[45] = float("nan")
    idx, _ = glm5.ops.indexer_topk(q, k, w, ks, ke, topk=8)
    assert torch.equal(idx, reference.indexer_topk(q, k, w, ks, ke, topk=8)[0])
