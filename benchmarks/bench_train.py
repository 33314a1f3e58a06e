"""Training throughput of the pretraining loop: tokens/s per stage, glm5 kernels vs reference ops, in one run.

For each preset (default: debug and mid) and each stage kind (dense pretraining, DSA dense warm-up,
DSA sparse adaptation) this builds the real trainer (glm5.train.pretrain.Pretrainer: the stdlib corpus,
the preset's tokenizer, model, optimizer and batch geometry) and times whole optimizer steps
(forward, backward, clipping, Muon/AdamW, LR schedule, router-bias update), alternating the
implementations step by step (glm5.ops.use_impl("kernel") / ("reference"), and optionally fp32 vs bf16
autocast), so load drift on a shared machine hits all alike. It reports the median step time,
training tokens/s, and the optimizer's share of the step (Muon's Newton-Schulz on every matrix).

    python benchmarks/bench_train.py                               # debug + mid, kernels vs reference
    python benchmarks/bench_train.py --presets debug --precisions fp32 bf16
    python benchmarks/bench_train.py --presets debug --stages pretrain --profile   # torch.profiler table

Results: benchmarks/results/bench_train_cpu.json (with the machine and its load average).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import RESULTS_DIR, machine_info, write_json  # noqa: E402

import glm5.ops  # noqa: E402
from glm5.train.pretrain import Pretrainer, StepStats  # noqa: E402
from glm5.train.stages import pretrain_preset  # noqa: E402

STAGES = ("pretrain", "dsa_warmup", "dsa_sparse")
PRECISION = {"fp32": None, "bf16": torch.bfloat16}


class _Timed:
    """Wraps optimizer.step to accumulate its wall time."""

    def __init__(self, opt):
        self.opt, self.inner, self.seconds = opt, opt.step, 0.0
        opt.step = self
        warnings.filterwarnings("ignore", message=".*optimizer.step\\(\\)` has been overridden")

    def __call__(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self.inner(*a, **kw)
        finally:
            self.seconds += time.perf_counter() - t


def make_trainer(preset: str, stage: str, out: Path) -> Pretrainer:
    cfg = pretrain_preset(preset)
    cfg = cfg.replace(export_hf=False)
    tr = Pretrainer(cfg, out, progress=False, quiet=True)
    tr._build_data()
    tr.model = tr._build_model()
    tr._enter_stage([s.name for s in cfg.stages].index(stage))
    tr.stats = StepStats(tr.model)
    tr.tokens = 0
    return tr


def step_tokens(tr: Pretrainer) -> int:
    return tr.train_loader.batch_size * tr.train_loader.seq_len * tr.stage.grad_accum * tr.dist.world_size


def bench_stage(preset: str, stage: str, impls: list[str], precisions: list[str], steps: int, warmup: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        tr = make_trainer(preset, stage, Path(d))
        timer = _Timed(tr.opt)
        variants = [(i, p) for i in impls for p in precisions]
        times: dict[tuple, list[tuple[float, float]]] = {v: [] for v in variants}
        for rep in range(warmup + steps):
            for impl, prec in variants:
                tr.amp_dtype = PRECISION[prec]
                timer.seconds = 0.0
                with glm5.ops.use_impl(impl):
                    t = time.perf_counter()
                    rec = tr.train_step()
                    dt = time.perf_counter() - t
                if rep >= warmup:
                    times[(impl, prec)].append((dt, timer.seconds))
                print(f"  {preset:6s} {stage:10s} {impl:9s} {prec}: step {dt:6.2f} s (optimizer {timer.seconds:5.2f} s) "
                      f"loss {rec['loss']:.3f}", flush=True)
        n_tok = step_tokens(tr)
        n_params = sum(p.numel() for p in tr.model.parameters())
        n_train = sum(p.numel() for p in tr.model.parameters() if p.requires_grad)
        rows = []
        for (impl, prec), ts in times.items():
            med = statistics.median(t for t, _ in ts)
            opt = statistics.median(o for _, o in ts)
            rows.append({"preset": preset, "stage": stage, "impl": impl, "precision": prec, "tokens_per_step": n_tok,
                         "seq_len": tr.train_loader.seq_len, "batch": tr.train_loader.batch_size,
                         "attn_mode": tr.stage.attn_mode, "indexer_loss": tr.stage.indexer_loss,
                         "params": n_params, "trainable": n_train, "step_s_median": med,
                         "step_s_all": [t for t, _ in ts], "optimizer_s_median": opt, "tokens_per_s": n_tok / med})
        return rows


def profile_step(preset: str, stage: str, impl: str, precision: str, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as d:
        tr = make_trainer(preset, stage, Path(d))
        tr.amp_dtype = PRECISION[precision]
        with glm5.ops.use_impl(impl):
            tr.train_step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                tr.train_step()
        print(f"\n{preset} {stage} {impl} {precision}: one optimizer step, {step_tokens(tr)} tokens")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["debug", "mid"])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--impls", nargs="+", default=["kernel", "reference"], choices=["kernel", "reference"])
    ap.add_argument("--precisions", nargs="+", default=["fp32"], choices=sorted(PRECISION))
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step instead")
    ap.add_argument("--rows", type=int, default=25, help="profiler table rows")
    ap.add_argument("--out", default=str(RESULTS_DIR / "bench_train_cpu.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        for preset in args.presets:
            for stage in args.stages:
                profile_step(preset, stage, args.impls[0], args.precisions[0], args.rows)
        return 0
    machine = machine_info()
    rows = []
    for preset in args.presets:
        for stage in args.stages:
            rows += bench_stage(preset, stage, args.impls, args.precisions, args.steps, args.warmup)
    print(f"\n{'preset':6s} {'stage':10s} {'attention':9s} {'tokens':>6s} {'impl':9s} {'prec':4s} {'step s':>7s} "
          f"{'optim s':>7s} {'tokens/s':>9s} {'vs ref':>6s}")
    for r in rows:
        ref = next((x for x in rows if x["preset"] == r["preset"] and x["stage"] == r["stage"]
                    and x["precision"] == r["precision"] and x["impl"] == "reference"), None)
        speedup = f"{ref['step_s_median'] / r['step_s_median']:.2f}x" if ref else "-"
        print(f"{r['preset']:6s} {r['stage']:10s} {r['attn_mode']:9s} {r['tokens_per_step']:6d} {r['impl']:9s} "
              f"{r['precision']:4s} {r['step_s_median']:7.2f} {r['optimizer_s_median']:7.2f} {r['tokens_per_s']:9.0f} {speedup:>6s}")
    machine["load_avg_1m_end"] = machine_info()["load_avg_1m"]
    path = write_json(args.out, {"command": " ".join(["python", "benchmarks/bench_train.py", *(argv or sys.argv[1:])]),
                                 "rows": rows}, machine=machine)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
