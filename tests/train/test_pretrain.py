"""The pretraining loop (glm5.train.pretrain) and its stages (glm5.train.stages), at the "tiny" preset.

- each stage's trainable/frozen sets, and which losses give which parameters a gradient;
- the LR schedule of every stage, read back from a run's metrics.jsonl;
- the CLI smoke run: metrics.jsonl, TensorBoard events, checkpoints, loss PNG, HF export that loads back;
- exact resume: a run killed by SIGKILL after a checkpoint and resumed logs the same per-step losses
  as an uninterrupted one (subprocesses); a run stopped at a stage boundary and continued, too;
- data parallel: 2 Gloo ranks (torchrun) with 2 rows each match one process with 4 rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from glm5.model import GLM5ForCausalLM
from glm5.train.metrics import read_metrics
from glm5.train.pretrain import RunError, pretrain, set_trainable, trainable_names
from glm5.train.schedule import WarmupDecay
from glm5.train.stages import PretrainConfig, StageConfig, pretrain_preset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory):
    """A private GLM5_CACHE_DIR (token cache + tokenizers) shared by this file's runs and subprocesses."""
    d = tmp_path_factory.mktemp("glm5cache")
    old = os.environ.get("GLM5_CACHE_DIR")
    os.environ["GLM5_CACHE_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("GLM5_CACHE_DIR", None)
    else:
        os.environ["GLM5_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_run(cache_env, tmp_path_factory):
    """The CLI on the tiny preset, every stage (10 steps): the run folder."""
    from glm5.cli import main

    out = tmp_path_factory.mktemp("tiny_run")
    assert main(["pretrain", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 0
    return out


def _tiny_model(stage_idx: int = 0) -> tuple[GLM5ForCausalLM, StageConfig]:
    cfg = pretrain_preset("tiny")
    return GLM5ForCausalLM(cfg.model), cfg.stages[stage_idx]


# --------------------------------------------------------------------------------------------------
# Stages: trainable sets and losses


def test_presets_chain_the_four_stages():
    for name in ("debug", "tiny", "mid"):
        cfg = pretrain_preset(name)
        assert [s.name for s in cfg.stages] == ["pretrain", "ctx_ext", "dsa_warmup", "dsa_sparse"]
        pre, ext, warm, sparse = cfg.stages
        assert pre.attn_mode == ext.attn_mode == warm.attn_mode == "dense" and sparse.attn_mode == "sparse"
        assert (pre.indexer_loss, ext.indexer_loss, warm.indexer_loss, sparse.indexer_loss) == (None, None, "dense", "sparse")
        assert (warm.trainable, sparse.trainable) == ("indexer", "all")
        assert ext.rope_theta > cfg.model.rope_theta and cfg.stage_seq_len(1) > cfg.stage_seq_len(0)
        assert sparse.schedule == "constant" and pre.schedule == "cosine" and pre.warmup_steps > 0
    assert pretrain_preset("debug").with_stages(["dsa_sparse"]).total_steps == pretrain_preset("debug").stages[3].steps


@pytest.mark.parametrize("bad, match", [
    (dict(steps=0), "steps"),
    (dict(indexer_loss="dense", attn_mode="sparse"), "indexer_loss"),
    (dict(trainable="indexer"), "trainable"),
    (dict(schedule="wsd"), "schedule"),
    (dict(attn_mode="flash"), "attn_mode"),
], ids=str)
def test_bad_stage_config_names_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        StageConfig(**{"name": "s", "steps": 3, **bad})


def test_unknown_preset_and_stage():
    with pytest.raises(ValueError, match="unknown pretrain preset"):
        pretrain_preset("huge")
    with pytest.raises(ValueError, match="unknown stage"):
        pretrain_preset("tiny").with_stages(["pretrain", "sft"])


@pytest.mark.parametrize("stage_idx", [0, 2, 3], ids=["pretrain", "dsa_warmup", "dsa_sparse"])
def test_stage_trainable_set_gets_gradients_and_nothing_else(stage_idx):
    """After one step's backward, exactly the stage's trainable parameters hold a (finite, nonzero) gradient."""
    model, st = _tiny_model(stage_idx)
    names = set(set_trainable(model, st))
    is_idx = {n: ".indexer." in n for n, _ in model.named_parameters()}
    if st.trainable == "indexer":
        assert names == {n for n, i in is_idx.items() if i} and any(n.startswith("mtp.") for n in names)
    elif st.trainable == "no_indexer":
        assert names == {n for n, i in is_idx.items() if not i}
    else:
        assert names == set(is_idx)
    x = torch.randint(0, model.config.vocab_size, (2, 24))
    out = model(x, labels=x, attn_mode=st.attn_mode, indexer_loss=st.indexer_loss, mtp_loss_weight=st.mtp_loss_weight)
    assert (out.indexer_loss is not None) == (st.indexer_loss is not None)
    assert out.mtp_loss is not None
    # the LM loss reaches no indexer; in the warm-up (all but the indexers frozen) it reaches nothing
    assert out.lm_loss.requires_grad == (st.trainable != "indexer")
    out.loss.backward()
    for n, p in model.named_parameters():
        if n in names:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_mtp_frozen_without_mtp_steps():
    model, st = _tiny_model(0)
    model.config.mtp_steps = 0
    assert not any(n.startswith("mtp.") for n in trainable_names(model, st))


# --------------------------------------------------------------------------------------------------
# The CLI smoke run: files, metrics, schedule, export


def test_cli_smoke_run_writes_everything(tiny_run):
    recs = read_metrics(tiny_run / "metrics.jsonl")
    cfg = pretrain_preset("tiny")
    assert [r["step"] for r in recs] == list(range(1, cfg.total_steps + 1))
    for r in recs:
        assert {"step", "loss", "lr", "tokens", "stage", "grad_norm"} <= r.keys()
    assert [r["tokens"] for r in recs] == sorted({r["tokens"] for r in recs})
    assert any(k.startswith("load_max_over_mean/") for k in recs[0])
    assert any(k.startswith("indexer_kl/") for k in recs[-1]) and "indexer_loss" in recs[-1]
    assert "val_loss" in recs[-1] and "val_loss" in recs[3]  # every stage end
    assert list((tiny_run / "tb").glob("events.out.tfevents.*"))
    assert (tiny_run / "loss.png").stat().st_size > 1000
    assert [p.name for p in sorted((tiny_run / "checkpoints").iterdir())][-1] == f"step_{cfg.total_steps:08d}"
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["step"] == cfg.total_steps and summary["val_loss"] > 0 and summary["unigram_entropy"] > 0
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tiny_run / "hf" / f).is_file()


def test_hf_export_loads_back_with_the_last_stage_settings(tiny_run):
    from glm5.train.tokenizer import Tokenizer

    model = GLM5ForCausalLM.from_pretrained(tiny_run / "hf")
    tok = Tokenizer.from_file(tiny_run / "hf")
    cfg = pretrain_preset("tiny")
    assert model.config.vocab_size == tok.vocab_size and model.config.eos_token_id == tok.eos_id
    assert model.config.rope_theta == cfg.stages[1].rope_theta  # the context extension's base
    ids = torch.tensor(tok.encode("def f(x):\n    return x + 1\n"))
    from glm5.train.checkpoint import list_checkpoints, load_checkpoint

    ckpt = load_checkpoint(list_checkpoints(tiny_run / "checkpoints")[-1][1], restore_rng=False)
    ref = GLM5ForCausalLM(model.config)
    ref.load_state_dict(ckpt.model_state)
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_lr_schedule_of_every_stage(tiny_run):
    cfg = pretrain_preset("tiny")
    recs = read_metrics(tiny_run / "metrics.jsonl")
    starts = cfg.stage_starts()
    for i, st in enumerate(cfg.stages):
        sched = WarmupDecay(st.schedule, warmup_steps=st.warmup_steps, total_steps=st.steps, min_ratio=st.min_lr_ratio)
        got = [r["lr"] for r in recs[starts[i]:starts[i + 1]]]
        assert {r["stage"] for r in recs[starts[i]:starts[i + 1]]} == {st.name}
        assert got == pytest.approx([st.lr * sched(k) for k in range(st.steps)], rel=1e-12)
    sparse = cfg.stages[3]
    assert [r["lr"] for r in recs[starts[3]:]] == [sparse.lr] * sparse.steps  # constant


def test_refuses_to_overwrite_a_run_without_resume(tiny_run, capsys):
    with pytest.raises(RunError, match="--resume"):
        pretrain(pretrain_preset("tiny"), tiny_run, quiet=True, progress=False)
    from glm5.cli import main

    assert main(["pretrain", "--preset", "tiny", "--stage", "pretrain", "--out", str(tiny_run), "--resume"]) == 2
    assert "belongs to a run with stages" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Exact resume


def _resume_cfg(cache: Path) -> PretrainConfig:
    """tiny with a 6-step first stage and checkpoints every 2 steps (mid-stage resumes happen)."""
    cfg = pretrain_preset("tiny")
    stages = (cfg.stages[0].replace(steps=6), *cfg.stages[1:])
    return cfg.replace(stages=stages, ckpt_every=2, val_every=3,
                       data=dataclasses.replace(cfg.data, cache_dir=str(cache / "tokens")))


DRIVER = textwrap.dedent("""
    import os, signal, sys, dataclasses
    from pathlib import Path
    sys.path.insert(0, {test_dir!r})
    from test_pretrain import _resume_cfg
    from glm5.train import pretrain as P

    out, kill_after, resume, batch = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
    cfg = _resume_cfg(Path({cache!r})).replace(expert_parallel=len(sys.argv) > 5 and sys.argv[5] == "ep")
    if batch:
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, batch_size=batch),
                          stages=tuple(s.replace(batch_size=None) for s in cfg.stages))
    if kill_after >= 0:  # SIGKILL this process when it is about to take step kill_after + 1
        calls = [0]
        step = P.Pretrainer.train_step
        def train_step(self):
            if calls[0] == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            calls[0] += 1
            return step(self)
        P.Pretrainer.train_step = train_step
    P.pretrain(cfg, out, resume=resume, progress=False, quiet=True, threads=None if "WORLD_SIZE" in os.environ else 1)
""")


def _driver(tmp_path: Path, cache: Path) -> Path:
    f = tmp_path / "driver.py"
    f.write_text(DRIVER.format(test_dir=str(Path(__file__).parent), cache=str(cache)))
    return f


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "python") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.slow
def test_sigkilled_run_resumes_with_identical_losses(cache_env, tmp_path):
    """Killed (SIGKILL) after step 5 (last checkpoint: step 4, mid-stage), resumed to the end through every
    stage boundary: the same per-step losses, LRs and validation losses as an uninterrupted run, bit for bit."""
    drv = _driver(tmp_path, cache_env)
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = _run([sys.executable, str(drv), str(ref), "-1", "0", "0"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run([sys.executable, str(drv), str(run), "5", "0", "0"])
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    killed = read_metrics(run / "metrics.jsonl")
    assert [x["step"] for x in killed] == [1, 2, 3, 4, 5]
    assert not (run / "summary.json").exists()
    r = _run([sys.executable, str(drv), str(run), "-1", "1", "0"])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_metrics(ref / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [x["step"] for x in b] == [x["step"] for x in a] == list(range(1, 13))
    for key in ("loss", "lr", "tokens", "total_loss", "grad_norm", "val_loss", "indexer_loss"):
        assert [x.get(key) for x in a] == [x.get(key) for x in b], key
    assert (json.loads((ref / "summary.json").read_text())["val_loss"]
            == json.loads((run / "summary.json").read_text())["val_loss"])


def test_stopped_at_a_stage_boundary_and_continued_matches(cache_env, tmp_path):
    """max_steps stops a run at the end of the pretrain stage; `resume` continues it to the end exactly."""
    cfg = _resume_cfg(cache_env)
    cfg = cfg.replace(stages=(cfg.stages[0].replace(steps=3), cfg.stages[2], cfg.stages[3]), ckpt_every=100)
    kw = dict(progress=False, quiet=True, threads=1)
    ra = pretrain(cfg, tmp_path / "a", **kw)
    rb = pretrain(cfg, tmp_path / "b", max_steps=3, **kw)
    assert rb.step == 3 and not (tmp_path / "b" / "checkpoints" / "step_00000004").exists()
    rb = pretrain(cfg, tmp_path / "b", resume=True, **kw)
    assert rb.step == ra.step == cfg.total_steps and rb.val_loss == ra.val_loss
    a, b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in "ab")
    assert [x["loss"] for x in a] == [x["loss"] for x in b] and [x["lr"] for x in a] == [x["lr"] for x in b]


def test_gradient_accumulation_matches_one_big_batch(cache_env, tmp_path):
    """2 micro-batches of 2 rows per step = 1 batch of 4 rows (the same rows, see RowShuffledLoader),
    up to each micro-batch averaging over its own tokens."""
    cfg = _resume_cfg(cache_env)
    st = cfg.stages[0].replace(steps=4)
    kw = dict(progress=False, quiet=True, threads=1)
    pretrain(cfg.replace(stages=(st.replace(batch_size=4),), export_hf=False), tmp_path / "a", **kw)
    pretrain(cfg.replace(stages=(st.replace(batch_size=2, grad_accum=2),), export_hf=False), tmp_path / "b", **kw)
    a, b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in "ab")
    assert [x["tokens"] for x in a] == [x["tokens"] for x in b] == [128, 256, 384, 512]
    la, lb = torch.tensor([x["loss"] for x in a]), torch.tensor([x["loss"] for x in b])
    assert abs(la[0] - lb[0]) < 1e-3
    torch.testing.assert_close(lb, la, rtol=0, atol=5e-3)


def test_bf16_autocast_runs_every_stage(cache_env, tmp_path):
    cfg = _resume_cfg(cache_env)
    cfg = cfg.replace(stages=tuple(s.replace(steps=1, warmup_steps=0) for s in cfg.stages), precision="bf16",
                      export_hf=False)
    r = pretrain(cfg, tmp_path, progress=False, quiet=True, threads=1)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [x["stage"] for x in recs] == ["pretrain", "ctx_ext", "dsa_warmup", "dsa_sparse"]
    assert all(math.isfinite(x["loss"]) for x in recs) and math.isfinite(r.val_loss)


# --------------------------------------------------------------------------------------------------
# Data parallel


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "ddp+ep"])
def test_two_gloo_ranks_match_one_process(cache_env, tmp_path, mode):
    """torchrun with 2 ranks x 2 rows per step vs one process x 4 rows: the same global batch, so the
    same losses up to the per-rank averaging (each rank averages over its own tokens) and float order.
    With expert parallelism each rank holds half of every MoE layer's experts; its checkpoints and HF
    export hold the full model."""
    drv = _driver(tmp_path, cache_env)
    one, two = tmp_path / "one", tmp_path / "two"
    r = _run([sys.executable, str(drv), str(one), "-1", "0", "4"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              str(drv), str(two), "-1", "0", "2", "ep" if mode == "ddp+ep" else "dp"])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [x["step"] for x in a] == [x["step"] for x in b] and [x["tokens"] for x in a] == [x["tokens"] for x in b]
    la, lb = torch.tensor([x["loss"] for x in a]), torch.tensor([x["loss"] for x in b])
    assert abs(la[0] - lb[0]) < 1e-4  # same weights, same rows: only the per-rank averaging differs
    torch.testing.assert_close(lb, la, rtol=0, atol=5e-3)  # measured: <= 7e-4 over 12 steps
    assert (la - lb).abs().mean() < 2e-3
    ga, gb = torch.tensor([x["grad_norm"] for x in a]), torch.tensor([x["grad_norm"] for x in b])
    torch.testing.assert_close(gb, ga, rtol=0.02, atol=0)
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) < 5e-3
    full = GLM5ForCausalLM.from_pretrained(two / "hf")  # the export holds every expert
    ref = GLM5ForCausalLM.from_pretrained(one / "hf")
    for (n, p), (_, q) in zip(full.named_parameters(), ref.named_parameters()):
        assert p.shape == q.shape, n


