"""DeepSeek Sparse Attention vs dense attention at GLM-5's per-layer shapes, side by side in one run.

For each context length S, a chunk of T queries at the end of a causal S-token sequence:
- dense: torch.nn.functional.scaled_dot_product_attention in MLA's expanded MHA form (64 heads,
  qk 256, v 256), each query attending to its causal prefix (an explicit [T, S] boolean mask);
- DSA: glm5.ops.indexer_topk (32 indexer heads x 128, top-2048) then glm5.ops.sparse_mla in the
  absorbed MQA form (64 heads, qk 576, v 512), reported as a whole and split in its two stages.
Plus a decode case (one query against an S-token latent cache: dense MQA-mode attention vs
indexer_topk + sparse_mla) and indexer_topk's peak extra memory per S (process RSS high-water mark,
one fresh subprocess per S) next to the [T, S] fp32 logits it never materialises. Every kernel's
GFLOP/s is set against torch.matmul's rate for the same dtype, timed round-robin with the kernels
at each S (so a shared machine's load drift hits kernel, baseline and ceiling alike).

    python benchmarks/bench_dsa.py                 # S = 4K..128K, T = 128, bf16 (~10 min on 2 cores)
    python benchmarks/bench_dsa.py --quick         # ~1 minute
    python benchmarks/bench_dsa.py --seq-lens 4096,8192 --queries 16 --dtype fp32 --device cuda

Results: a table on stdout, benchmarks/results/bench_dsa_<device>_<dtype>.json and .png.
Shapes: ../shared/GLM5_REFERENCE.md (section 1.1: 64 heads, qk 192+64, v 256, latent 512+64; section
2: indexer 32 x 128, top-k 2048). FLOP formulas: bench_utils (a multiply-add counts 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402

import glm5  # noqa: E402
from glm5 import info as glm5_info  # noqa: E402
from glm5.ops import reference  # noqa: E402


@dataclasses.dataclass(frozen=True, kw_only=True)
class Glm5Attention:
    """One GLM-5 attention layer's shapes (GLM5_REFERENCE.md 1.1 and 2.1)."""

    heads: int = 64
    qk_dim: int = 256  # expanded MHA form: 192 nope + 64 rope
    v_dim: int = 256
    latent_qk: int = 576  # absorbed MQA form: 512 latent + 64 rope
    latent_v: int = 512
    idx_heads: int = 32
    idx_dim: int = 128
    topk: int = 2048

    @property
    def sm_scale(self) -> float:
        return self.qk_dim**-0.5  # 1/16, the same in both forms


SHAPES = Glm5Attention()
DEFAULT_SEQ_LENS = (4096, 8192, 16384, 32768, 65536, 131072)
QUICK_SEQ_LENS = (4096, 16384, 32768)
ISSUE_BOUND = {32768: 3.7, 65536: 5.0, 131072: 6.2}  # the FLOP-ratio bound as issue 2 quotes it


# ---------------------------------------------------------------------------------------------
# FLOP accounting
# ---------------------------------------------------------------------------------------------


def flop_counts(S: int, T: int, sh: Glm5Attention = SHAPES) -> dict:
    """FLOPs of the last T queries of a causal S-token sequence, dense vs DSA, and their ratio."""
    pairs = bu.causal_pairs(T, S)  # keys visible to the chunk: query i sees S - T + i + 1 keys
    selected = sum(min(sh.topk, S - T + i + 1) for i in range(T))
    dense = bu.attention_flops(sh.heads, sh.qk_dim, sh.v_dim, pairs)
    indexer = bu.indexer_flops(sh.idx_heads, sh.idx_dim, pairs)
    sparse = bu.attention_flops(sh.heads, sh.latent_qk, sh.latent_v, selected)
    return {"pairs": pairs, "selected": selected, "dense": dense, "indexer": indexer, "sparse": sparse,
            "bound": dense / (indexer + sparse)}


def decode_flop_counts(S: int, sh: Glm5Attention = SHAPES) -> dict:
    """One query seeing all S cached keys: dense MQA-mode attention vs indexer + sparse attention."""
    dense = bu.attention_flops(sh.heads, sh.latent_qk, sh.latent_v, S)
    indexer = bu.indexer_flops(sh.idx_heads, sh.idx_dim, S)
    sparse = bu.attention_flops(sh.heads, sh.latent_qk, sh.latent_v, min(sh.topk, S))
    return {"dense": dense, "indexer": indexer, "sparse": sparse, "bound": dense / (indexer + sparse)}


