"""glm5's CUDA kernels on one GPU (H200 targets), each against torch baselines timed in the same run.

Every figure is the median of CUDA-event timings (bench_utils.bench_many: warm-up rounds, then the
kernel and its baselines called round-robin, L2 flushed before each call, at least --min-reps rounds),
bf16 inputs. Before timing, each glm5 output is checked loosely against a plain-torch truth on the same
data (a mismatch is reported in the row's `check`, the run goes on); a kernel that raises is recorded
as that row's error and the other benchmarks still run. If an error leaves the CUDA context unusable
(an illegal address is sticky), the remaining benchmarks run in a fresh child process.

FLOP formulas (a multiply-add counts 2; only the useful work is counted, never padding):
  sparse_mla_fwd      2*T*H*K*(D_qk + D_v)           QK^T over D_qk = 576, PV over D_v = 512
  sparse_mla_bwd      2*T*H*K*(3*D_qk + 2*D_v)       recompute QK^T, dP = dO V^T, dQ = dS K,
                                                     dK = dS^T Q (D_qk), dV = P^T dO (D_v)
  dense SDPA          2*H*(d_qk + d_v)*pairs         MHA form (64 heads, qk 256, v 256); pairs = the
                                                     causal (query, key) pairs of the last T of S
  grouped_gemm(_wgrad) 2*M*N*K                       M = rows over all experts
  indexer_topk/logits 2*T_pairs*HI*DI                T_pairs = visible (query, key) pairs; the top-k
                                                     selection itself is not counted
  matmul (ceiling)    2*n^3

Targets (the H200 issue): sparse_mla_fwd >= 350 TFLOP/s, sparse_mla_bwd >= 100 TFLOP/s,
grouped_gemm >= 600 TFLOP/s, indexer_topk >= 3x torch's logits-then-topk. Everything else: report only.

    python benchmarks/bench_gpu.py              # GLM-5 shapes, ~2 min on an H200
    python benchmarks/bench_gpu.py --quick      # smaller shapes, ~30 s
    python benchmarks/bench_gpu.py --only sparse_mla_fwd,indexer_topk --out-json /tmp/x.json

Results: a table on stdout and benchmarks/results/bench_gpu_<gpu>[_quick].json (plus --out-json).
Shapes: ../shared/GLM5_REFERENCE.md (64 heads, latent 512 + rope 64, top-2048, indexer 32 x 128,
hidden 6144, expert width 2048, 256 experts top-8). Run it through benchmarks/gpu_check.sh on a
lent machine (README "GPU (H200)").
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402

BF16 = torch.bfloat16
DEV = "cuda"

# name -> (kind, threshold): "tflops" compares the kernel's TFLOP/s, "speedup" baseline_ms / ms.
TARGETS = {
    "sparse_mla_fwd": ("tflops", 350.0),
    "sparse_mla_bwd": ("tflops", 100.0),
    "grouped_gemm": ("tflops", 600.0),
    "indexer_topk": ("speedup", 3.0),
}
BENCHES = (
    "matmul_ceiling",
    "sparse_mla_fwd",
    "sparse_mla_bwd",
    "grouped_gemm",
    "grouped_gemm_wgrad",
    "indexer_topk",
    "indexer_logits",
    "indexer_kl_loss",
    "moe_route",
    "moe_permute",
    "moe_unpermute",
)


# Problem sizes. "full": GLM-5's shapes at the issue's T and S; "quick": smaller; "tiny": the CPU dry run
# (--cpu-dry-run) that exercises every code path of this script on a machine without a GPU.
SIZES = {
    "full": {"matmul_n": 8192, "mla": (4096, 65536, 64, 2048), "indexer": (4096, 65536, 2048),
             "gemm": {"E": 32, "D": 6144, "F": 2048, "rows": (512, 1024), "skewed": True}, "moe": (16384, 6144)},
    "quick": {"matmul_n": 4096, "mla": (1024, 16384, 64, 2048), "indexer": (1024, 16384, 2048),
              "gemm": {"E": 32, "D": 6144, "F": 2048, "rows": (512,), "skewed": False}, "moe": (4096, 6144)},
    "tiny": {"matmul_n": 512, "mla": (32, 1024, 8, 256), "indexer": (32, 1024, 256),
             "gemm": {"E": 4, "D": 384, "F": 128, "rows": (16,), "skewed": True}, "moe": (256, 512)},
}


@dataclasses.dataclass(frozen=True)
class Cfg:
    size: str  # a key of SIZES
    warmup: int
    min_reps: int
    max_reps: int
    budget_s: float  # timed seconds per round-robin group (after min_reps rounds)


# ---------------------------------------------------------------------------------------------
# Timing and result rows
# ---------------------------------------------------------------------------------------------


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400]


def probe(fn: Callable[[], object]) -> str | None:
    """Call once and synchronise (the first call also warms up); the error text, or None."""
    try:
        fn()
        bu.sync(DEV)
        return None
    except Exception as e:  # noqa: BLE001 - any failure of one kernel is a result, not a crash
        if isinstance(e, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        return _err(e)


def time_group(fns: dict[str, Callable[[], object]], cfg: Cfg, slow: bool = False) -> tuple[dict, dict]:
    """Median ms of each function that runs, timed round-robin; errors of those that do not.
    slow: a baseline that takes long per call (few repetitions are enough)."""
    ms, errors, ok = {}, {}, {}
    for name, fn in fns.items():
        e = probe(fn)
        if e is None:
            ok[name] = fn
        else:
            errors[name] = e
    if ok:
        try:
            t = bu.bench_many(
                ok,
                device=DEV,
                warmup=1 if slow else cfg.warmup,
                min_reps=3 if slow else cfg.min_reps,
                max_reps=5 if slow else cfg.max_reps,
                budget_s=cfg.budget_s,
            )
            ms = {name: tm.median * 1e3 for name, tm in t.items()}
        except Exception as e:  # noqa: BLE001
            errors.update({name: f"while timing: {_err(e)}" for name in ok})
    return ms, errors


def tflops(flops: float | None, ms: float | None) -> float | None:
    return None if not flops or not ms else flops / (ms * 1e-3) / 1e12


def make_row(bench: str, case: str, shape: dict, flops: int | None, formula: str | None, ms: dict, errors: dict,
             primary: str | None, others: list[str], check: dict | None = None, extra: dict | None = None) -> dict:
    """One glm5 measurement ("glm5" in ms/errors) with its primary baseline and the others."""
    k_ms = ms.get("glm5")
    row = {
        "bench": bench, "case": case, "shape": shape, "flops": flops, "flop_formula": formula,
        "ms": k_ms, "tflops": tflops(flops, k_ms), "error": errors.get("glm5"),
        "baseline": primary, "baseline_ms": ms.get(primary), "baseline_tflops": None, "ratio": None,
        "baseline_error": errors.get(primary) if primary else None,
        "target": None, "met": None, "check": check or {},
    }
    if primary and ms.get(primary):
        row["baseline_tflops"] = tflops(flops, ms[primary])
        row["ratio"] = ms[primary] / k_ms if k_ms else None
    row["others"] = [
        {"name": n, "ms": ms.get(n), "tflops": tflops(flops, ms.get(n)),
         "ratio": (ms[n] / k_ms) if (k_ms and ms.get(n)) else None, "error": errors.get(n)}
        for n in others
    ]
    if bench in TARGETS:
        kind, thr = TARGETS[bench]
        row["target"] = f">= {thr:g} TFLOP/s" if kind == "tflops" else f">= {thr:g}x {primary}"
        value = row["tflops"] if kind == "tflops" else row["ratio"]
        row["met"] = None if value is None else bool(value >= thr)
        if row["met"] and check and not check.get("ok"):
            row["met"], row["met_note"] = False, "fast enough, but the output check failed"
    if extra:
        row.update(extra)
    return row


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64 over finite reference entries (inf if out has a NaN/inf there),
    in slices of 2^26 elements so that a GB-sized output needs no fp64 copy of itself."""
    if out.shape != ref.shape:
        raise ValueError(f"shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    out, ref = out.reshape(-1), ref.reshape(-1)
    num = den = 0.0
    step = 1 << 26
    for i in range(0, ref.numel(), step):
        r, o = ref[i:i + step].double(), out[i:i + step].double()
        fin = torch.isfinite(r)
        if not torch.isfinite(o[fin]).all():
            return math.inf
        num += (o[fin] - r[fin]).square().sum().item()
        den += r[fin].square().sum().item()
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


def close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> dict:
    e = rel_err(out, ref)
    return {f"{name}_rel_err": e, f"{name}_ok": bool(e <= tol)}


def run_check(fn: Callable[[], dict]) -> dict:
    """A correctness check's verdict: its fields plus ok (all *_ok true), or the error it raised."""
    try:
        c = fn()
        c["ok"] = all(v for k, v in c.items() if k.endswith("_ok"))
        return c
    except Exception as e:  # noqa: BLE001
        if isinstance(e, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        return {"ok": False, "error": _err(e)}


def chunk_rows(total: int, bytes_per_row: int, budget: int = 3 << 30) -> int:
    """Rows per chunk so that a chunk's largest temporary stays under `budget` bytes."""
    return max(1, min(total, budget // max(1, bytes_per_row)))


def randn(*shape, scale: float = 1.0, dtype=BF16, gen=None) -> torch.Tensor:
    return (torch.randn(*shape, device=DEV, generator=gen) * scale).to(dtype)


# ---------------------------------------------------------------------------------------------
# torch baselines (plain PyTorch, bf16 tensor-core GEMMs, fp32 softmax / accumulation)
# ---------------------------------------------------------------------------------------------


def causal_topk_indices(T: int, S: int, K: int, gen) -> torch.Tensor:
    """[T, K] int32: query t (the t-th of the last T positions of a causal S-token sequence) gets K
    distinct random keys of its visible range [0, S-T+t], in random order (an indexer lists them by
    score, not by position). Needs S - T + 1 >= K, so every slot is valid."""
    assert S - T + 1 >= K, "every query must see at least K keys"
    out = torch.empty(T, K, dtype=torch.int32, device=DEV)
    pos = torch.arange(S, device=DEV)
    step = chunk_rows(T, 4 * S, 256 << 20)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        r = torch.rand(t1 - t0, S, device=DEV, generator=gen)
        ends = S - T + 1 + torch.arange(t0, t1, device=DEV)  # exclusive visible end per query
        r.masked_fill_(pos[None, :] >= ends[:, None], -1.0)
        out[t0:t1] = r.topk(K, dim=1).indices.to(torch.int32)
    return out


def torch_sparse_mla_fwd(q, kv, idx, scale, dv, step):
    """Gather the selected latents, bf16 bmm for QK^T and PV, fp32 softmax. Assumes no -1 slots."""
    T, H, _ = q.shape
    out = q.new_empty(T, H, dv)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    for t0 in range(0, T, step):
        sl = slice(t0, t0 + step)
        kv_g = kv[idx[sl].long()]  # [Tc, K, D]
        s = torch.bmm(q[sl], kv_g.transpose(1, 2)).float() * scale  # [Tc, H, K]
        lse[sl] = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse[sl, :, None]).to(q.dtype)
        out[sl] = torch.bmm(p, kv_g[..., :dv])
    return out, lse


def torch_sparse_mla_bwd(dout, q, kv, idx, out, lse, scale, dv, step):
    """The same math as the kernel's backward in plain torch: dq [T,H,D], dkv [S,D] (fp32 scatter-add)."""
    dq = torch.empty_like(q)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    for t0 in range(0, q.shape[0], step):
        sl = slice(t0, t0 + step)
        ii = idx[sl].long()
        kv_g = kv[ii]  # [Tc, K, D]
        p = torch.exp(torch.bmm(q[sl], kv_g.transpose(1, 2)).float() * scale - lse[sl, :, None])  # [Tc,H,K]
        dp = torch.bmm(dout[sl], kv_g[..., :dv].transpose(1, 2)).float()  # dO V^T
        delta = (dout[sl].float() * out[sl].float()).sum(dim=-1, keepdim=True)  # rowsum(dO * O)
        ds = (p * (dp - delta) * scale).to(q.dtype)
        dq[sl] = torch.bmm(ds, kv_g)  # dS K
        dkv_g = torch.bmm(ds.transpose(1, 2), q[sl]).float()  # dS^T Q  [Tc, K, D]
        dkv_g[..., :dv] += torch.bmm(p.to(q.dtype).transpose(1, 2), dout[sl]).float()  # P^T dO
        dkv.index_add_(0, ii.flatten(), dkv_g.flatten(0, 1))
    return dq, dkv.to(kv.dtype)


def torch_indexer_logits(q, k, w, ks, ke, step, out=None):
    """bf16 matmul for the per-head scores, relu, bf16 bmm for the weighted head sum; fp32 [T, S]."""
    T, HI, DI = q.shape
    S = k.shape[0]
    out = torch.empty(T, S, dtype=torch.float32, device=q.device) if out is None else out
    pos = torch.arange(S, device=q.device)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        s = torch.mm(q[t0:t1].reshape(-1, DI), k.t()).view(t1 - t0, HI, S).relu_()
        lg = torch.bmm(w[t0:t1].unsqueeze(1), s).squeeze(1).float()
        lg.masked_fill_((pos[None] < ks[t0:t1, None]) | (pos[None] >= ke[t0:t1, None]), float("-inf"))
        out[t0:t1] = lg
    return out


def torch_indexer_topk(q, k, w, ks, ke, topk, step):
    """Logits chunk by chunk (as torch_indexer_logits), then torch.topk of each chunk."""
    T = q.shape[0]
    idx = torch.empty(T, topk, dtype=torch.int32, device=q.device)
    val = torch.empty(T, topk, dtype=torch.float32, device=q.device)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        lg = torch_indexer_logits(q[t0:t1], k, w[t0:t1], ks[t0:t1], ke[t0:t1], t1 - t0)
        v, i = lg.topk(topk, dim=1)
        idx[t0:t1], val[t0:t1] = i.to(torch.int32), v
    return idx, val


def torch_moe_route(logits, bias, topk, scale):
    """Sigmoid scores, top-k of scores + bias, weights = chosen scores renormalised, times scale."""
    s = logits.sigmoid()
    idx = (s + bias).topk(topk, dim=1).indices
    w = s.gather(1, idx)
    return idx.to(torch.int32), w / (w.sum(dim=-1, keepdim=True) + 1e-20) * scale


# ---------------------------------------------------------------------------------------------
# Benchmarks: each returns a list of rows
# ---------------------------------------------------------------------------------------------


def bench_matmul_ceiling(cfg: Cfg, ref) -> list[dict]:
    n = SIZES[cfg.size]["matmul_n"]
    a, b = randn(n, n), randn(n, n)
    ms, errors = time_group({"glm5": lambda: torch.matmul(a, b)}, cfg)  # "glm5" slot: the measured fn
    row = make_row("matmul_ceiling", f"torch.matmul bf16 {n}^3", {"n": n}, bu.matmul_flops(n, n, n), "2*n^3",
                   ms, errors, None, [])
    row["note"] = "the device's bf16 GEMM rate through cuBLAS: the ceiling every TFLOP/s here is set against"
    return [row]


def _mla_shape(cfg: Cfg) -> dict:
    T, S, H, K = SIZES[cfg.size]["mla"]
    return {"T": T, "S": S, "H": H, "K": K, "d_qk": 576, "d_v": 512, "dtype": "bf16"}


def _mla_inputs(sh: dict):
    g = torch.Generator(device=DEV).manual_seed(1)
    q = randn(sh["T"], sh["H"], sh["d_qk"], gen=g)
    kv = randn(sh["S"], sh["d_qk"], gen=g)
    idx = causal_topk_indices(sh["T"], sh["S"], sh["K"], g)
    return q, kv, idx


SM_SCALE = 256**-0.5  # GLM-5: qk head dim 256 in the MHA form, the same scale in the absorbed form


def with_env(name: str, value: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with the environment variable `name` set to value (the kernels read their knobs per call)."""

    def run():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old

    return run


def bench_sparse_mla_fwd(cfg: Cfg, ref) -> list[dict]:
    sh = _mla_shape(cfg)
    T, S, H, K, DQK, DV = sh["T"], sh["S"], sh["H"], sh["K"], sh["d_qk"], sh["d_v"]
    q, kv, idx = _mla_inputs(sh)
    flops = 2 * T * H * K * (DQK + DV)
    step_bf16 = chunk_rows(T, K * DQK * 2 + 2 * H * K * 4)
    step_ref = chunk_rows(T, K * DQK * 4 + 3 * H * K * 4)
    fwd = lambda: torch.ops.glm5.sparse_mla_fwd(q, kv, idx, SM_SCALE, DV)  # noqa: E731
    # The same op on its mma.sync kernel (the wgmma one switched off), for the side-by-side figure.
    fwd_mma_sync = with_env("GLM5_WGMMA", "0", fwd)

    n = min(T, 128)

    def check():
        out, lse = torch.ops.glm5.sparse_mla_fwd(q[:n], kv, idx[:n], SM_SCALE, DV)
        m_out, m_lse = with_env("GLM5_WGMMA", "0",
                                lambda: torch.ops.glm5.sparse_mla_fwd(q[:n], kv, idx[:n], SM_SCALE, DV))()
        r_out, r_lse = ref.sparse_mla(q[:n], kv, idx[:n], SM_SCALE, DV)  # fp32 math on bf16 values
        b_out, _ = torch_sparse_mla_fwd(q[:n], kv, idx[:n], SM_SCALE, DV, n)
        mma = close("out", m_out, r_out, 2e-2)
        return {**close("out", out, r_out, 2e-2), **close("lse", lse, r_lse, 1e-3),
                "mma_sync_out_rel_err": rel_err(m_out, r_out), "mma_sync_lse_rel_err": rel_err(m_lse, r_lse),
                "mma_sync_ok": mma["out_ok"], "baseline_out_rel_err": rel_err(b_out, r_out), "rows_checked": n}

    chk = run_check(check)

    def reference_chunked():
        for t0 in range(0, T, step_ref):
            ref.sparse_mla(q[t0:t0 + step_ref], kv, idx[t0:t0 + step_ref], SM_SCALE, DV)

    ms, errors = time_group({"glm5": fwd, "glm5_mma_sync": fwd_mma_sync,
                             "torch_bf16": lambda: torch_sparse_mla_fwd(q, kv, idx, SM_SCALE, DV, step_bf16)}, cfg)
    m2, e2 = time_group({"reference_fp32": reference_chunked}, cfg, slow=True)
    ms.update(m2)
    errors.update(e2)
    del q, kv, idx
    torch.cuda.empty_cache()

    # Dense attention at the same T, S: SDPA in the expanded MHA form (64 heads, qk 256, v 256), the
    # last T queries of a causal S-token sequence (bottom-right aligned causal mask).
    pairs = bu.causal_pairs(T, S)
    dense_flops = bu.attention_flops(H, 256, 256, pairs)
    dense_ms, dense_err = None, None
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.bias import causal_lower_right

        g = torch.Generator(device=DEV).manual_seed(2)
        qd, kd, vd = randn(1, H, T, 256, gen=g), randn(1, H, S, 256, gen=g), randn(1, H, S, 256, gen=g)
        mask = causal_lower_right(T, S)

        def dense():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=SM_SCALE)

        m3, e3 = time_group({"dense_sdpa": dense}, cfg)
        dense_ms, dense_err = m3.get("dense_sdpa"), e3.get("dense_sdpa")
        del qd, kd, vd
    except Exception as e:  # noqa: BLE001
        dense_err = _err(e)
    torch.cuda.empty_cache()
    ms["dense_sdpa"] = dense_ms
    if dense_err:
        errors["dense_sdpa"] = dense_err

    row = make_row("sparse_mla_fwd", f"T={T} S={S} H={H} K={K}", sh, flops, "2*T*H*K*(d_qk+d_v)", ms, errors,
                   "torch_bf16", ["glm5_mma_sync", "reference_fp32", "dense_sdpa"], chk)
    for o in row["others"]:
        if o["name"] == "glm5_mma_sync":
            o["note"] = "the same op with GLM5_WGMMA=0: the mma.sync kernel (fwd_tc_kernel.cuh)"
        if o["name"] == "dense_sdpa":  # its own FLOPs: every causal pair, MHA form
            o["tflops"] = tflops(dense_flops, o["ms"])
            o["flops"] = dense_flops
            o["note"] = ("SDPA (flash/cuDNN/mem-efficient, bottom-right causal) in MHA form: 64 heads, qk 256, v 256, "
                         "all causal pairs; ratio = dense time / sparse time")
        if o["name"] == "reference_fp32":
            o["note"] = "glm5.ops.reference.sparse_mla (fp32 math, chunked over T)"
    row["baseline_note"] = "torch: gather + bf16 bmm (QK^T, PV) + fp32 softmax, chunked over T"
    return [row]


def bench_sparse_mla_bwd(cfg: Cfg, ref) -> list[dict]:
    sh = _mla_shape(cfg)
    T, S, H, K, DQK, DV = sh["T"], sh["S"], sh["H"], sh["K"], sh["d_qk"], sh["d_v"]
    q, kv, idx = _mla_inputs(sh)
    flops = 2 * T * H * K * (3 * DQK + 2 * DV)
    g = torch.Generator(device=DEV).manual_seed(3)
    dout = randn(T, H, DV, gen=g)
    step_fwd = chunk_rows(T, K * DQK * 2 + 2 * H * K * 4)
    step_bwd = chunk_rows(T, K * DQK * (2 + 4) + 3 * H * K * 4)
    # out/lse from the torch forward, so the backward is timed (and checked) even if the glm5 forward is wrong
    out, lse = torch_sparse_mla_fwd(q, kv, idx, SM_SCALE, DV, step_fwd)

    n = min(T, 128)

    def check():
        qf = q[:n].float().requires_grad_()
        kvf = kv.float().requires_grad_()
        r_out, r_lse = ref.sparse_mla(qf, kvf, idx[:n], SM_SCALE, DV)
        r_out.backward(dout[:n].float())
        o16 = r_out.detach().to(BF16)
        bwd = lambda: torch.ops.glm5.sparse_mla_bwd(dout[:n], q[:n], kv, idx[:n], o16, r_lse.detach(),  # noqa: E731
                                                    SM_SCALE, DV)
        dq, dkv = bwd()
        mdq, mdkv = with_env("GLM5_WGMMA", "0", bwd)()
        bdq, bdkv = torch_sparse_mla_bwd(dout[:n], q[:n], kv, idx[:n], o16, r_lse.detach(), SM_SCALE, DV, n)
        return {**close("dq", dq, qf.grad, 2e-2), **close("dkv", dkv, kvf.grad, 2e-2),
                **{f"mma_sync_{k}": v for k, v in {**close("dq", mdq, qf.grad, 2e-2),
                                                    **close("dkv", mdkv, kvf.grad, 2e-2)}.items()},
                "baseline_dq_rel_err": rel_err(bdq, qf.grad), "baseline_dkv_rel_err": rel_err(bdkv, kvf.grad),
                "rows_checked": n}

    chk = run_check(check)
    bwd_full = lambda: torch.ops.glm5.sparse_mla_bwd(dout, q, kv, idx, out, lse, SM_SCALE, DV)  # noqa: E731
    ms, errors = time_group({
        "glm5": bwd_full,
        "glm5_mma_sync": with_env("GLM5_WGMMA", "0", bwd_full),
        "torch_bf16": lambda: torch_sparse_mla_bwd(dout, q, kv, idx, out, lse, SM_SCALE, DV, step_bwd),
    }, cfg)
    row = make_row("sparse_mla_bwd", f"T={T} S={S} H={H} K={K}", sh, flops, "2*T*H*K*(3*d_qk+2*d_v)", ms, errors,
                   "torch_bf16", ["glm5_mma_sync"], chk)
    row["others"][0]["note"] = "the same op with GLM5_WGMMA=0: the mma.sync kernel (bwd_tc_kernel.cuh)"
    row["baseline_note"] = "torch: the same backward with gather + bf16 bmm, fp32 softmax and fp32 index_add_ for dkv"
    return [row]


def _gemm_cases(cfg: Cfg) -> list[tuple[str, int, int, int, str]]:
    """(projection, experts, N, K, counts): GLM-5 expert shapes (hidden D 6144, expert width F 2048):
    gate_up [M, D] x [D, 2F], down [M, F] x [F, D]."""
    g = SIZES[cfg.size]["gemm"]
    E, D, Fw = g["E"], g["D"], g["F"]
    cases = []
    for r in g["rows"]:
        cases += [("gate_up", E, 2 * Fw, D, f"uniform{r}"), ("down", E, D, Fw, f"uniform{r}")]
    if g["skewed"]:
        cases.append(("gate_up", E, 2 * Fw, D, f"skewed{g['rows'][0]}"))
    return cases


def _expert_counts(E: int, how: str) -> list[int]:
    """Rows per expert: uniformN = N each; skewedN = E*N rows drawn with lognormal expert popularity."""
    if how.startswith("uniform"):
        return [int(how.removeprefix("uniform"))] * E
    total = E * int(how.removeprefix("skewed"))
    g = torch.Generator().manual_seed(4)
    probs = torch.exp(torch.randn(E, generator=g) * 0.7)
    choice = torch.multinomial(probs / probs.sum(), total, replacement=True, generator=g)
    return torch.bincount(choice, minlength=E).tolist()


def _grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


def bench_grouped_gemm(cfg: Cfg, ref, wgrad: bool = False) -> list[dict]:
    rows = []
    for proj, E, N, K, how in _gemm_cases(cfg):
        counts = _expert_counts(E, how)
        off = [0]
        for c in counts:
            off.append(off[-1] + c)
        M = off[-1]
        g = torch.Generator(device=DEV).manual_seed(5)
        offsets = torch.tensor(off, dtype=torch.int64, device=DEV)
        ends = offsets[1:].to(torch.int32)
        x = randn(M, K, gen=g)
        flops = bu.matmul_flops(M, N, K)
        shape = {"projection": proj, "experts": E, "rows": how, "M": M, "N": N, "K": K, "dtype": "bf16",
                 "min_rows": min(counts), "max_rows": max(counts)}
        if not wgrad:
            w = randn(E, N, K, scale=K**-0.5, gen=g)
            y_loop = torch.empty(M, N, dtype=BF16, device=DEV)

            def loop():
                for e in range(E):
                    torch.mm(x[off[e]:off[e + 1]], w[e].t(), out=y_loop[off[e]:off[e + 1]])

            fns = {"glm5": lambda: torch.ops.glm5.grouped_gemm(x, w, offsets, False),
                   "dense_matmul": lambda: torch.matmul(x, w[0].t()),
                   "per_expert_loop": loop}
            if _grouped_mm_available():
                fns["torch._grouped_mm"] = lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=ends)

            def check():
                loop()
                c = close("y", torch.ops.glm5.grouped_gemm(x, w, offsets, False), y_loop, 1e-2)
                if _grouped_mm_available():
                    c["grouped_mm_rel_err"] = rel_err(torch._grouped_mm(x, w.transpose(-2, -1), offs=ends), y_loop)
                return c
        else:
            dy = randn(M, N, gen=g)
            dw_loop = torch.empty(E, N, K, dtype=BF16, device=DEV)

            def loop():
                for e in range(E):
                    torch.mm(dy[off[e]:off[e + 1]].t(), x[off[e]:off[e + 1]], out=dw_loop[e])

            fns = {"glm5": lambda: torch.ops.glm5.grouped_gemm_wgrad(dy, x, offsets),
                   "dense_matmul": lambda: torch.mm(dy.t(), x),
                   "per_expert_loop": loop}
            if _grouped_mm_available():
                fns["torch._grouped_mm"] = lambda: torch._grouped_mm(dy.t(), x, offs=ends)

            def check():
                loop()
                return close("dw", torch.ops.glm5.grouped_gemm_wgrad(dy, x, offsets), dw_loop, 1e-2)

        chk = run_check(check)
        ms, errors = time_group(fns, cfg)
        others = ["per_expert_loop"] + (["torch._grouped_mm"] if _grouped_mm_available() else [])
        bench = "grouped_gemm_wgrad" if wgrad else "grouped_gemm"
        row = make_row(bench, f"{proj} E={E} {how}", shape, flops, "2*M*N*K", ms, errors, "dense_matmul", others, chk)
        row["baseline_note"] = "one dense torch GEMM of the same FLOPs ([M,K]x[K,N]; wgrad: [N,M]x[M,K])"
        rows.append(row)
        del x, fns
        torch.cuda.empty_cache()
    return rows


def bench_grouped_gemm_wgrad(cfg: Cfg, ref) -> list[dict]:
    return bench_grouped_gemm(cfg, ref, wgrad=True)


def _indexer_inputs(cfg: Cfg):
    T, S, K = SIZES[cfg.size]["indexer"]
    HI, DI = 32, 128
    g = torch.Generator(device=DEV).manual_seed(6)
    q = randn(T, HI, DI, gen=g)
    k = randn(S, DI, gen=g)
    w = randn(T, HI, scale=(HI * DI) ** -0.5, gen=g)
    ke = torch.arange(S - T + 1, S + 1, dtype=torch.int32, device=DEV)  # query t sees keys [0, S-T+t]
    ks = torch.zeros_like(ke)
    shape = {"T": T, "S": S, "HI": HI, "DI": DI, "topk": K, "dtype": "bf16", "ks_ke": "causal, one document"}
    return shape, q, k, w, ks, ke


def bench_indexer_topk(cfg: Cfg, ref) -> list[dict]:
    sh, q, k, w, ks, ke = _indexer_inputs(cfg)
    T, S, HI, DI, K = sh["T"], sh["S"], sh["HI"], sh["DI"], sh["topk"]
    flops = bu.indexer_flops(HI, DI, bu.causal_pairs(T, S))
    step = chunk_rows(T, HI * S * 2 + 3 * S * 4, 4 << 30)
    n = min(T, 64)

    def check():
        gi, gv = torch.ops.glm5.indexer_topk(q[:n], k, w[:n], ks[:n], ke[:n], K)
        truth = ref.indexer_logits(q[:n], k, w[:n], ks[:n], ke[:n])  # fp32 [n, S]
        top = max(1.0, truth[torch.isfinite(truth)].abs().max().item())
        tol = 1e-3 * top
        inrange = bool(((gi >= 0) & (gi < ke[:n, None])).all())
        srt = gi.long().sort(dim=1).values
        distinct = bool((srt[:, 1:] != srt[:, :-1]).all())
        gathered = truth.gather(1, gi.long().clamp(min=0))
        kth = truth.topk(K, dim=1).values[:, -1]
        rtop = truth.topk(K, dim=1).indices
        recall = torch.zeros(n, S, dtype=torch.bool, device=DEV).scatter_(1, rtop, True).gather(1, gi.long().clamp(min=0))
        bi, _ = torch_indexer_topk(q[:n], k, w[:n], ks[:n], ke[:n], K, n)
        b_rec = torch.zeros(n, S, dtype=torch.bool, device=DEV).scatter_(1, rtop, True).gather(1, bi.long())
        return {
            "indices_valid_ok": inrange and distinct,
            "scores_ok": bool((gathered - gv).abs().max().item() <= tol),
            "topk_set_ok": bool((gv.min(dim=1).values >= kth - tol).all()),
            "sorted_ok": bool((gv[:, :-1] >= gv[:, 1:]).all()),
            "recall_vs_fp32": recall.float().mean().item(),
            "baseline_recall_vs_fp32": b_rec.float().mean().item(),
            "rows_checked": n,
        }

    chk = run_check(check)
    ms, errors = time_group({
        "glm5": lambda: torch.ops.glm5.indexer_topk(q, k, w, ks, ke, K),
        "torch_logits_topk": lambda: torch_indexer_topk(q, k, w, ks, ke, K, step),
    }, cfg)
    row = make_row("indexer_topk", f"T={T} S={S} topk={K}", sh, flops, "2*HI*DI*visible_pairs", ms, errors,
                   "torch_logits_topk", [], chk)
    row["baseline_note"] = (f"torch, chunks of {step} queries: bf16 matmul scores [Tc*32,S], relu, bf16 bmm head sum, "
                            "fp32 mask, torch.topk")
    return [row]


def bench_indexer_logits(cfg: Cfg, ref) -> list[dict]:
    sh, q, k, w, ks, ke = _indexer_inputs(cfg)
    T, S, HI, DI = sh["T"], sh["S"], sh["HI"], sh["DI"]
    sh = {kk: v for kk, v in sh.items() if kk != "topk"}
    flops = bu.indexer_flops(HI, DI, bu.causal_pairs(T, S))
    step = chunk_rows(T, HI * S * 2 + 2 * S * 4, 4 << 30)
    buf = torch.empty(T, S, dtype=torch.float32, device=DEV)
    n = min(T, 64)

    def check():
        out = torch.ops.glm5.indexer_logits(q[:n], k, w[:n], ks[:n], ke[:n])
        truth = ref.indexer_logits(q[:n], k, w[:n], ks[:n], ke[:n])
        same_mask = torch.equal(torch.isinf(out), torch.isinf(truth))
        return {**close("logits", out, truth, 1e-3), "inf_mask_ok": same_mask, "rows_checked": n}

    chk = run_check(check)
    ms, errors = time_group({
        "glm5": lambda: torch.ops.glm5.indexer_logits(q, k, w, ks, ke),
        "torch_bf16": lambda: torch_indexer_logits(q, k, w, ks, ke, step, out=buf),
    }, cfg)
    row = make_row("indexer_logits", f"T={T} S={S}", sh, flops, "2*HI*DI*visible_pairs", ms, errors, "torch_bf16",
                   [], chk)
    row["baseline_note"] = "torch: bf16 matmul scores, relu, bf16 bmm head sum, fp32 mask into a [T,S] buffer"
    return [row]


def bench_indexer_kl_loss(cfg: Cfg, ref) -> list[dict]:
    """The sparse stage's indexer KL loss, forward + backward, at GLM-5 widths: the main attention's
    64 x 576 heads (their head-summed probabilities, from the saved lse, are the target) and the indexer's
    32 x 128, over each query's top-k keys."""
    sh, q_idx, k_idx, w, ks, ke = _indexer_inputs(cfg)
    T, S, K = sh["T"], sh["S"], sh["topk"]
    H, D, HI, DI = 64, 576, sh["HI"], sh["DI"]
    g = torch.Generator(device=DEV).manual_seed(8)
    q = randn(T, H, D, gen=g)
    kv = randn(S, D, gen=g)
    idx = causal_topk_indices(T, S, K, g)
    _, lse = torch_sparse_mla_fwd(q, kv, idx, SM_SCALE, 512, chunk_rows(T, K * D * 2 + 2 * H * K * 4))
    sh = {**sh, "H": H, "D_qk": D, "mode": "sparse"}
    grad = torch.ones(T, device=DEV)
    args = (q_idx, k_idx, w, q, kv, lse, ks, ke, SM_SCALE, idx)
    # Useful work: the target P (2*H*D per pair, once in each direction) and the indexer's scores (2*HI*DI
    # per pair: once forward, three times backward: recompute, dq_idx, dk_idx).
    flops = 2 * T * K * (2 * H * D + 4 * HI * DI)

    def both():
        loss = torch.ops.glm5.indexer_kl_loss_fwd(*args)
        return loss, torch.ops.glm5.indexer_kl_loss_bwd(grad, *args)

    n = min(T, 32)

    def check():
        a = (q_idx[:n], k_idx, w[:n], q[:n], kv, lse[:n], ks[:n], ke[:n], SM_SCALE, idx[:n])
        loss = torch.ops.glm5.indexer_kl_loss_fwd(*a)
        dq, dk, dw = torch.ops.glm5.indexer_kl_loss_bwd(torch.ones(n, device=DEV), *a)
        c_loss = with_env("GLM5_WGMMA", "0", lambda: torch.ops.glm5.indexer_kl_loss_fwd(*a))()
        qf, kf, wf = (t.float().requires_grad_() for t in (q_idx[:n], k_idx, w[:n]))
        r = ref.indexer_kl_loss(qf, kf, wf, q[:n], kv, lse[:n], ks[:n], ke[:n], SM_SCALE, idx[:n])
        r.backward()
        return {**close("loss", loss.sum(), r.detach(), 1e-3), **close("dq_idx", dq, qf.grad, 2e-2),
                **close("dk_idx", dk, kf.grad, 2e-2), **close("dw", dw, wf.grad, 2e-2),
                "cuda_core_target_loss_rel_err": rel_err(c_loss.sum(), r.detach()), "rows_checked": n}

    chk = run_check(check)
    ms, errors = time_group({"glm5": both, "glm5_cuda_core_target": with_env("GLM5_WGMMA", "0", both)}, cfg)
    row = make_row("indexer_kl_loss", f"T={T} S={S} topk={K}", sh, flops, "2*T*K*(2*H*D + 4*HI*DI), fwd+bwd", ms,
                   errors, "glm5_cuda_core_target", [], chk)
    row["baseline_note"] = "the same op with GLM5_WGMMA=0: the target P recomputed on CUDA cores in every pass"
    return [row]


def _route_inputs(cfg: Cfg):
    N, E, k = SIZES[cfg.size]["moe"][0], 256, 8
    g = torch.Generator(device=DEV).manual_seed(7)
    logits = torch.randn(N, E, device=DEV, generator=g)
    bias = torch.randn(E, device=DEV, generator=g) * 0.01
    return N, E, k, logits, bias


ROUTE_SCALE = 2.5  # GLM-5 routed_scaling_factor


def bench_moe_route(cfg: Cfg, ref) -> list[dict]:
    N, E, k, logits, bias = _route_inputs(cfg)
    shape = {"N": N, "E": E, "topk": k, "dtype": "fp32", "n_group": 1}

    def check():
        gi, gw = torch.ops.glm5.moe_route(logits, bias, k, 1, 1, True, ROUTE_SCALE)
        ri, rw = ref.moe_route(logits, bias, k, 1, 1, True, ROUTE_SCALE)
        return {"idx_ok": torch.equal(gi, ri), **close("w", gw, rw, 1e-5)}

    chk = run_check(check)
    ms, errors = time_group({
        "glm5": lambda: torch.ops.glm5.moe_route(logits, bias, k, 1, 1, True, ROUTE_SCALE),
        "torch_topk": lambda: torch_moe_route(logits, bias, k, ROUTE_SCALE),
        "reference": lambda: ref.moe_route(logits, bias, k, 1, 1, True, ROUTE_SCALE),
    }, cfg)
    row = make_row("moe_route", f"N={N} E={E} top{k}", shape, None, None, ms, errors, "torch_topk", ["reference"], chk)
    row["baseline_note"] = "torch: sigmoid, topk(scores + bias), gather, renormalise (reference: stable sort)"
    return [row]


def _permute_inputs(cfg: Cfg):
    N, E, k, logits, bias = _route_inputs(cfg)
    D = SIZES[cfg.size]["moe"][1]
    topk_idx, topk_w = torch_moe_route(logits, bias, k, ROUTE_SCALE)
    x = randn(N, D, gen=torch.Generator(device=DEV).manual_seed(8))
    return N, E, k, D, topk_idx, topk_w, x


def bench_moe_permute(cfg: Cfg, ref) -> list[dict]:
    N, E, k, D, topk_idx, _, x = _permute_inputs(cfg)
    shape = {"N": N, "E": E, "topk": k, "D": D, "alignment": 1, "dtype": "bf16"}
    moved = (N * D + N * k * D) * 2  # read x once, write x_sorted

    def check():
        g = torch.ops.glm5.moe_permute(x, topk_idx, E, 1)
        r = ref.moe_permute(x, topk_idx, E, 1)
        return {f"{name}_ok": torch.equal(a, b) for name, a, b in zip(("x_sorted", "row_map", "offsets"), g, r)}

    chk = run_check(check)
    ms, errors = time_group({
        "glm5": lambda: torch.ops.glm5.moe_permute(x, topk_idx, E, 1),
        "reference": lambda: ref.moe_permute(x, topk_idx, E, 1),
    }, cfg)
    row = make_row("moe_permute", f"N={N} E={E} top{k} D={D}", shape, None, None, ms, errors, "reference", [], chk)
    row["gbps"] = moved / (ms["glm5"] * 1e-3) / 1e9 if ms.get("glm5") else None
    row["baseline_note"] = "glm5.ops.reference.moe_permute (torch: stable sort by expert, scatter)"
    return [row]


def bench_moe_unpermute(cfg: Cfg, ref) -> list[dict]:
    N, E, k, D, topk_idx, topk_w, x = _permute_inputs(cfg)
    shape = {"N": N, "E": E, "topk": k, "D": D, "dtype": "bf16"}
    _, row_map, _ = ref.moe_permute(x, topk_idx, E, 1)
    y = randn(N * k, D, gen=torch.Generator(device=DEV).manual_seed(9))
    moved = (N * k * D + N * D) * 2  # read y_sorted once, write out

    def check():
        return close("out", torch.ops.glm5.moe_unpermute(y, row_map, topk_w), ref.moe_unpermute(y, row_map, topk_w), 1e-2)

    chk = run_check(check)
    ms, errors = time_group({
        "glm5": lambda: torch.ops.glm5.moe_unpermute(y, row_map, topk_w),
        "reference": lambda: ref.moe_unpermute(y, row_map, topk_w),
    }, cfg)
    row = make_row("moe_unpermute", f"N={N} top{k} D={D}", shape, None, None, ms, errors, "reference", [], chk)
    row["gbps"] = moved / (ms["glm5"] * 1e-3) / 1e9 if ms.get("glm5") else None
    row["baseline_note"] = "glm5.ops.reference.moe_unpermute (torch: gather rows, weighted sum over slots)"
    return [row]


FUNCS = {name: globals()[f"bench_{name}"] for name in BENCHES}


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _f(v, spec: str) -> str:
    width = int(spec.split(".")[0] or 0) if spec[0].isdigit() else 0
    return "-".rjust(width) if v is None else format(v, spec)


def format_row(r: dict) -> list[str]:
    if r.get("skipped"):
        return [f"{r['bench']:<19} skipped: {r['skipped']}"]
    if r.get("bench_error"):
        return [f"{r['bench']:<19} ERROR: {r['bench_error']}"]
    chk = r.get("check") or {}
    check = "-" if not chk else ("ok" if chk.get("ok") else "MISMATCH" if "error" not in chk else "ERROR")
    met = "-" if r["met"] is None else ("MET" if r["met"] else "not met")
    head = (f"{r['bench']:<19} {r['case']:<28} {_f(r['ms'], '9.3f')} ms {_f(r['tflops'], '7.1f')} TF/s | "
            f"{(r['baseline'] or '-'):<18} {_f(r['baseline_ms'], '9.3f')} ms  x{_f(r['ratio'], '.2f'):<6} | "
            f"{(r['target'] or '-'):<30} {met:<7} | check {check}")
    lines = [head]
    if r.get("error"):
        lines.append(f"{'':<19}   glm5 error: {r['error']}")
    if r.get("baseline_error"):
        lines.append(f"{'':<19}   {r['baseline']} error: {r['baseline_error']}")
    for o in r.get("others", []):
        if o.get("error"):
            lines.append(f"{'':<19}   vs {o['name']}: error {o['error']}")
        else:
            lines.append(f"{'':<19}   vs {o['name']:<18} {_f(o['ms'], '9.3f')} ms {_f(o['tflops'], '7.1f')} TF/s  "
                         f"x{_f(o['ratio'], '.2f')}")
    if "error" in chk:
        lines.append(f"{'':<19}   check error: {chk['error']}")
    elif chk and not chk.get("ok"):
        lines.append(f"{'':<19}   check: " + ", ".join(f"{k}={v}" for k, v in chk.items() if k != "ok"))
    return lines


HEADER = (f"{'benchmark':<19} {'case':<28} {'glm5 ms':>12} {'TFLOP/s':>12} | {'baseline':<18} {'ms':>12}  "
          f"{'speedup':<7} | {'target':<30} {'met':<7} | check")


def summary(rows: list[dict]) -> dict:
    targets = [r for r in rows if r.get("target")]
    return {
        "targets_met": sum(1 for r in targets if r["met"]),
        "targets_total": len(targets),
        "checks_failed": [f"{r['bench']} {r['case']}" for r in rows if r.get("check") and not r["check"].get("ok")],
        "errors": [f"{r['bench']} {r.get('case', '')}: {r.get('error') or r.get('bench_error')}" for r in rows
                   if r.get("error") or r.get("bench_error")],
        "skipped": [r["bench"] for r in rows if r.get("skipped")],
    }


def write_all(paths: list[Path], payload: dict) -> None:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        tmp.replace(p)  # a run killed mid-write leaves the last complete file


def cuda_usable() -> bool:
    """False once an error (an illegal address, say) has left this process's CUDA context unusable."""
    if DEV != "cuda":
        return True
    try:
        torch.cuda.synchronize()
        return torch.ones(1, device=DEV).add_(1).item() == 2.0
    except Exception:  # noqa: BLE001
        return False


def run_child(names: list[str], args, deadline: float | None) -> list[dict]:
    """Run `names` in a fresh process (after this one's CUDA context broke); its rows."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rows.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--only", ",".join(names), "--out-json", str(out),
               "--no-results", "--child"]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--cpu-dry-run"] if args.cpu_dry_run else []
        if deadline is not None:
            cmd += ["--budget-s", f"{max(1.0, deadline - time.monotonic()):.0f}"]
        print(f"[bench_gpu] CUDA context unusable: running {', '.join(names)} in a fresh process", flush=True)
        subprocess.run(cmd, check=False)
        if out.exists():
            return json.loads(out.read_text())["rows"]
    return [{"bench": n, "bench_error": "child process wrote no results"} for n in names]


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Benchmarks: " + ", ".join(BENCHES))
    p.add_argument("--quick", action="store_true", help="smaller shapes (~30 s)")
    p.add_argument("--only", default="", help="comma-separated benchmarks to run (default: all)")
    p.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget: benchmarks that would start after it are skipped (recorded as such)")
    p.add_argument("--out-json", action="append", default=[], help="also write the JSON here (repeatable)")
    p.add_argument("--no-results", action="store_true", help="do not write benchmarks/results/bench_gpu_*.json")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="every benchmark at tiny shapes on the CPU kernels: checks this script's code paths on a "
                        "machine without a GPU (the numbers mean nothing; writes no results file)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    global DEV
    args = parse_args(argv)
    if args.cpu_dry_run:
        DEV, args.no_results = "cpu", True
    t_start = time.monotonic()
    deadline = None if args.budget_s is None else t_start + args.budget_s
    names = [n for n in (args.only.split(",") if args.only else BENCHES) if n]
    skip = {n for n in args.skip.split(",") if n}
    unknown = [n for n in [*names, *skip] if n not in BENCHES]
    if unknown:
        print(f"bench_gpu: unknown benchmark(s) {unknown}; choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    names = [n for n in names if n not in skip]
    if DEV == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU is visible (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda}); this benchmark only runs on a GPU "
              "machine: see benchmarks/README.md, 'GPU (H200)'.", file=sys.stderr)
        return 2

    import glm5
    from glm5.ops import reference as ref

    gpu = torch.cuda.get_device_name(0) if DEV == "cuda" else f"CPU dry run ({bu.cpu_model()})"
    slug = gpu.lower().replace("nvidia", "").strip().replace(" ", "_") or "gpu"
    paths = [Path(p) for p in args.out_json]
    if not args.no_results:
        paths.append(bu.RESULTS_DIR / f"bench_gpu_{slug}{'_quick' if args.quick else ''}.json")
    size = "tiny" if args.cpu_dry_run else "quick" if args.quick else "full"
    cfg = Cfg(size=size, warmup=2, min_reps=3 if args.quick else 5, max_reps=20 if args.quick else 40,
              budget_s=0.3 if args.quick else 0.8)
    machine = bu.machine_info(DEV)
    if not machine.get("git_commit"):
        machine["git_commit"] = os.environ.get("GLM5_GIT_COMMIT")  # the lent machine's copy has no .git
    info = glm5.build_info()
    build = {k: info.get(k) for k in ("extension_loaded", "extension_error", "cuda_kernels", "cuda_archs", "nvcc",
                                      "built_against_torch")}
    build["cuda_ops"] = [op for op, b in (info.get("ops") or {}).items() if "CUDA" in b]
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": machine.get("git_commit"),
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "quick": args.quick,
        "size": size,
        "argv": sys.argv[1:],
        "glm5_build": build,
        "machine": machine,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "timing": dataclasses.asdict(cfg) | {"method": "CUDA events around each call, L2 flushed before it; median"},
        "flop_formulas": {"sparse_mla_fwd": "2*T*H*K*(d_qk+d_v)", "sparse_mla_bwd": "2*T*H*K*(3*d_qk+2*d_v)",
                          "dense_sdpa": "2*H*(d_qk+d_v)*causal_pairs", "grouped_gemm": "2*M*N*K",
                          "indexer": "2*HI*DI*visible_pairs", "matmul": "2*n^3"},
        "targets": {k: f">= {thr:g} {'TFLOP/s' if kind == 'tflops' else 'x the torch baseline'}"
                    for k, (kind, thr) in TARGETS.items()},
        "rows": [],
    }
    if not args.child:
        print(f"[bench_gpu] {gpu}, torch {torch.__version__} (CUDA {torch.version.cuda}), glm5 CUDA kernels: "
              f"{build.get('cuda_kernels')} {build.get('cuda_archs') or ''}, quick={args.quick}", flush=True)
        if DEV == "cuda" and not build["cuda_ops"]:
            print(f"[bench_gpu] WARNING: glm5 has no CUDA kernels here ({build.get('extension_error') or 'built without CUDA'});"
                  " the glm5 rows will error, the torch baselines are still measured", flush=True)

    rows: list[dict] = payload["rows"]
    if not args.child:
        print(HEADER, flush=True)
    for i, name in enumerate(names):
        if deadline is not None and time.monotonic() > deadline:
            rows.append({"bench": name, "skipped": "out of the --budget-s time"})
            print(format_row(rows[-1])[0], flush=True)
            continue
        t0 = time.monotonic()
        torch.manual_seed(0)
        try:
            new = FUNCS[name](cfg, ref)
        except Exception as e:  # noqa: BLE001 - one failing benchmark must not stop the others
            if isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            new = [{"bench": name, "bench_error": _err(e), "traceback": traceback.format_exc()[-3000:]}]
        for r in new:
            r["seconds"] = round(time.monotonic() - t0, 1)
            for line in format_row(r):
                print(line, flush=True)
        rows.extend(new)
        payload["summary"] = summary(rows)
        write_all(paths, payload)
        torch.cuda.empty_cache()
        if not cuda_usable() and i + 1 < len(names):
            rows.extend(run_child(names[i + 1:], args, deadline))
            break

    payload["summary"] = summary(rows)
    payload["seconds"] = round(time.monotonic() - t_start, 1)
    write_all(paths, payload)
    if not args.child:
        print(f"\n== bench_gpu summary ({gpu}, {payload['seconds']} s; speedup = baseline ms / glm5 ms) ==")
        print(HEADER)
        for r in rows:
            for line in format_row(r)[:1]:
                print(line)
        s = payload["summary"]
        print(f"targets met: {s['targets_met']}/{s['targets_total']}; checks failed: {len(s['checks_failed'])}; "
              f"errors: {len(s['errors'])}; skipped: {len(s['skipped'])}")
        for p in paths:
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
