"""GLM-5's routed experts on the CPU: glm5.ops.moe_experts against its baselines, side by side in one run.

Two parts, every row timed round-robin with its baselines (bench_utils.bench_many: median of
--reps calls after one warm-up call; the per-expert loop warms up on an eighth of the tokens), so a
shared machine's load drift hits them alike:

1. grouped GEMM vs its ceiling: glm5.ops.grouped_gemm (the experts' gate_up projection, x [M, D] @
   w[e]^T -> [M, 2F], M = experts x rows per expert) against one dense torch.matmul of the same
   FLOPs ([M, D] @ [D, 2F], the ceiling), torch._grouped_mm and a Python loop of per-expert matmuls.
   Target: >= 85% of the dense rate at >= 64 rows per expert.
2. the routed experts (permute, gate_up GEMM, SwiGLU, down GEMM, weighted combine) for N tokens,
   top-8 of 256 experts (routes from glm5.ops.moe_route on random logits): glm5.ops.moe_experts vs
   transformers' per-expert loop (GlmMoeDsaExperts.forward, copied below) vs the same pipeline on
   torch._grouped_mm, and a dense SwiGLU MLP of the same FLOPs (the ceiling). Target: moe_experts
   >= 2x the loop. For forward + backward the loop unbinds the weights first (`unbind_loop`):
   transformers' loop indexes them per expert, which under autograd allocates and adds a full-size
   weight gradient per expert, a cost no one would benchmark against. Forward at GLM-5's width (D 6144, F 2048) and forward + backward at a smaller
   width (D 1536, F 512).

At GLM-5's width 256 experts' weights take 19 GB in bf16, more than these machines hold, so that
case gives expert e the weights w[e] = buffer[8e : 8e + 2F*D] (overlapping views of one buffer:
every expert has its own [2F, D] matrix, streamed from memory by its own GEMM, and the memory of
one). The other cases use real, separate weights.

    python benchmarks/bench_moe.py                      # bf16, ~2 min on 2 idle cores
    python benchmarks/bench_moe.py --quick              # ~30 s
    python benchmarks/bench_moe.py --dtype fp32 --tokens 2048 --small-tokens 2048,8192 --threads 1

Results: a table on stdout and benchmarks/results/bench_moe_cpu_<dtype>_<threads>t.json.
FLOPs: a multiply-add counts 2; experts: 6 * D * F per (token, slot); backward = 2x forward.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402

import glm5  # noqa: E402


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpertShape:
    """One MoE layer's routed experts (GLM5_REFERENCE.md section 3)."""

    dim: int = 6144
    ffn: int = 2048
    experts: int = 256
    topk: int = 8

    def flops_per_slot(self) -> int:
        return 6 * self.dim * self.ffn  # gate_up 2*D*2F + down 2*F*D


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------


def hf_loop(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
    """transformers 5.23 GlmMoeDsaExperts.forward (the eager per-expert loop), verbatim but for names."""
    num_experts = gate_up_proj.shape[0]
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index.long(), num_classes=num_experts + 1)
        expert_mask = expert_mask.permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate, up = F.linear(current_state, gate_up_proj[expert_idx]).chunk(2, dim=-1)
        current_hidden_states = F.silu(gate) * up
        current_hidden_states = F.linear(current_hidden_states, down_proj[expert_idx])
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    return final_hidden_states


def unbind_loop(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
    """hf_loop with the weights unbound once: under autograd, indexing gate_up_proj[e] inside the loop
    makes every expert's backward allocate and add a full-size [E, 2F, D] gradient, unbind does not."""
    num_experts = gate_up_proj.shape[0]
    gate_up, down = gate_up_proj.unbind(0), down_proj.unbind(0)
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index.long(), num_classes=num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
    for e in expert_hit:
        if e == num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[e])
        gate, up = F.linear(hidden_states[token_idx], gate_up[e]).chunk(2, dim=-1)
        out = F.linear(F.silu(gate) * up, down[e]) * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states = final_hidden_states.index_add(0, token_idx, out.to(final_hidden_states.dtype))
    return final_hidden_states


def grouped_mm_experts(x, topk_idx, topk_w, w_gate_up, w_down):
    """The moe_experts pipeline with torch._grouped_mm in place of glm5.ops.grouped_gemm."""
    E, two_f, _ = w_gate_up.shape
    x_sorted, row_map, offsets = glm5.ops.moe_permute(x, topk_idx, E)
    ends = offsets[1:].to(torch.int32)
    gate, up = torch._grouped_mm(x_sorted, w_gate_up.transpose(1, 2), offs=ends).split(two_f // 2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=ends)
    return glm5.ops.moe_unpermute(y, row_map, topk_w)


def grouped_mm_works(dtype) -> bool:
    try:
        x = torch.randn(8, 16).to(dtype)
        torch._grouped_mm(x, torch.randn(2, 16, 16).to(dtype), offs=torch.tensor([3, 8], dtype=torch.int32))
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def dense_mlp(x, w_gate_up, w_down):
    """One SwiGLU MLP over all rows: the same GEMM shapes and FLOPs as the experts, one weight."""
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_down)