# ---------------------------------------------------------------------------------------------
# The two DSA ops: the compiled kernel when it is registered for the device, else the reference
# ---------------------------------------------------------------------------------------------


def op_impls(device: torch.device, impl: str) -> dict[str, str]:
    """'kernel' or 'reference' for indexer_topk and sparse_mla on this device."""
    out = {}
    for name, qual in (("indexer_topk", "glm5::indexer_topk"), ("sparse_mla", "glm5::sparse_mla_fwd")):
        has = glm5.HAS_EXT and torch._C._dispatch_has_kernel_for_dispatch_key(qual, device.type.upper())
        if impl == "kernel" and not has:
            raise SystemExit(f"--impl kernel: no {device.type} kernel registered for {qual} (see `glm5 info`)")
        out[name] = "kernel" if has and impl != "reference" else "reference"
    return out


def dsa_fns(impls: dict[str, str]):
    topk = glm5.ops.indexer_topk if impls["indexer_topk"] == "kernel" else reference.indexer_topk
    smla = glm5.ops.sparse_mla if impls["sparse_mla"] == "kernel" else reference.sparse_mla
    return topk, smla


def dsa_inputs(S: int, T: int, dtype, device, sh: Glm5Attention = SHAPES) -> dict:
    """Indexer and latent-attention inputs for the last T queries of a causal S-token sequence."""
    g = torch.Generator(device=device).manual_seed(S + T)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    ke = torch.arange(S - T + 1, S + 1, dtype=torch.int32, device=device)  # query i sees keys [0, S-T+i]
    return {
        "q_idx": rnd(T, sh.idx_heads, sh.idx_dim),
        "k_idx": rnd(S, sh.idx_dim),
        "w": rnd(T, sh.idx_heads, scale=(sh.idx_heads * sh.idx_dim) ** -0.5),
        "ks": torch.zeros_like(ke),
        "ke": ke,
        "q": rnd(T, sh.heads, sh.latent_qk),
        "kv": rnd(S, sh.latent_qk),
    }


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def dense_head_group(S: int, dtype, device, sh: Glm5Attention = SHAPES) -> int:
    """Heads per SDPA call so that the expanded K and V fit a memory budget (1 GiB on CPU, 16 GiB on
    GPU): at S = 128K all 64 heads' K and V would be 8.6 GB in bf16. Dense time is linear in heads and
    a group's K/V (>= 0.5 GiB whenever grouping kicks in) is far beyond any cache, so looping over
    head groups costs what one 64-head call would."""
    budget = (16 << 30) if device.type == "cuda" else (1 << 30)
    per_head = S * (sh.qk_dim + sh.v_dim) * torch.finfo(dtype).bits // 8  # K and V bytes per head
    g = sh.heads
    while g > 1 and g * per_head > budget:
        g //= 2
    return g


