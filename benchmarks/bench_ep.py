"""Expert-parallel exchange overhead: ExpertParallel dispatch + combine vs bare all_to_all_single.

For each world size (Gloo processes on this machine, started with torch.multiprocessing.spawn) and
each shape, every rank routes its tokens to top-k of E experts (uniformly at random, distinct
experts per token) and the benchmark times these variants, interleaved rep by rep:

- ep:         ExpertParallel.dispatch + combine with no expert GEMMs (the dispatched rows go
              straight back): moe_permute, the counts exchange, the uneven token all-to-all, the
              regroup by local expert, the inverse regroup, the reverse all-to-all and the
              weighted moe_unpermute;
- fresh:      ep with ExchangeBuffers disabled (every buffer newly allocated);
- bare:       two dist.all_to_all_single calls moving the same rows with the same splits (there
              and back) between preallocated buffers: what the exchange itself costs;
- +alloc:     bare with each output allocated per call, as a plain call would;
- counts:     the counts exchange alone (a [W, E/W] int64 all-to-all and the host copy of the splits);
- gather:     one row gather of the N*k dispatched rows into a fresh buffer: the unit of layout work.

A rep's wall time is its slowest rank's; the table gives medians, ep / bare (target <= 1.2) and
ep / +alloc. Because the machine is shared, it also gives the ratio of the CPU time all ranks spent
(user + system, all threads: copies, socket I/O, layout work), which other load disturbs less, and
"excess" = (ep - bare) / gather in CPU time: the layout work in units of one row-gather pass. The
forward has four passes that bare does not (moe_permute, regroup, inverse regroup, moe_unpermute),
so an excess near 4 means the layout costs what this design must and little more.
With --backward, ep and the bare variants also run the backward (ep: autograd through both
exchanges; bare: two more all-to-alls).

    python benchmarks/bench_ep.py                    # 2 and 4 ranks; GLM-5 width, narrow, small
    python benchmarks/bench_ep.py --worlds 2 --shapes glm5 --reps 20
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import DTYPES, RESULTS_DIR, write_json  # noqa: E402

import glm5  # noqa: E402
from glm5.distributed import ExchangeBuffers, ExpertParallel  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    tokens: int  # per rank
    dim: int
    experts: int = 256  # GLM-5: 256 routed experts, top-8
    topk: int = 8


# GLM-5's hidden width with the token count scaled to these machines, a narrower variant with more
# tokens, and a small latency-bound one where fixed costs (the counts exchange) weigh most.
SHAPES = {
    "glm5": Shape("glm5", tokens=256, dim=6144),
    "narrow": Shape("narrow", tokens=1024, dim=1024),
    "small": Shape("small", tokens=64, dim=1024),
}


def _quantile(t: torch.Tensor, q: float) -> float:
    xs = sorted(t.tolist())
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads, user + system) of fn()."""
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def worker(rank: int, world: int, store: str, shapes: list[Shape], args: argparse.Namespace, out_path: str) -> None:
    torch.set_num_threads(1)  # the ranks share this machine's cores
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    dtype = DTYPES[args.dtype]
    rows = []
    for shape in shapes:
        g = torch.Generator().manual_seed(1000 + rank)
        N, D, E, k = shape.tokens, shape.dim, shape.experts, shape.topk
        x = torch.randn(N, D, generator=g).to(dtype)
        topk_idx = torch.rand(N, E, generator=g).argsort(dim=1)[:, :k].int()
        topk_w = torch.rand(N, k, generator=g)
        # The expert weights are never touched here: keep them on the meta device.
        ep = ExpertParallel(E, D, 2048, device="meta", dtype=dtype, buffers=ExchangeBuffers())
        ep_fresh = ExpertParallel(E, D, 2048, device="meta", dtype=dtype, buffers=ExchangeBuffers(enabled=False))

        # The bare exchange: same rows, same splits, preallocated buffers.
        with torch.no_grad():
            _, _, handle = ep.dispatch(x, topk_idx)
        send = torch.randn(N * k, D, generator=g).to(dtype)
        recv = send.new_empty(sum(handle.recv_splits), D)
        back = torch.empty_like(send)
        send_counts = torch.randint(0, N, (world, E // world), generator=g)
        recv_counts = torch.empty_like(send_counts)

        def bare():
            dist.all_to_all_single(recv, send, handle.recv_splits, handle.send_splits)
            dist.all_to_all_single(back, recv, handle.send_splits, handle.recv_splits)
            if args.backward:
                dist.all_to_all_single(recv, back, handle.recv_splits, handle.send_splits)
                dist.all_to_all_single(back, recv, handle.send_splits, handle.recv_splits)

        def bare_alloc():  # the same, each output freshly allocated as a plain call would
            r = send.new_empty(recv.shape)
            dist.all_to_all_single(r, send, handle.recv_splits, handle.send_splits)
            b = torch.empty_like(send)
            dist.all_to_all_single(b, r, handle.send_splits, handle.recv_splits)
            if args.backward:
                r = send.new_empty(recv.shape)
                dist.all_to_all_single(r, b, handle.recv_splits, handle.send_splits)
                dist.all_to_all_single(torch.empty_like(send), r, handle.send_splits, handle.recv_splits)

        def ep_step(ep=ep):
            if args.backward:
                xg, wg = x.detach().requires_grad_(), topk_w.detach().requires_grad_()
                x_local, _, h = ep.dispatch(xg, topk_idx)
                ep.combine(x_local, h, wg).sum().backward()
            else:
                with torch.no_grad():
                    x_local, _, h = ep.dispatch(x, topk_idx)
                    ep.combine(x_local, h, topk_w)

        def ep_fresh_step():
            ep_step(ep_fresh)

        perm = torch.randperm(N * k, generator=g)

        def gather():  # one layout pass: a row gather into a fresh buffer, as the regroup does
            send.index_select(0, perm)

        def counts():
            dist.all_to_all_single(recv_counts, send_counts)
            torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()

        variants = {
            "ep": ep_step, "ep_fresh": ep_fresh_step, "bare": bare, "bare_alloc": bare_alloc,
            "counts": counts, "gather": gather,
        }
        for _ in range(args.warmup):
            for fn in variants.values():
                fn()
        times = torch.zeros(len(variants), args.reps, dtype=torch.float64)
        cpu = torch.zeros_like(times)
        for r in range(args.reps):  # interleaved, so that load drift hits all variants alike
            for v, fn in enumerate(variants.values()):
                times[v, r], cpu[v, r] = _timed(fn)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)  # a rep lasts as long as its slowest rank
        dist.all_reduce(cpu, op=dist.ReduceOp.SUM)  # the work all ranks did, waiting aside
        cpu_med = {name: statistics.median(cpu[v].tolist()) for v, name in enumerate(variants)}

        elt = torch.finfo(dtype).bits // 8
        med = {name: statistics.median(times[v].tolist()) for v, name in enumerate(variants)}
        recv_rows = torch.tensor([sum(handle.recv_splits)])
        dist.all_reduce(recv_rows, op=dist.ReduceOp.MAX)
        rows.append({
            "world": world, "shape": shape.name, "tokens_per_rank": N, "dim": D, "experts": E, "topk": k,
            "dtype": args.dtype, "backward": args.backward, "reps": args.reps,
            "mb_sent_per_rank": N * k * D * elt / 2**20, "max_rows_received": int(recv_rows),
            **{f"{name}_ms": 1e3 * t for name, t in med.items()},
            **{f"{name}_p20_ms": 1e3 * _quantile(times[v], 0.2) for v, name in enumerate(variants)},
            **{f"{name}_p80_ms": 1e3 * _quantile(times[v], 0.8) for v, name in enumerate(variants)},
            **{f"{name}_cpu_ms": 1e3 * t for name, t in cpu_med.items()},
            "ep_over_bare": med["ep"] / med["bare"],
            "ep_over_bare_cpu": cpu_med["ep"] / cpu_med["bare"],
            "ep_over_bare_alloc": med["ep"] / med["bare_alloc"],
            "excess_in_gathers": (cpu_med["ep"] - cpu_med["bare"]) / cpu_med["gather"],
            "bare_gb_s_per_rank": (4 if args.backward else 2) * N * k * D * elt / med["bare"] / 1e9,
        })
    dist.destroy_process_group()
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))


