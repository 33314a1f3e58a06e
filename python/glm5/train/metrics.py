"""What a training run shows and records: metrics.jsonl, TensorBoard, a progress bar, a loss-curve PNG.

    log = MetricsLogger(run_dir, resume_step=start_step)    # drops lines past start_step from a killed run
    bar = ProgressBar(total_steps=N, initial_step=start_step)
    ... log.log(step, loss=..., lr=..., tokens=...) ; bar.update(step, tokens=n_tok, loss=loss)
    bar.close(); log.close(); plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
    H = unigram_entropy(corpus.tokens)   # nats/token; the validation loss must fall well below it
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a kill mid-write) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _clean(v):
    """JSON-able scalar: tensors/numpy -> Python numbers; NaN/inf -> strings JSON readers accept."""
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLogger:
    """Appends one JSON object per call to run_dir/metrics.jsonl (flushed each line) and mirrors the
    numeric values to TensorBoard (run_dir/tb) when the `tensorboard` package is installed.

    resume_step: on a resumed run, records with step > resume_step (written after the checkpoint the
    run resumes from) are removed first, so every step appears once. None starts a fresh file.
    """

    def __init__(self, run_dir: str | os.PathLike, *, resume_step: int | None = None, tensorboard: bool = True,
                 filename: str = "metrics.jsonl"):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / filename
        keep = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= resume_step] if resume_step is not None else []
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, self.path)
        self._fh = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
            except ImportError:
                print("glm5: tensorboard is not installed; skipping TensorBoard events (pip install tensorboard)",
                      file=sys.stderr)

    def log(self, step: int, **metrics) -> dict:
        """Write {"step": step, **metrics} (values: numbers, 0-d tensors, strings) and return it."""
        rec = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, int(step))
        return rec

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ProgressBar:
    """A tqdm bar over optimizer steps showing loss, tokens/s and the ETA (tqdm's own), or a plain
    line every `every` steps when tqdm is missing or disable=True leaves stdout to logs."""

    def __init__(self, total_steps: int, *, initial_step: int = 0, desc: str = "train", disable: bool = False,
                 every: int = 10):
        self.total, self.step, self.start, self.every = total_steps, initial_step, initial_step, every
        self._t0, self._tok0, self._tokens = time.perf_counter(), 0, 0
        self._bar = None
        if not disable:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, step: int, *, tokens: int = 0, loss: float | None = None, **extra) -> float:
        """Advance to `step` (the number of steps done) having processed `tokens` more; returns tokens/s."""
        self._tokens += tokens
        dt = max(time.perf_counter() - self._t0, 1e-9)
        tps = self._tokens / dt
        post = {"loss": f"{loss:.4f}" if loss is not None else "-", "tok/s": f"{tps:,.0f}"}
        post.update({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in extra.items()})
        if self._bar is not None:
            self._bar.update(step - self.step)
            self._bar.set_postfix(post, refresh=False)
        elif step % self.every == 0 or step == self.total:
            eta = (self.total - step) * dt / max(step - self.start, 1)
            print(f"step {step}/{self.total} " + " ".join(f"{k}={v}" for k, v in post.items()) + f" eta={eta:.0f}s", flush=True)
        self.step = step
        return tps

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def plot_loss_curve(metrics: str | os.PathLike | Iterable[dict], out_png: str | os.PathLike, *,
                    keys: tuple[str, ...] = ("loss", "val_loss"), hline: float | None = None, title: str = "") -> Path | None:
    """Write a PNG of `keys` against "step" (matplotlib Agg). hline: e.g. the unigram entropy.
    Returns the path, or None (with a one-line notice) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("glm5: matplotlib is not installed; skipping the loss-curve PNG", file=sys.stderr)
        return None
    recs = read_metrics(metrics) if isinstance(metrics, (str, os.PathLike)) else list(metrics)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for k in keys:
        pts = [(r["step"], r[k]) for r in recs if isinstance(r.get(k), (int, float))]
        if pts:
            ax.plot(*zip(*pts), label=k, marker="o" if len(pts) < 30 else None, markersize=3)
    if hline is not None:
        ax.axhline(hline, color="gray", linestyle="--", label=f"unigram entropy {hline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


def unigram_entropy(tokens: np.ndarray, vocab_size: int | None = None, *, unit: str = "nats") -> float:
    """Entropy of the token frequency distribution of `tokens` [N] int, in nats (or bits) per token:
    the loss of the best model that ignores context."""
    if unit not in ("nats", "bits"):
        raise ValueError(f"unit={unit!r} must be 'nats' or 'bits'")
    counts = np.bincount(np.asarray(tokens).reshape(-1).astype(np.int64), minlength=vocab_size or 0)
    p = counts[counts > 0] / counts.sum()
    h = float(-(p * np.log(p)).sum())
    return h / math.log(2) if unit == "bits" else h
