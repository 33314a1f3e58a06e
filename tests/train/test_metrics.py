"""metrics.jsonl (flushed lines, resume truncation, torn lines), TensorBoard, progress bar, PNG, unigram entropy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from glm5.train.metrics import MetricsLogger, ProgressBar, plot_loss_curve, read_metrics, unigram_entropy


def test_one_flushed_json_line_per_step(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for s in range(1, 4):
        log.log(s, loss=torch.tensor(2.5 - s * 0.1), lr=1e-3, tokens=100 * s)
        # readable before close: each line is flushed
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == s and json.loads(lines[-1])["step"] == s
    log.log(4, loss=float("nan"))
    log.close()
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert recs[0] == {"step": 1, "loss": pytest.approx(2.4), "lr": 1e-3, "tokens": 100}
    assert recs[-1]["loss"] == "nan"


def test_resume_drops_steps_after_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for s in range(1, 8):
            log.log(s, loss=1.0 / s)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 8, "lo')  # torn by a kill -9
    with MetricsLogger(tmp_path, resume_step=5, tensorboard=False) as log:
        log.log(6, loss=0.5)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    MetricsLogger(tmp_path, tensorboard=False).close()  # a fresh run starts a fresh file
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path) as log:
        log.log(1, loss=3.0, note="text is not a scalar")
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_loss_curve_png(tmp_path):
    pytest.importorskip("matplotlib")
    recs = [{"step": s, "loss": 5.0 / s, **({"val_loss": 5.5 / s} if s % 5 == 0 else {})} for s in range(1, 41)]
    out = plot_loss_curve(recs, tmp_path / "loss.png", hline=4.0)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_bar_plain(capsys):
    bar = ProgressBar(total_steps=20, disable=True, every=10)
    for s in range(1, 21):
        tps = bar.update(s, tokens=1000, loss=1.0)
    bar.close()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[-1].startswith("step 20/20") and "tok/s" in out[-1] and tps > 0


def test_unigram_entropy():
    assert unigram_entropy(np.arange(8).repeat(3)) == pytest.approx(math.log(8))
    assert unigram_entropy(np.arange(8).repeat(3), unit="bits") == pytest.approx(3.0)
    assert unigram_entropy(np.zeros(10, np.uint16)) == 0.0
    assert unigram_entropy(np.array([0, 0, 0, 1])) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    with pytest.raises(ValueError, match="unit"):
        unigram_entropy(np.zeros(3, np.int64), unit="dits")