# (title, row key, width, format) of the printed table; the JSON has every field.
COLUMNS = [
    ("W", "world", 2, ""),
    ("shape", "shape", 7, ""),
    ("N/rank", "tokens_per_rank", 6, ""),
    ("D", "dim", 5, ""),
    ("MB/rank", "mb_sent_per_rank", 7, ".1f"),
    ("bare ms", "bare_ms", 8, ".2f"),
    ("+alloc", "bare_alloc_ms", 8, ".2f"),
    ("ep ms", "ep_ms", 8, ".2f"),
    ("fresh", "ep_fresh_ms", 8, ".2f"),
    ("ep/bare", "ep_over_bare", 7, ".2f"),
    ("ep/+alloc", "ep_over_bare_alloc", 9, ".2f"),
    ("cpu ratio", "ep_over_bare_cpu", 9, ".2f"),
    ("counts", "counts_ms", 6, ".2f"),
    ("gather", "gather_ms", 6, ".2f"),
    ("excess", "excess_in_gathers", 6, ".1f"),
    ("GB/s", "bare_gb_s_per_rank", 5, ".2f"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="numbers of Gloo processes")
    p.add_argument("--shapes", nargs="+", default=["glm5", "narrow", "small"], choices=sorted(SHAPES))
    p.add_argument("--tokens", type=int, help="override the tokens per rank of every shape")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--reps", type=int, default=7, help="timed reps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_ep.json")
    args = p.parse_args()

    shapes = [SHAPES[s] for s in args.shapes]
    if args.tokens is not None:
        shapes = [dataclasses.replace(s, tokens=args.tokens) for s in shapes]
    print(f"glm5 {glm5.__version__}, ops impl: {glm5.ops.get_impl()}, torch {torch.__version__}", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            t0 = time.perf_counter()
            part = f"{tmp}/w{world}.json"
            mp.spawn(worker, args=(world, f"{tmp}/store{world}", shapes, args, part), nprocs=world, join=True)
            rows += json.loads(Path(part).read_text())
            print(f"world {world}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    print(" ".join(f"{title:>{width}}" for title, _, width, _ in COLUMNS))
    for r in rows:
        print(" ".join(f"{r[key]:>{width}{fmt}}" for _, key, width, fmt in COLUMNS))
    payload = {"benchmark": "bench_ep", "command": " ".join(sys.argv), "args": vars(args) | {"out": str(args.out)}}
    path = write_json(args.out, payload | {"rows": rows})
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