def measure_prefill(S: int, T: int, dtype, device, impls, matmul, bench_kw: dict, progress, sh=SHAPES) -> dict:
    """Dense SDPA, indexer_topk, sparse_mla, DSA end to end and torch.matmul (the ceiling), timed
    round-robin at one context length."""
    fl = flop_counts(S, T, sh)
    row = {"S": S, "T": T, "flops": fl}

    # Dense baseline: SDPA, expanded MHA form, the chunk attending causally to its prefix.
    group = dense_head_group(S, dtype, device, sh)
    g = torch.Generator(device=device).manual_seed(S)
    q = torch.randn(1, sh.heads, T, sh.qk_dim, generator=g, device=device).to(dtype)
    k = torch.randn(1, group, S, sh.qk_dim, generator=g, device=device).to(dtype)
    v = torch.randn(1, group, S, sh.v_dim, generator=g, device=device).to(dtype)
    pos = torch.arange(S - T, S, device=device)
    mask = torch.arange(S, device=device)[None, :] <= pos[:, None]  # [T, S], True = visible

    def dense():
        for h0 in range(0, sh.heads, group):
            F.scaled_dot_product_attention(q[:, h0 : h0 + group], k, v, attn_mask=mask, scale=sh.sm_scale)

    # DSA: indexer top-k, then sparse MLA over the selected keys.
    topk_fn, smla_fn = dsa_fns(impls)
    x = dsa_inputs(S, T, dtype, device, sh)
    idx_args = (x["q_idx"], x["k_idx"], x["w"], x["ks"], x["ke"], sh.topk)
    indices, _ = topk_fn(*idx_args)
    n_valid = (indices >= 0).sum(dim=1).cpu()
    expect = torch.clamp(x["ke"].cpu() - x["ks"].cpu(), max=sh.topk)
    if not torch.equal(n_valid, expect.to(n_valid.dtype)):
        raise RuntimeError(f"indexer_topk at S={S}: wrong number of selected keys per query")

    def dsa():
        ind, _ = topk_fn(*idx_args)
        return smla_fn(x["q"], x["kv"], ind, sh.sm_scale, sh.latent_v)

    out, lse = dsa()
    if not (torch.isfinite(out).all() and torch.isfinite(lse).all()):
        raise RuntimeError(f"DSA at S={S}: non-finite output")

    t = bu.bench_many({
        "matmul": matmul["fn"],
        "dense": dense,
        "indexer_topk": lambda: topk_fn(*idx_args),
        "sparse_mla": lambda: smla_fn(x["q"], x["kv"], indices, sh.sm_scale, sh.latent_v),
        "dsa": dsa,
    }, device=device, **bench_kw)
    ceiling = matmul["flops"] / t["matmul"].median / 1e9
    row["matmul"] = t["matmul"].as_dict() | {"gflops": ceiling}
    row["dense"] = _rate(t["dense"], fl["dense"], ceiling) | {"head_group": group}
    row["indexer_topk"] = _rate(t["indexer_topk"], fl["indexer"], ceiling)
    row["sparse_mla"] = _rate(t["sparse_mla"], fl["sparse"], ceiling)
    row["dsa"] = _rate(t["dsa"], fl["indexer"] + fl["sparse"], ceiling)
    row["speedup"] = row["dense"]["median_s"] / row["dsa"]["median_s"]
    row["of_bound"] = row["speedup"] / fl["bound"]
    progress.step(f"S={S:>6} prefill: dense {row['dense']['median_s'] * 1e3:.1f} ms, DSA {row['dsa']['median_s'] * 1e3:.1f} ms "
                  f"(idx {row['indexer_topk']['median_s'] * 1e3:.1f} + sparse {row['sparse_mla']['median_s'] * 1e3:.1f}), "
                  f"speedup {row['speedup']:.2f}x (bound {fl['bound']:.2f}x), matmul {ceiling:.0f} GFLOP/s")
    return row


def measure_decode(S: int, dtype, device, impls, ceiling: float, bench_kw: dict, progress, sh=SHAPES) -> dict:
    """One query against all S cached latent keys: dense MQA-mode attention (the 64 heads as one
    [64, 576] x [576, S] GEMM, fp32 softmax, then [64, S] x [S, 512]) vs indexer_topk + sparse_mla."""
    fl = decode_flop_counts(S, sh)
    x = dsa_inputs(S, 1, dtype, device, sh)
    q, kv = x["q"], x["kv"]  # [1, 64, 576], [S, 576]: the query's 64 heads share every latent key

    def dense():
        p = torch.softmax((q[0] @ kv.T).float() * sh.sm_scale, dim=-1).to(dtype)  # [64, S]
        return p @ kv[:, : sh.latent_v]

    topk_fn, smla_fn = dsa_fns(impls)
    idx_args = (x["q_idx"], x["k_idx"], x["w"], x["ks"], x["ke"], sh.topk)
    indices, _ = topk_fn(*idx_args)

    def dsa():
        ind, _ = topk_fn(*idx_args)
        return smla_fn(q, kv, ind, sh.sm_scale, sh.latent_v)

    t = bu.bench_many({
        "dense": dense,
        "indexer_topk": lambda: topk_fn(*idx_args),
        "sparse_mla": lambda: smla_fn(q, kv, indices, sh.sm_scale, sh.latent_v),
        "dsa": dsa,
    }, device=device, **bench_kw)
    row = {"S": S, "flops": fl, "matmul_gflops": ceiling}
    row["dense"] = _rate(t["dense"], fl["dense"], ceiling)
    row["indexer_topk"] = _rate(t["indexer_topk"], fl["indexer"], ceiling)
    row["sparse_mla"] = _rate(t["sparse_mla"], fl["sparse"], ceiling)
    row["dsa"] = _rate(t["dsa"], fl["indexer"] + fl["sparse"], ceiling)
    row["speedup"] = row["dense"]["median_s"] / row["dsa"]["median_s"]
    progress.step(f"S={S:>6} decode: dense {row['dense']['median_s'] * 1e3:.2f} ms, DSA {row['dsa']['median_s'] * 1e3:.2f} ms")
    return row