LOOP_FWD = "HF per-expert loop"
LOOP_BWD = "per-expert loop (unbind)"

# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def expert_weights(shape: ExpertShape, dtype, shared: bool, gen: torch.Generator):
    """w_gate_up [E, 2F, D], w_down [E, D, F]: separate, or overlapping views of one buffer."""
    E, D, Fd = shape.experts, shape.dim, shape.ffn
    if not shared:
        w_gate_up = (torch.randn(E, 2 * Fd, D, generator=gen) * D**-0.5).to(dtype)
        w_down = (torch.randn(E, D, Fd, generator=gen) * Fd**-0.5).to(dtype)
        return w_gate_up, w_down
    step = 8  # 16 bytes in bf16: every expert starts 8 elements after the previous one
    buf_gu = (torch.randn(2 * Fd * D + step * E, generator=gen) * D**-0.5).to(dtype)
    buf_d = (torch.randn(D * Fd + step * E, generator=gen) * Fd**-0.5).to(dtype)
    return buf_gu.as_strided((E, 2 * Fd, D), (step, D, 1)), buf_d.as_strided((E, D, Fd), (step, Fd, 1))


def routed_tokens(shape: ExpertShape, tokens: int, dtype, gen: torch.Generator):
    x = torch.randn(tokens, shape.dim, generator=gen).to(dtype)
    logits = torch.randn(tokens, shape.experts, generator=gen)
    topk_idx, topk_w = glm5.ops.moe_route(logits, None, shape.topk, routed_scaling_factor=2.5)
    return x, topk_idx, topk_w


# ---------------------------------------------------------------------------------------------
# Timing: wall time, and the process's CPU time (all threads) of the same calls
# ---------------------------------------------------------------------------------------------


