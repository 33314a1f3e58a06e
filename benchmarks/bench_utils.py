"""Shared helpers for the glm5 benchmarks: timing, FLOP formulas, the matmul ceiling, result files.

Every benchmark script here measures a kernel and its baseline side by side in one run and reports
time and GFLOP/s from the explicit formulas below, against torch.matmul's rate measured in the same
run (`matmul_ceiling`). Results go to `benchmarks/results/` with the machine they were measured on
(`machine_info`: CPU model, threads, torch version, git commit, timestamp, load average).

    from bench_utils import bench, matmul_ceiling, write_json
    t = bench(lambda: torch.mm(a, b), device=a.device)   # Timing: median / p20 / p80 in seconds
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# ---------------------------------------------------------------------------------------------
# FLOP formulas (a multiply-add counts 2). `pairs` = number of (query, key) pairs actually computed.
# ---------------------------------------------------------------------------------------------


def matmul_flops(m: int, n: int, k: int) -> int:
    """[m,k] @ [k,n]."""
    return 2 * m * n * k


def attention_flops(heads: int, d_qk: int, d_v: int, pairs: int) -> int:
    """Softmax attention: per head and (query, key) pair, a d_qk dot product and a d_v update."""
    return 2 * heads * (d_qk + d_v) * pairs


def indexer_flops(heads: int, dim: int, pairs: int) -> int:
    """Lightning indexer scores: per (query, key) pair, one dim-long dot product per indexer head."""
    return 2 * heads * dim * pairs


def causal_pairs(queries: int, context: int) -> int:
    """(query, key) pairs visible to the last `queries` positions of a causal `context`-token sequence."""
    first = context - queries  # the first query sees keys 0..first
    return queries * first + queries * (queries + 1) // 2


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    """Wall times (seconds) of the timed repetitions, warm-up excluded."""

    times_s: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times_s)

    def quantile(self, q: float) -> float:
        xs = sorted(self.times_s)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    def as_dict(self) -> dict:
        return {"median_s": self.median, "p20_s": self.quantile(0.2), "p80_s": self.quantile(0.8), "reps": len(self.times_s)}


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


_L2_FLUSH: dict = {}


def flush_l2(device: torch.device | str) -> None:
    """Evict the GPU L2 (zero a 256 MiB buffer); nothing on CPU, where the operands dwarf the caches."""
    device = torch.device(device)
    if device.type == "cuda":
        buf = _L2_FLUSH.setdefault(device, torch.empty(256 << 20, dtype=torch.uint8, device=device))
        buf.zero_()


def bench(fn: Callable[[], object], *, device: torch.device | str = "cpu", **kw) -> Timing:
    """Time one function; see bench_many for the keyword arguments."""
    return bench_many({"fn": fn}, device=device, **kw)["fn"]


def bench_many(
    fns: dict[str, Callable[[], object]],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    min_reps: int = 3,
    max_reps: int = 50,
    budget_s: float = 2.0,
) -> dict[str, Timing]:
    """Time several functions round-robin, one call of each per round, so that a drift in the machine's
    load (shared machines) hits all of them alike and their ratios stay meaningful.

    `warmup` untimed rounds, then at least min_reps and at most max_reps timed rounds, stopping after
    min_reps once budget_s seconds of timed calls are spent. CPU: time.perf_counter around each call;
    CUDA: CUDA events around each call, with the L2 flushed before it."""
    device = torch.device(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    spent, rounds = 0.0, 0
    while rounds < max_reps and (rounds < min_reps or spent < budget_s):
        for name, fn in fns.items():
            if device.type == "cuda":
                flush_l2(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
            spent += times[name][-1]
        rounds += 1
    return {name: Timing(ts) for name, ts in times.items()}


def matmul_fn(dtype: torch.dtype, device: torch.device | str = "cpu", n: int = 4096) -> Callable[[], torch.Tensor]:
    """A closure computing [n,n] @ [n,n] in `dtype` (output in `dtype`), for bench_many next to a kernel."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return lambda: torch.matmul(a, b)


def matmul_ceiling(dtype: torch.dtype, device: torch.device | str = "cpu", n: int = 4096, **bench_kw) -> dict:
    """torch.matmul's rate on [n,n] @ [n,n] in `dtype` (output in `dtype`): the ceiling kernels are held to."""
    t = bench(matmul_fn(dtype, device, n), device=device, **bench_kw)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "gflops": matmul_flops(n, n, n) / t.median / 1e9, **t.as_dict()}


# ---------------------------------------------------------------------------------------------
# Memory: the process RSS high-water mark (sees every allocation, torch's or a kernel's own)
# ---------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    """Current resident set size."""
    kib = _status_kib("VmRSS")
    return (kib or 0) * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size since the process began or since reset_peak_rss()."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


# ---------------------------------------------------------------------------------------------
# Progress, machine info and result files
# ---------------------------------------------------------------------------------------------


class Progress:
    """One line per step on stderr: '[ 3/20  0:41] label'."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream, self.t0 = total, 0, stream, time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        el = int(time.perf_counter() - self.t0)
        print(f"[{self.done:>2}/{self.total} {el // 60:>2}:{el % 60:02d}] {label}", file=self.stream, flush=True)


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str = "cpu") -> dict:
    """What the figures were measured on and with."""
    info = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def write_json(path: Path | str, payload: dict, device: torch.device | str = "cpu", machine: dict | None = None) -> Path:
    """Write payload plus {"machine": machine} as indented JSON; returns the path. Pass the
    machine_info() taken when the run started (the commit may move during a long run); default: now."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine or machine_info(device), **payload}, indent=1, default=str) + "\n")
    return path


def append_csv(path: Path | str, rows: list[dict], device: torch.device | str = "cpu") -> Path:
    """Append rows (flat dicts, one header) with the commit and timestamp on each; header if new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = machine_info(device)
    rows = [{"timestamp": m["timestamp"], "git_commit": m["git_commit"], "cpu": m.get("gpu", m["cpu"]), **r} for r in rows]
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    return path