def _rate(t: bu.Timing, flops: int, ceiling: float) -> dict:
    gflops = flops / t.median / 1e9
    return t.as_dict() | {"gflops": gflops, "of_matmul": gflops / ceiling}


def memory_probe(S: int, T: int, dtype, device, impls, sh=SHAPES) -> dict:
    """indexer_topk's peak extra memory at (S, T), measured in this process. On CPU: the RSS
    high-water mark over its first call at this size (after a one-query warm-up call at S = 512 that
    starts the thread pools) minus the RSS before it; on CUDA: torch's peak allocated bytes."""
    topk_fn, _ = dsa_fns(impls)
    x = dsa_inputs(S, T, dtype, device, sh)
    s0 = min(S, 512)
    one = torch.tensor([s0], dtype=torch.int32, device=device)
    topk_fn(x["q_idx"][:1], x["k_idx"][:s0], x["w"][:1], one * 0, one, sh.topk)
    args = (x["q_idx"], x["k_idx"], x["w"], x["ks"], x["ke"], sh.topk)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        topk_fn(*args)
        torch.cuda.synchronize()
        peak, method = torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated"
    else:
        reset = bu.reset_peak_rss()
        base = bu.rss_bytes() if reset else bu.peak_rss_bytes()
        topk_fn(*args)
        peak, method = bu.peak_rss_bytes() - base, "VmHWM - VmRSS" if reset else "ru_maxrss delta"
    return {"S": S, "T": T, "peak_extra_bytes": max(0, peak), "logits_bytes": T * S * 4, "method": method}


def measure_memory(S: int, T: int, args, device, impls, progress) -> dict:
    if device.type == "cuda":
        row = memory_probe(S, T, bu.DTYPES[args.dtype], device, impls)
    else:  # a fresh process per S, so no earlier allocation hides or inflates the peak
        # A fixed mmap threshold: every block >= 64 KiB is mapped on malloc and unmapped on free, so
        # glibc's heap does not keep (and hide) memory between calls.
        env = dict(os.environ, GLM5_OPS_IMPL=impls["indexer_topk"], MALLOC_MMAP_THRESHOLD_="65536")
        cmd = [sys.executable, __file__, "--_memory-probe", str(S), "--queries", str(T), "--dtype", args.dtype]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"memory probe at S={S} failed:\n{res.stderr[-2000:]}")
        row = json.loads(res.stdout.strip().splitlines()[-1])
    progress.step(f"S={S:>6} indexer_topk memory  {row['peak_extra_bytes'] / 2**20:8.1f} MiB "
                  f"([T,S] logits: {row['logits_bytes'] / 2**20:.1f} MiB)")
    return row


# ---------------------------------------------------------------------------------------------
# Targets, table, plot
# ---------------------------------------------------------------------------------------------