def bench_round_robin(fns: dict, *, warmup: int, reps: int) -> dict[str, dict]:
    """bench_utils.bench_many's round-robin, also recording each call's process CPU time.

    On a machine shared with other jobs a call's wall time includes the time its threads wait for a
    core; FLOPs per CPU-second (time.process_time, every thread of this process) measure how well
    the work itself runs, whoever else is on the machine (time spent spinning at a barrier counts).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {k: {**bu.Timing(wall[k]).as_dict(), "cpu_median_s": statistics.median(cpu[k])} for k in fns}


def rates(flops: int, t: dict) -> dict:
    return {"gflops": flops / t["median_s"] / 1e9, "gflop_per_cpu_s": flops / t["cpu_median_s"] / 1e9, **t}


# ---------------------------------------------------------------------------------------------
# Part 1: grouped GEMM vs dense matmul
# ---------------------------------------------------------------------------------------------


def bench_gemm(args, dtype, progress) -> list[dict]:
    D, N, E = args.dim, 2 * args.ffn, args.gemm_experts
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(E, N, D, generator=gen) * D**-0.5).to(dtype)
    rows = []
    for r in args.rows_per_expert:
        M = E * r
        x = torch.randn(M, D, generator=gen).to(dtype)
        offsets = torch.arange(E + 1) * r
        dense_w = w[0]
        fns = {
            "glm5.grouped_gemm": lambda: glm5.ops.grouped_gemm(x, w, offsets),
            "dense matmul (ceiling)": lambda: torch.matmul(x, dense_w.T),
            "per-expert loop": lambda: [x[e * r : (e + 1) * r] @ w[e].T for e in range(E)],
        }
        if args.grouped_mm:
            ends = offsets[1:].to(torch.int32)
            fns["torch._grouped_mm"] = lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=ends)
        t = bench_round_robin(fns, warmup=1, reps=args.reps)
        flops = bu.matmul_flops(M, N, D)
        row = {"experts": E, "rows_per_expert": r, "M": M, "K": D, "N": N, "gflop": flops / 1e9}
        for name, tm in t.items():
            row[name] = rates(flops, tm)
        g, d = row["glm5.grouped_gemm"], row["dense matmul (ceiling)"]
        row["grouped_vs_dense"] = g["gflops"] / d["gflops"]
        row["grouped_vs_dense_cpu"] = g["gflop_per_cpu_s"] / d["gflop_per_cpu_s"]
        rows.append(row)
        progress.step(f"grouped GEMM, {r} rows/expert: {row['grouped_vs_dense']:.0%} of dense "
                      f"({row['grouped_vs_dense_cpu']:.0%} per CPU-second)")
    return rows


# ---------------------------------------------------------------------------------------------
# Part 2: the routed experts
# ---------------------------------------------------------------------------------------------


def bench_experts(args, dtype, shape: ExpertShape, tokens: int, shared: bool, backward: bool, progress) -> dict:
    gen = torch.Generator().manual_seed(1)
    w_gate_up, w_down = expert_weights(shape, dtype, shared, gen)
    x, topk_idx, topk_w = routed_tokens(shape, tokens, dtype, gen)
    load = glm5.ops.expert_load(topk_idx, shape.experts)
    dense_gu, dense_d = w_gate_up[0], w_down[0]
    rows = x.repeat_interleave(shape.topk, dim=0)  # the dense ceiling runs on N*k rows
    loop = LOOP_BWD if backward else LOOP_FWD
    methods = {"glm5.moe_experts": glm5.ops.moe_experts, loop: unbind_loop if backward else hf_loop}
    if args.grouped_mm:
        methods["torch._grouped_mm pipeline"] = grouped_mm_experts
    inputs = [x, topk_idx, topk_w, w_gate_up, w_down]
    if backward:
        diff = [x.clone().requires_grad_(True), topk_w.clone().requires_grad_(True),
                w_gate_up.clone().requires_grad_(True), w_down.clone().requires_grad_(True)]
        inputs = [diff[0], topk_idx, diff[1], diff[2], diff[3]]
        gout = torch.randn(tokens, shape.dim, generator=gen).to(dtype)
        d_gu, d_d = dense_gu.clone().requires_grad_(True), dense_d.clone().requires_grad_(True)
        rows = rows.clone().requires_grad_(True)
        g_rows = torch.randn(rows.shape, generator=gen).to(dtype)

        def run(fn):
            return lambda: torch.autograd.backward(fn(*inputs), gout)

        fns = {name: run(fn) for name, fn in methods.items()}
        fns["dense MLP (ceiling)"] = lambda: torch.autograd.backward(dense_mlp(rows, d_gu, d_d), g_rows)
    else:
        fns = {name: (lambda fn=fn: fn(*inputs)) for name, fn in methods.items()}
        fns["dense MLP (ceiling)"] = lambda: dense_mlp(rows, dense_gu, dense_d)
    if backward and args.grouped_mm:
        try:
            fns["torch._grouped_mm pipeline"]()
        except RuntimeError as e:  # no CPU backward for _grouped_mm in this torch
            print(f"  torch._grouped_mm backward unavailable: {e}", file=sys.stderr)
            del fns["torch._grouped_mm pipeline"]
    with torch.no_grad() if not backward else torch.enable_grad():
        # Warm-up: one call of each, but the loop (the slowest by far) runs on an eighth of the tokens.
        for name, fn in fns.items():
            if name != loop:
                fn()
        n = max(1, tokens // 8)
        with torch.no_grad():
            methods[loop](x[:n], topk_idx[:n], topk_w[:n], w_gate_up, w_down)
        t = bench_round_robin(fns, warmup=0, reps=args.reps)
    flops = tokens * shape.topk * shape.flops_per_slot() * (3 if backward else 1)
    row = {
        **dataclasses.asdict(shape), "tokens": tokens, "backward": backward, "shared_weights": shared,
        "rows_per_expert_mean": tokens * shape.topk / shape.experts, "rows_per_expert_max": int(load.max()),
        "empty_experts": int((load == 0).sum()), "gflop": flops / 1e9,
    }
    for name, tm in t.items():
        row[name] = rates(flops, tm)
    row["loop"] = loop
    row["speedup_vs_loop"] = row[loop]["median_s"] / row["glm5.moe_experts"]["median_s"]
    row["speedup_vs_loop_cpu"] = row[loop]["cpu_median_s"] / row["glm5.moe_experts"]["cpu_median_s"]
    progress.step(f"experts D{shape.dim} F{shape.ffn} N{tokens}{' fwd+bwd' if backward else ''}: "
                  f"{row['speedup_vs_loop']:.2f}x the loop ({row['speedup_vs_loop_cpu']:.2f}x per CPU-second)")
    return row


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def print_tables(gemm_rows, expert_rows) -> None:
    """Cells: wall-clock GFLOP/s / GFLOP per CPU-second (see bench_round_robin)."""
    if gemm_rows:
        names = [k for k in gemm_rows[0] if isinstance(gemm_rows[0][k], dict)]
        r0 = gemm_rows[0]
        print(f"\nGrouped GEMM (gate_up: {r0['experts']} experts, K={r0['K']}, N={r0['N']}): "
              "GFLOP/s wall / GFLOP per CPU-second")
        print(f"{'rows/expert':>12} " + " ".join(f"{n:>24}" for n in names) + f" {'grouped/dense':>15}")
        for r in gemm_rows:
            cells = [f"{r[n]['gflops']:.0f} / {r[n]['gflop_per_cpu_s']:.0f}" for n in names]
            ratio = f"{r['grouped_vs_dense']:.0%} / {r['grouped_vs_dense_cpu']:.0%}"
            print(f"{r['rows_per_expert']:>12} " + " ".join(f"{c:>24}" for c in cells) + f" {ratio:>15}")
    if expert_rows:
        print("\nRouted experts (top-8 of 256): median ms wall (GFLOP/s wall / GFLOP per CPU-second)")
        names = sorted({k for r in expert_rows for k in r if isinstance(r[k], dict)}, key=lambda n: ("ceiling" in n, n))
        names = [n for n in names if n not in (LOOP_FWD, LOOP_BWD)]
        names.insert(1, "loop")
        print(f"{'case':>24} {'rows/exp':>8} " + " ".join(f"{n:>28}" for n in names) + f" {'vs loop':>13}")
        for r in expert_rows:
            case = f"D{r['dim']} F{r['ffn']} N{r['tokens']}" + (" fwd+bwd" if r["backward"] else " fwd")
            cells = [r[r[n]] if n == "loop" else r.get(n) for n in names]
            cells = [f"{c['median_s'] * 1e3:.0f} ({c['gflops']:.0f} / {c['gflop_per_cpu_s']:.0f})" if c else "n/a" for c in cells]
            ratio = f"{r['speedup_vs_loop']:.1f}x / {r['speedup_vs_loop_cpu']:.1f}x"
            print(f"{case:>24} {r['rows_per_expert_mean']:>8.0f} " + " ".join(f"{c:>28}" for c in cells) + f" {ratio:>13}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=list(bu.DTYPES), default="bf16")
    p.add_argument("--dim", type=int, default=6144, help="model width D (GLM-5: 6144)")
    p.add_argument("--ffn", type=int, default=2048, help="expert width F (GLM-5: 2048)")
    p.add_argument("--small-dim", type=int, default=1536, help="D of the smaller-width variant")
    p.add_argument("--small-ffn", type=int, default=512, help="F of the smaller-width variant")
    p.add_argument("--tokens", default="512", help="token counts at GLM-5's width (forward), comma-separated")
    p.add_argument("--small-tokens", default="2048", help="token counts at the smaller width (fwd and fwd+bwd)")
    p.add_argument("--gemm-experts", type=int, default=8, help="experts in the grouped-GEMM part")
    p.add_argument("--rows-per-expert", default="16,32,64,128,256", help="rows per expert in the grouped-GEMM part")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of every function (after one warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--backward-tokens", default="2048", help="token counts of the fwd+bwd rows (smaller width)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run (~30 s)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/bench_moe_cpu_<dtype>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.tokens, args.small_tokens, args.backward_tokens = "256", "1024", "1024"
        args.rows_per_expert, args.reps = "16,64", 2
        args.gemm_experts = 8
    args.rows_per_expert = [int(v) for v in args.rows_per_expert.split(",") if v]
    tokens = [int(v) for v in args.tokens.split(",") if v]
    small_tokens = [int(v) for v in args.small_tokens.split(",") if v]
    backward_tokens = [int(v) for v in args.backward_tokens.split(",") if v]
    dtype = bu.DTYPES[args.dtype]
    args.grouped_mm = grouped_mm_works(dtype)

    full = ExpertShape(dim=args.dim, ffn=args.ffn)
    small = ExpertShape(dim=args.small_dim, ffn=args.small_ffn)
    plan = len(args.rows_per_expert) + len(tokens) + len(small_tokens) + len(backward_tokens)
    progress = bu.Progress(plan)
    print(f"bench_moe: {args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"torch._grouped_mm on CPU: {'yes' if args.grouped_mm else 'no'}", file=sys.stderr)
    load_start = bu.machine_info()["load_avg_1m"]
    gemm_rows = bench_gemm(args, dtype, progress)
    expert_rows = [bench_experts(args, dtype, full, n, shared=True, backward=False, progress=progress) for n in tokens]
    for n in small_tokens:
        expert_rows.append(bench_experts(args, dtype, small, n, shared=False, backward=False, progress=progress))
    for n in backward_tokens:
        expert_rows.append(bench_experts(args, dtype, small, n, shared=False, backward=True, progress=progress))
    print_tables(gemm_rows, expert_rows)
    threads = torch.get_num_threads()
    out = args.out or bu.RESULTS_DIR / f"bench_moe_cpu_{args.dtype}_{threads}t.json"
    cmd = "python benchmarks/bench_moe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {
        "command": cmd.strip(), "args": {k: v for k, v in vars(args).items() if k != "out"}, "dtype": args.dtype,
        "threads": threads, "load_avg_1m_at_start": load_start, "grouped_gemm": gemm_rows, "experts": expert_rows,
    }
    bu.write_json(out, payload)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