def test_expert_parallel_world_of_one_matches(cache_env, tmp_path):
    """The expert-parallel path in a world of one (dispatch/combine without collectives) trains like the
    plain MoE, and saves the same parameter names and shapes."""
    cfg = _resume_cfg(cache_env)
    cfg = cfg.replace(stages=(cfg.stages[0].replace(steps=3), cfg.stages[3]), export_hf=False)
    kw = dict(progress=False, quiet=True, threads=1)
    pretrain(cfg, tmp_path / "a", **kw)
    pretrain(cfg.replace(expert_parallel=True), tmp_path / "b", **kw)
    a, b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in "ab")
    la, lb = torch.tensor([x["loss"] for x in a]), torch.tensor([x["loss"] for x in b])
    assert abs(la[0] - lb[0]) < 1e-5  # same weights, same batch: the same loss up to float order
    torch.testing.assert_close(lb, la, rtol=0, atol=2e-3)  # then Muon steps amplify float-order differences
    from glm5.train.checkpoint import list_checkpoints, load_checkpoint

    sa, sb = (load_checkpoint(list_checkpoints(tmp_path / d / "checkpoints")[-1][1], restore_rng=False).model_state
              for d in "ab")
    assert {k: v.shape for k, v in sa.items()} == {k: v.shape for k, v in sb.items()}