def evaluate_targets(prefill: list[dict], memory: list[dict]) -> dict:
    """The issue's three targets, each with its measured gap."""
    out = {}
    eff = [r["sparse_mla"]["of_matmul"] for r in prefill]
    out["sparse_mla_vs_matmul"] = {
        "target": "sparse_mla forward >= 50% of torch.matmul's GFLOP/s (same run, same dtype), at every S",
        "measured_min": min(eff), "measured_max": max(eff), "met": min(eff) >= 0.5,
    }
    long = [r for r in prefill if r["S"] >= 32768]
    out["dsa_vs_bound"] = {
        "target": "DSA speedup over dense SDPA >= 0.8x the FLOP-ratio bound at every S >= 32K",
        "per_S": {r["S"]: {"speedup": r["speedup"], "bound": r["flops"]["bound"], "of_bound": r["of_bound"],
                           "issue_bound": ISSUE_BOUND.get(r["S"])} for r in long},
        "met": all(r["of_bound"] >= 0.8 for r in long) if long else None,  # None: no S >= 32K in this run
    }
    if memory:
        peaks = [m["peak_extra_bytes"] for m in memory]
        growth, allowance = max(peaks) - min(peaks), max(4 << 20, 0.1 * max(m["logits_bytes"] for m in memory))
        lo, hi = min(memory, key=lambda m: m["S"]), max(memory, key=lambda m: m["S"])
        out["indexer_memory_flat"] = {
            "target": "indexer_topk peak extra memory flat in S: max - min over S <= max(4 MiB, 10% of the "
                      "largest [T,S] fp32 logits)",
            "growth_bytes": growth, "allowance_bytes": allowance, "met": growth <= allowance,
            # growth from the shortest to the longest context, per key: 512 B/key would be an fp32 copy of k
            "bytes_per_key": (hi["peak_extra_bytes"] - lo["peak_extra_bytes"]) / max(1, hi["S"] - lo["S"]),
        }
    return out


def _ms(d: dict) -> str:
    return f"{d['median_s'] * 1e3:9.1f}"


def _gf(d: dict) -> str:
    return f"{d['gflops']:6.1f} ({d['of_matmul'] * 100:3.0f}%)"


def format_tables(res: dict) -> str:
    L = []
    c = res["matmul_ceiling"]
    L.append(f"torch.matmul {c['n']}^3 {c['dtype']}: {c['gflops_median']:.1f} GFLOP/s median over S "
             f"({c['gflops_min']:.1f}..{c['gflops_max']:.1f}; timed round-robin with the kernels at each S: the ceiling, "
             "% below are of that S's rate)")
    L.append(f"ops: indexer_topk={res['impls']['indexer_topk']}, sparse_mla={res['impls']['sparse_mla']}")
    L.append("")
    L.append(f"Prefill: the last {res['config']['queries']} queries of a causal S-token sequence (times: median ms)")
    L.append(f"{'S':>7} | {'dense':>9} | {'DSA':>9} = {'idx+topk':>9} + {'sparse':>9} | {'speedup':>7} | {'bound':>6} | "
             f"{'of bnd':>6} | {'dense GFLOP/s':>14} | {'idx GFLOP/s':>14} | {'sparse GFLOP/s':>14} | {'matmul':>6}")
    for r in res["prefill"]:
        L.append(f"{r['S']:>7} | {_ms(r['dense'])} | {_ms(r['dsa'])} = {_ms(r['indexer_topk'])} + {_ms(r['sparse_mla'])} | "
                 f"{r['speedup']:6.2f}x | {r['flops']['bound']:5.2f}x | {r['of_bound']:6.2f} | {_gf(r['dense']):>14} | "
                 f"{_gf(r['indexer_topk']):>14} | {_gf(r['sparse_mla']):>14} | {r['matmul']['gflops']:6.1f}")
    if res["decode"]:
        L.append("")
        L.append("Decode: one query against an S-token latent cache (dense: MQA-mode matmul-softmax-matmul)")
        L.append(f"{'S':>7} | {'dense':>9} | {'DSA':>9} = {'idx+topk':>9} + {'sparse':>9} | {'speedup':>7} | {'bound':>6} | "
                 f"{'dense GFLOP/s':>14}")
        for r in res["decode"]:
            L.append(f"{r['S']:>7} | {_ms(r['dense'])} | {_ms(r['dsa'])} = {_ms(r['indexer_topk'])} + "
                     f"{_ms(r['sparse_mla'])} | {r['speedup']:6.2f}x | {r['flops']['bound']:5.2f}x | {_gf(r['dense']):>14}")
    if res["memory"]:
        L.append("")
        L.append("indexer_topk peak extra memory (vs the [T,S] fp32 logits it does not build)")
        L.append(f"{'S':>7} | {'peak MiB':>9} | {'logits MiB':>10}")
        for m in res["memory"]:
            L.append(f"{m['S']:>7} | {m['peak_extra_bytes'] / 2**20:9.1f} | {m['logits_bytes'] / 2**20:10.1f}")
    L.append("")
    L.append("FLOP-ratio bound for one query at the end of S (issue 2 quotes 3.7x / 5.0x / 6.2x): " + ", ".join(
        f"{S // 1024}K {b['formula']:.2f}x" for S, b in res["bound_check"].items()))
    L.append("")
    for name, t in res["targets"].items():
        L.append(f"[{ {True: 'met', False: 'NOT MET', None: 'not measured'}[t['met']] }] {t['target']}")
        if name == "sparse_mla_vs_matmul":
            L.append(f"      measured {t['measured_min'] * 100:.0f}%..{t['measured_max'] * 100:.0f}% of matmul")
        elif name == "dsa_vs_bound":
            for S, v in t["per_S"].items():
                quoted = f" (issue's bound {v['issue_bound']}x: {v['speedup'] / v['issue_bound']:.2f})" if v["issue_bound"] else ""
                L.append(f"      S={S}: {v['speedup']:.2f}x of a {v['bound']:.2f}x bound = {v['of_bound']:.2f}{quoted}")
        else:
            L.append(f"      growth {t['growth_bytes'] / 2**20:.1f} MiB (allowed {t['allowance_bytes'] / 2**20:.1f} MiB), "
                     f"{t['bytes_per_key']:.0f} bytes per extra key")
    return "\n".join(L)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(2, 2, figsize=(12, 8.5))
    P = res["prefill"]
    S = [r["S"] for r in P]
    a = ax[0, 0]
    for key, label, style in (("dense", "dense SDPA (MHA form)", "o-"), ("dsa", "DSA total", "s-"),
                              ("indexer_topk", "indexer + top-k", "^--"), ("sparse_mla", "sparse_mla", "v--")):
        a.plot(S, [r[key]["median_s"] * 1e3 for r in P], style, label=label)
    a.set(xscale="log", yscale="log", xlabel="context S", ylabel="ms", title=f"prefill: last {res['config']['queries']} queries")
    a = ax[0, 1]
    a.plot(S, [r["speedup"] for r in P], "o-", label="measured speedup (dense / DSA)")
    a.plot(S, [r["flops"]["bound"] for r in P], "k--", label="FLOP-ratio bound")
    a.plot(S, [0.8 * r["flops"]["bound"] for r in P], "k:", label="0.8 x bound (target at S >= 32K)")
    a.set(xscale="log", xlabel="context S", ylabel="speedup", title="prefill speedup")
    if res["decode"]:
        D = res["decode"]
        a = ax[1, 0]
        Sd = [r["S"] for r in D]
        for key, label, style in (("dense", "dense MQA-mode", "o-"), ("dsa", "DSA total", "s-"),
                                  ("indexer_topk", "indexer + top-k", "^--"), ("sparse_mla", "sparse_mla", "v--")):
            a.plot(Sd, [r[key]["median_s"] * 1e3 for r in D], style, label=label)
        a.set(xscale="log", yscale="log", xlabel="context S", ylabel="ms", title="decode: 1 query")
    if res["memory"]:
        M = res["memory"]
        a = ax[1, 1]
        a.plot([m["S"] for m in M], [m["peak_extra_bytes"] / 2**20 for m in M], "o-", label="indexer_topk peak extra")
        a.plot([m["S"] for m in M], [m["logits_bytes"] / 2**20 for m in M], "k--", label="[T,S] fp32 logits")
        a.set(xscale="log", yscale="log", xlabel="context S", ylabel="MiB", title="indexer_topk memory")
    for a in ax.flat:
        if not a.has_data():
            a.axis("off")
        else:
            a.set_xscale("log", base=2)
            a.set_xticks(S, [f"{x // 1024}K" if x % 1024 == 0 else str(x) for x in S])
            a.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            a.grid(True, which="both", alpha=0.3)
            a.legend(fontsize=8)
    m = res["machine"]
    fig.suptitle(f"GLM-5 DSA vs dense, {res['config']['dtype']}, {m.get('gpu', m['cpu'])}, {m['torch_threads']} threads, "
                 f"matmul {res['matmul_ceiling']['gflops_median']:.0f} GFLOP/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated context lengths (default 4096..131072; --quick: 4096,16384,32768)")
    p.add_argument("--queries", type=int, default=None, help="query chunk T at the end of the context (default 128; --quick 32)")
    p.add_argument("--dtype", choices=sorted(bu.DTYPES), default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--impl", choices=("auto", "kernel", "reference"), default="auto",
                   help="auto: each op's compiled kernel when registered for the device, else its reference")
    p.add_argument("--quick", action="store_true", help="a ~1-minute run: fewer, shorter contexts, T = 32, fewer repeats")
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="results path stem (default benchmarks/results/bench_dsa_<device>_<dtype>)")
    p.add_argument("--_memory-probe", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.seq_lens = args.seq_lens or list(QUICK_SEQ_LENS if args.quick else DEFAULT_SEQ_LENS)
    args.queries = args.queries or (32 if args.quick else 128)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), bu.DTYPES[args.dtype]
    impls = op_impls(device, args.impl)
    T = args.queries
    if args._memory_probe is not None:  # child process of measure_memory
        print(json.dumps(memory_probe(args._memory_probe, T, dtype, device, impls)))
        return {}
    if min(args.seq_lens) < T:
        raise SystemExit(f"every --seq-lens value must be >= --queries ({T})")
    bench_kw = {"warmup": 1, "min_reps": 2, "budget_s": 0.5} if args.quick else {"warmup": 1, "min_reps": 3, "budget_s": 2.0}
    if "reference" in impls.values():
        print(f"NOTE: timing the plain-PyTorch reference for {[k for k, v in impls.items() if v == 'reference']} "
              f"(no {device.type} kernel registered, or --impl reference)", file=sys.stderr)

    machine = bu.machine_info(device)  # at the start: the commit measured, the load it started under
    progress = bu.Progress(len(args.seq_lens) * (1 + (not args.no_decode) + (not args.no_memory)))
    n = 8192 if device.type == "cuda" else 4096
    matmul = {"fn": bu.matmul_fn(dtype, device, n), "flops": bu.matmul_flops(n, n, n), "n": n}
    res = {
        "config": {"seq_lens": args.seq_lens, "queries": T, "dtype": args.dtype, "device": str(device), "quick": args.quick,
                   "shapes": dataclasses.asdict(SHAPES), "bench": bench_kw, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])},
        "impls": impls,
        "glm5_ops": {op: glm5_info._backends(op) for op in ("indexer_topk", "sparse_mla_fwd")} if glm5.HAS_EXT else None,
        "prefill": [], "decode": [], "memory": [],
        "bound_check": {S: {"formula": flop_counts(S, 1)["bound"], "issue": ISSUE_BOUND[S]} for S in sorted(ISSUE_BOUND)},
    }
    for S in args.seq_lens:
        res["prefill"].append(measure_prefill(S, T, dtype, device, impls, matmul, bench_kw, progress))
        if not args.no_decode:  # held to the matmul rate measured just before, at the same S
            res["decode"].append(measure_decode(S, dtype, device, impls, res["prefill"][-1]["matmul"]["gflops"], bench_kw, progress))
        if not args.no_memory:
            res["memory"].append(measure_memory(S, T, args, device, impls, progress))
    rates = [r["matmul"]["gflops"] for r in res["prefill"]]
    res["matmul_ceiling"] = {"n": n, "dtype": args.dtype, "gflops_median": statistics.median(rates),
                             "gflops_min": min(rates), "gflops_max": max(rates)}
    res["targets"] = evaluate_targets(res["prefill"], res["memory"])
    res["machine"] = machine | {"load_avg_1m_at_end": os.getloadavg()[0]}

    stem = args.out or bu.RESULTS_DIR / f"bench_dsa_{device.type}_{args.dtype}{'_quick' if args.quick else ''}"
    res["table"] = format_tables(res)
    print(res["table"])
    path = bu.write_json(Path(f"{stem}.json"), {k: v for k, v in res.items() if k != "machine"}, device, machine=res["machine"])
    plot(res, Path(f"{stem}.png"))
    print(f"\nwrote {path} and {Path(f'{stem}.png')}")
    return res


if __name__ == "__main__":
    main()
