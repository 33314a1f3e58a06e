"""The pretraining loop: a chain of stages (glm5.train.stages) over packed batches, resumable exactly.

    from glm5.train.pretrain import pretrain
    from glm5.train.stages import pretrain_preset
    result = pretrain(pretrain_preset("debug"), "runs/debug")          # or: glm5 pretrain --preset debug --out runs/debug
    result = pretrain(cfg, "runs/debug", max_steps=400, resume=True)   # continue a killed run up to global step 400

Each optimizer step: `grad_accum` micro-batches (forward under bf16 autocast where chosen, LM loss +
mtp_loss_weight * MTP loss + indexer KL), a data-parallel gradient all-reduce (DDP), gradient
clipping, Muon (+ Muon Split) / AdamW, the stage's LR schedule, and the loss-free balancing update
of every MoE router bias from the step's expert load (all-reduced, so every rank keeps the same
bias). Validation loss on the held-out documents every `val_every` steps and at stage ends.
Checkpoints (atomic, train.checkpoint) every `ckpt_every` steps and at stage ends; a resumed run
reloads model, optimizer, scheduler, data cursor and RNG and logs the same per-step losses as an
uninterrupted one. At the end: the Hugging Face export (DIR/hf), a loss-curve PNG and a summary.

Run folder: tokenizer.json, config.json, metrics.jsonl, tb/ (TensorBoard), checkpoints/step_N/,
loss.png, summary.json, hf/ (config.json + model.safetensors + tokenizer.json).

Distributed: `torchrun --nproc-per-node W -m glm5.cli pretrain ...` runs W data-parallel ranks (Gloo on
CPU, NCCL on GPU); each rank reads its own rows of the same global batch (PackedLoader rank/world_size),
so W ranks with batch_size B train like one process with batch_size W*B.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import glm5.ops
from glm5.model import GLM5ForCausalLM, MLAttention, MoE

from .checkpoint import list_checkpoints, load_latest, restore_rng_state, save_checkpoint
from .data import Batch, PackedLoader, build_data
from .metrics import MetricsLogger, ProgressBar, plot_loss_curve, unigram_entropy
from .optim import build_optimizer, describe
from .parallel import (apply_expert_parallel, clip_grad_norm, finish_expert_grads, full_model_state,
                       full_optimizer_state, init_distributed, load_model_state, load_optimizer_state, wrap_ddp)
from .schedule import ScheduleConfig, build_scheduler
from .stages import PretrainConfig, StageConfig

__all__ = ["pretrain", "Pretrainer", "RunResult", "RunError", "trainable_names", "set_trainable", "resolve_precision", "auto_threads",
           "RowShuffledLoader", "StepStats"]


class RunError(ValueError):
    """A run folder that does not fit this invocation (existing checkpoints without --resume, another
    stage chain); the CLI prints it without a traceback."""


@dataclass
class RunResult:
    out_dir: Path
    step: int  # the global step the run stopped at
    total_steps: int  # the chain's length
    tokens: int  # training tokens processed (all ranks, all steps so far)
    wall_s: float  # this invocation's wall time
    val_loss: float | None  # final validation LM loss, in the last stage's attention mode
    val_loss_dense: float | None  # the same with dense attention (DSA vs dense)
    unigram_entropy: float  # nats/token of the training documents


# --------------------------------------------------------------------------------------------------
# Row-shuffled packing


class RowShuffledLoader(PackedLoader):
    """A PackedLoader that visits the rows of each epoch in a seeded random order.

    The stream is packed and cut exactly as PackedLoader's (documents keep their boundaries, ks/ke), but
    a batch takes B random rows instead of B consecutive ones. A short run then samples the whole corpus
    instead of the first documents of the epoch's order: in the stdlib, pydoc_data/topics.py alone is
    200K tokens (half of the debug preset's pretraining), all English help text. The state is
    PackedLoader's (epoch, position); the order is a function of (seed, epoch).
    """

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._rows_epoch: int | None = None

    def row_order(self, epoch: int) -> np.ndarray:
        if self._rows_epoch != epoch:
            self._rows = np.random.default_rng([self.seed, epoch, 1]).permutation(self.sequences_per_epoch)
            self._rows_epoch = epoch
        return self._rows

    def _batch(self, epoch: int, first_row: int) -> Batch:
        order = self.row_order(epoch)
        rows = [self.sequence(epoch, int(order[first_row + j])) for j in range(self.batch_size)]
        windows = torch.from_numpy(np.stack([w for w, _ in rows]))
        doc_start = torch.from_numpy(np.stack([d for _, d in rows]))
        return Batch(windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), doc_start)


# --------------------------------------------------------------------------------------------------
# Threads and precision


def auto_threads() -> int:
    """CPU threads for training: torch's default (one per core), fewer when the 1-minute load average
    says other processes hold the cores. OpenMP threads that wait at every barrier for a descheduled
    partner make each small op cost a scheduler time slice: on a busy 2-core machine the debug
    pretraining step took 6.3 s with 2 threads and 1.1 s with 1 (benchmarks/README.md). An explicit
    OMP_NUM_THREADS is left alone."""
    n = torch.get_num_threads()
    if "OMP_NUM_THREADS" in os.environ or not hasattr(os, "getloadavg"):
        return n
    free = (os.cpu_count() or n) - os.getloadavg()[0]
    return max(1, min(n, math.floor(free + 0.5)))


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 for "bf16", and for "auto" on CUDA devices that support it; None = fp32.

    "auto" keeps fp32 on CPU: bf16 autocast there was ~15% faster on the debug model but less exact
    (validation loss 5.469 vs 5.455 after 80 steps; benchmarks/README.md), and CPUs without native
    bf16 GEMMs may run it slower; ask for it with precision="bf16".
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


# --------------------------------------------------------------------------------------------------
# Trainable sets


def _is_indexer(name: str) -> bool:
    return ".indexer." in name


def trainable_names(model: nn.Module, stage: StageConfig) -> list[str]:
    """Names of the parameters a stage trains.

    "indexer": the lightning indexers only (DSA dense warm-up); "no_indexer": everything else (the
    indexers get no gradient without a KL loss, their inputs are detached); "all": everything. The MTP
    block is frozen when the model has it but the stage's MTP depth is 0 (it would get no gradient).
    """
    mtp_on = getattr(model, "mtp", None) is not None and model.config.mtp_steps > 0
    out = []
    for name, _ in model.named_parameters():
        if name.startswith("mtp.") and not mtp_on:
            continue
        idx = _is_indexer(name)
        if stage.trainable == "all" or (stage.trainable == "indexer") == idx:
            out.append(name)
    return out


def set_trainable(model: nn.Module, stage: StageConfig) -> list[str]:
    """Set requires_grad per trainable_names; returns those names."""
    names = trainable_names(model, stage)
    keep = set(names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    return names


# --------------------------------------------------------------------------------------------------
# Per-step statistics from hooks: expert load per MoE layer, indexer KL per attention layer


class StepStats:
    """Forward hooks collecting, over the micro-batches of one step, each MoE layer's expert load and
    each attention layer's indexer KL (the MTP block's modules are called once per MTP step; all count)."""

    def __init__(self, model: GLM5ForCausalLM):
        self.moe = {n: m for n, m in model.named_modules() if isinstance(m, MoE)}
        self.attn = {n: m for n, m in model.named_modules() if isinstance(m, MLAttention) and m.indexer is not None}
        self.load: dict[str, torch.Tensor] = {}
        self.kl: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self._handles = [m.register_forward_hook(self._moe_hook(n)) for n, m in self.moe.items()]
        self._handles += [m.register_forward_hook(self._attn_hook(n)) for n, m in self.attn.items()]

    def _moe_hook(self, name):
        def hook(module, args, out):
            load = module.last_expert_load
            if load is not None and torch.is_grad_enabled():
                self.load[name] = self.load[name] + load if name in self.load else load.clone()
        return hook

    def _attn_hook(self, name):
        def hook(module, args, out):
            if out.indexer_loss is not None and torch.is_grad_enabled():
                v = out.indexer_loss.detach().float() / max(1, args[0].shape[0])  # per query token
                self.kl[name] = self.kl[name] + v if name in self.kl else v
        return hook

    def reset(self) -> None:
        self.load, self.kl, self.tokens = {}, {}, 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _short(name: str) -> str:
    """model.layers.3.mlp -> L3, mtp.mlp -> MTP."""
    parts = name.split(".")
    if parts[0] == "mtp":
        return "MTP"
    return f"L{parts[2]}" if len(parts) > 2 and parts[1] == "layers" else name


# --------------------------------------------------------------------------------------------------
# The trainer


class Pretrainer:
    """One run over cfg.stages in out_dir; `run()` trains up to max_steps (the chain's global step count)."""

    def __init__(self, cfg: PretrainConfig, out_dir: str | os.PathLike, *, max_steps: int | None = None,
                 resume: bool = False, progress: bool = True, device: str | None = None, quiet: bool = False,
                 threads: int | None = None):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.total = cfg.total_steps
        self.stop = self.total if max_steps is None else min(int(max_steps), self.total)
        if self.stop < 1:
            raise ValueError(f"max_steps={max_steps} must be >= 1")
        self.resume, self.progress, self.quiet = resume, progress, quiet
        self.dist = init_distributed(device)
        self.device = self.dist.device
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        self.threads_requested = threads
        if threads is not None:
            torch.set_num_threads(threads)
        elif self.device.type == "cpu":
            torch.set_num_threads(auto_threads())
        self.ckpt_dir = self.out / "checkpoints"
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if not resume and list_checkpoints(self.ckpt_dir):
                raise RunError(f"{self.ckpt_dir} already holds checkpoints: pass --resume to continue that run, "
                                      "or choose another --out")
        self.dist.barrier()

    def log(self, msg: str) -> None:
        if self.dist.main and not self.quiet:
            print(msg, flush=True)

    # ---- setup -----------------------------------------------------------------------------------
    def _build_data(self):
        d = self.dist
        data = None
        if d.main:  # rank 0 trains the tokenizer and fills the token cache; the others then read them
            data = build_data(self.cfg.data, self.out, rank=d.rank, world_size=d.world_size)
        d.barrier()
        if not d.main:
            data = build_data(self.cfg.data, self.out, rank=d.rank, world_size=d.world_size)
        self.tokenizer, self.corpus = data.tokenizer, data.corpus
        self.train_ids, self.val_ids = data.train.doc_ids, data.val.doc_ids
        tokens = self.corpus.tokens[: self.corpus.num_tokens]
        train_mask = torch.zeros(self.corpus.num_docs, dtype=torch.bool)
        train_mask[torch.from_numpy(self.train_ids)] = True
        lengths = torch.from_numpy(self.corpus.doc_lengths())
        tok_mask = torch.repeat_interleave(train_mask, lengths).numpy()
        self.entropy = unigram_entropy(tokens[tok_mask], self.tokenizer.vocab_size)

    def _build_model(self) -> GLM5ForCausalLM:
        tok = self.tokenizer
        mcfg = self.cfg.model.replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                                      bos_token_id=tok.eos_id)
        torch.manual_seed(self.cfg.seed)
        model = GLM5ForCausalLM(mcfg).to(self.device)
        # every rank built the same full model; expert parallelism keeps this rank's experts of each layer
        self.expert_names = apply_expert_parallel(model) if self.cfg.expert_parallel else []
        return model

    def _rope_theta(self, i: int) -> float:
        theta = self.cfg.model.rope_theta
        for s in self.cfg.stages[: i + 1]:
            theta = s.rope_theta if s.rope_theta is not None else theta
        return theta

    def _enter_stage(self, i: int) -> None:
        """Configure model, optimizer, scheduler and loaders for stage i (fresh state)."""
        cfg, st = self.cfg, self.cfg.stages[i]
        self.stage_idx, self.stage = i, st
        self.model.config.rope_theta = self._rope_theta(i)
        self.trainable = set_trainable(self.model, st)
        self.ddp = wrap_ddp(self.model, self.device, self.expert_names) if self.dist.enabled else self.model
        self.opt = build_optimizer(self.model, dataclasses.replace(cfg.optim, lr=st.lr))
        self.sched = build_scheduler(self.opt, ScheduleConfig(kind=st.schedule, warmup_steps=st.warmup_steps,
                                                              total_steps=st.steps, min_ratio=st.min_lr_ratio))
        common = dict(seq_len=cfg.stage_seq_len(i), batch_size=cfg.stage_batch_size(i), rank=self.dist.rank,
                      world_size=self.dist.world_size)
        self.train_loader = RowShuffledLoader(self.corpus, self.train_ids, shuffle=True, seed=cfg.data.shuffle_seed + i,
                                              **common)
        # the validation rows: a fixed random sample over every held-out document, the same at every call
        self.val_loader = RowShuffledLoader(self.corpus, self.val_ids, shuffle=False, seed=cfg.data.split_seed, **common)

    def _describe_stage(self) -> None:
        st, i = self.stage, self.stage_idx
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        starts = self.cfg.stage_starts()
        self.log(f"\n== stage {i + 1}/{len(self.cfg.stages)} {st.name!r}: steps {starts[i]}..{starts[i + 1]}, "
                 f"attention {st.attn_mode}, indexer loss {st.indexer_loss}, trains {st.trainable} "
                 f"({n_train:,} params), lr {st.lr:g} {st.schedule}, rows {self.train_loader.batch_size}x"
                 f"{self.train_loader.seq_len} x{self.dist.world_size} ranks x{st.grad_accum} accum, "
                 f"rope_theta {self.model.config.rope_theta:g}")
        if not self.quiet and self.dist.main:
            print(describe(self.opt), flush=True)

    # ---- one step --------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _forward(self, model, batch, st: StageConfig, *, attn_mode: str | None = None, indexer_loss=None,
                 mtp_steps: int | None = None):
        with self._autocast():
            return model(batch.input_ids, position_ids=batch.position_ids(), labels=batch.input_ids,
                         attn_mode=attn_mode or st.attn_mode, indexer_loss=indexer_loss, mtp_steps=mtp_steps,
                         mtp_loss_weight=st.mtp_loss_weight, indexer_loss_weight=st.indexer_loss_weight)

    def train_step(self) -> dict:
        st = self.stage
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, mtp_loss, indexer_loss, total
        self.stats.reset()
        n_tok = 0
        for micro in range(st.grad_accum):
            batch = self.train_loader.next_batch().to(self.device)
            n_tok += batch.num_tokens
            sync = micro == st.grad_accum - 1
            ctx = self.ddp.no_sync() if (self.dist.enabled and not sync) else contextlib.nullcontext()
            with ctx:
                out = self._forward(self.ddp, batch, st, indexer_loss=st.indexer_loss)
                (out.loss / st.grad_accum).backward()
            nan = torch.full((), math.nan, device=self.device)
            vals = [out.lm_loss, out.mtp_loss, out.indexer_loss, out.loss]
            sums += torch.stack([(v if v is not None else nan).detach().double() for v in vals])  # no host sync
        finish_expert_grads(self.model, self.dist.world_size)
        sharded = set(self.expert_names)
        params = [p for n, p in self.model.named_parameters() if p.requires_grad and n not in sharded]
        shards = [p for n, p in self.model.named_parameters() if p.requires_grad and n in sharded]
        gnorm = clip_grad_norm(params, shards, self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf"), self.dist)
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        rec = self._balance(st)
        means = (self.dist.all_reduce_(sums / st.grad_accum) / self.dist.world_size).tolist()
        rec = {"loss": means[0], "mtp_loss": means[1], "indexer_loss": means[2], "total_loss": means[3], "lr": lr,
               "grad_norm": float(gnorm), **rec}
        for k in ("mtp_loss", "indexer_loss"):
            if math.isnan(rec[k]):
                del rec[k]
        self.tokens += n_tok * self.dist.world_size
        return rec

    @torch.no_grad()
    def _balance(self, st: StageConfig) -> dict:
        """Loss-free balancing: every router bias += rate * sign(mean load - load), from the step's
        (all-reduced) expert load. Returns load metrics: max/mean load per MoE layer, indexer KL per layer."""
        rec = {}
        names = sorted(self.stats.load)
        if names:
            loads = torch.stack([self.stats.load[n] for n in names]).to(torch.float64)
            loads = self.dist.all_reduce_(loads)
            for n, load in zip(names, loads):
                if st.bias_update_rate > 0:
                    glm5.ops.update_router_bias(self.stats.moe[n].gate.e_score_correction_bias, load, st.bias_update_rate)
                rec[f"load_max_over_mean/{_short(n)}"] = (load.max() / load.mean().clamp(min=1e-9)).item()
        if self.stats.kl:
            names = sorted(self.stats.kl)
            kls = self.dist.all_reduce_(torch.stack([self.stats.kl[n] for n in names]).double()) / self.dist.world_size
            for n, v in zip(names, kls):
                rec[f"indexer_kl/{_short(n)}"] = v.item() / st.grad_accum
        return rec

    @torch.no_grad()
    def validate(self, *, attn_mode: str | None = None, batches: int | None = None) -> float:
        """Mean LM loss over the first `batches` validation batches (the same ones every time)."""
        self.model.eval()
        n = batches or self.cfg.val_batches
        tot = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in self.val_loader.epoch_batches(0, max_batches=n):
            out = self._forward(self.model, batch.to(self.device), self.stage, attn_mode=attn_mode, mtp_steps=0)
            tot += torch.stack([out.lm_loss.double(), torch.ones((), dtype=torch.float64, device=self.device)])
        self.model.train()
        tot = self.dist.all_reduce_(tot)
        return (tot[0] / tot[1].clamp(min=1)).item()

    # ---- checkpoints -----------------------------------------------------------------------------
    def config_dict(self) -> dict:
        """The run config as saved: "model" is the live model's (the tokenizer's vocabulary and special
        ids, the current stage's RoPE base), so a checkpoint folder describes the model it holds."""
        d = asdict(self.cfg)
        d["model"] = self.model.config.to_dict()
        return d

    def save(self, step: int) -> None:
        # world-size independent: expert shards gathered (a collective: every rank takes part)
        model_state = full_model_state(self.model, self.dist)
        opt_state = full_optimizer_state(self.model, self.opt, self.dist)
        if self.dist.main:
            save_checkpoint(self.ckpt_dir, step, model=model_state, optimizer=_State(opt_state), scheduler=self.sched,
                            data=self.train_loader, config=self.config_dict(), keep_last=self.cfg.keep_last,
                            extra={"stage": self.stage_idx, "stage_name": self.stage.name, "tokens": self.tokens,
                                   "threads": torch.get_num_threads()})
        self.dist.barrier()

    def _restore(self) -> int:
        """Load the newest checkpoint (if resuming and one exists); returns the global step to start at."""
        ckpt = load_latest(self.ckpt_dir, restore_rng=False) if self.resume else None
        if ckpt is None:
            if self.resume:
                self.log(f"no checkpoint in {self.ckpt_dir}: starting a fresh run")
            self._enter_stage(0)
            self.tokens = 0
            return 0
        step = ckpt.step
        saved = [(s["name"], s["steps"]) for s in (ckpt.config or {}).get("stages", [])]
        if saved and saved != [(s.name, s.steps) for s in self.cfg.stages]:
            raise RunError(f"{ckpt.path} belongs to a run with stages {saved}, this run has "
                             f"{[(s.name, s.steps) for s in self.cfg.stages]}: resume with the same preset and --stage")
        load_model_state(self.model, ckpt.model_state, self.dist)
        extra = ckpt.extra if isinstance(ckpt.extra, dict) else {}
        self.tokens = int(extra.get("tokens", 0))
        if self.threads_requested is None and extra.get("threads") and self.device.type == "cpu":
            torch.set_num_threads(int(extra["threads"]))  # CPU results depend on it: resume exactly
        if step >= self.total:
            self._enter_stage(len(self.cfg.stages) - 1)
        else:
            i = self.cfg.stage_at(step)
            self._enter_stage(i)
            if step > self.cfg.stage_starts()[i]:  # mid-stage: continue its optimizer, schedule and data
                load_optimizer_state(self.model, self.opt, ckpt.optimizer_state, self.dist)
                self.sched.load_state_dict(ckpt.scheduler_state)
                self.train_loader.load_state_dict(ckpt.data_state)
        if ckpt.rng_state is not None:
            restore_rng_state(ckpt.rng_state)
        self.log(f"resumed from {ckpt.path} (step {step}, stage {self.stage.name!r})")
        return step

    # ---- the run ---------------------------------------------------------------------------------
    def run(self) -> RunResult:
        t0 = time.perf_counter()
        cfg = self.cfg
        self._build_data()
        self.model = self._build_model()
        if self.dist.main:
            (self.out / "config.json").write_text(json.dumps(self.config_dict(), indent=1, default=str))
        step = self._restore()
        start = step
        self.stats = StepStats(self.model)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"glm5 pretrain {cfg.name!r}: {n_params / 1e6:.2f}M parameters, vocab {self.tokenizer.vocab_size}, "
                 f"{self.corpus.num_docs} documents / {self.corpus.num_tokens:,} tokens "
                 f"({len(self.val_ids)} held out), unigram entropy {self.entropy:.3f} nats/token, "
                 f"device {self.device}" + (f" ({torch.get_num_threads()} threads)" if self.device.type == "cpu" else "") +
                 f", {self.dist.world_size} rank(s), "
                 f"precision {'bf16 autocast' if self.amp_dtype else 'fp32'}, ops {glm5.ops.get_impl()}, "
                 f"steps {step} -> {self.stop} of {self.total}")
        logger = MetricsLogger(self.out, resume_step=step if self.resume else None) if self.dist.main else None
        bar = ProgressBar(self.stop, initial_step=step, disable=not (self.progress and self.dist.main))
        starts = cfg.stage_starts()
        if step < self.stop:
            self._describe_stage()
        val_loss = None
        try:
            while step < self.stop:
                i = cfg.stage_at(step)
                if i != self.stage_idx:
                    self._enter_stage(i)
                    self._describe_stage()
                rec = self.train_step()
                step += 1
                stage_end = step == starts[self.stage_idx + 1]
                if (cfg.val_every and step % cfg.val_every == 0) or stage_end or step == self.stop:
                    rec["val_loss"] = val_loss = self.validate()
                if logger is not None:
                    logger.log(step, stage=self.stage.name, tokens=self.tokens, **rec)
                bar.update(step, tokens=self.train_loader.batch_size * self.train_loader.seq_len * self.stage.grad_accum
                           * self.dist.world_size, loss=rec["loss"], stage=self.stage.name)
                if step % cfg.ckpt_every == 0 or stage_end or step == self.stop:
                    self.save(step)
        finally:
            bar.close()
            if logger is not None:
                logger.close()
            self.stats.remove()
        val_dense = None
        if step > start or val_loss is None:  # the final figure: 4x the periodic validation's rows
            n = 4 * cfg.val_batches
            val_loss = self.validate(batches=n)
            val_dense = self.validate(attn_mode="dense", batches=n) if self.stage.attn_mode != "dense" else val_loss
        result = RunResult(out_dir=self.out, step=step, total_steps=self.total, tokens=self.tokens,
                           wall_s=time.perf_counter() - t0, val_loss=val_loss, val_loss_dense=val_dense,
                           unigram_entropy=self.entropy)
        full = full_model_state(self.model, self.dist) if self.expert_names and self.cfg.export_hf else None
        if self.dist.main:
            self._finish(result, full)
        self.dist.barrier()
        return result

    def _finish(self, r: RunResult, full_state: dict | None) -> None:
        plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss.png", hline=r.unigram_entropy,
                        title=f"glm5 pretrain {self.cfg.name}")
        if self.cfg.export_hf:
            hf = self.out / "hf"
            model = self.model
            if full_state is not None:  # expert parallel: a full model from the gathered state
                model = GLM5ForCausalLM(self.model.config, init=False).to(self.device)
                model.load_state_dict(full_state)
            model.save_pretrained(hf)
            self.tokenizer.save(hf / "tokenizer.json")
        summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(r).items()}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        self.log(f"\nstep {r.step}/{r.total_steps}, {r.tokens:,} tokens, {r.wall_s:.0f} s")
        if r.val_loss is not None:
            mode = self.stage.attn_mode
            dense = "" if mode == "dense" or r.val_loss_dense is None else f" (dense attention: {r.val_loss_dense:.3f})"
            gap = r.unigram_entropy - r.val_loss
            n_tok = min(4 * self.cfg.val_batches, self.val_loader.batches_per_epoch) * self.val_loader.batch_size * self.val_loader.seq_len * self.dist.world_size
            self.log(f"validation loss {r.val_loss:.3f} nats/token over {n_tok:,} held-out tokens ({mode} attention){dense} "
                     f"vs unigram entropy "
                     f"{r.unigram_entropy:.3f}: {abs(gap):.3f} {'below' if gap > 0 else 'ABOVE'} it")
        self.log(f"run folder {self.out}: metrics.jsonl, tb/, checkpoints/, loss.png" +
                 (", hf/" if self.cfg.export_hf else ""))


class _State:
    """An object whose state_dict() is a given dict (save_checkpoint takes objects)."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def pretrain(cfg: PretrainConfig, out_dir: str | os.PathLike, *, max_steps: int | None = None, resume: bool = False,
             progress: bool = True, device: str | None = None, quiet: bool = False, threads: int | None = None) -> RunResult:
    """Train cfg's stage chain in out_dir up to global step max_steps (default: the whole chain).

    threads: CPU threads (default: auto_threads(), or on resume the checkpoint's, since CPU results
    depend on the thread count)."""
    n_threads = torch.get_num_threads()
    trainer = Pretrainer(cfg, out_dir, max_steps=max_steps, resume=resume, progress=progress, device=device, quiet=quiet,
                         threads=threads)
    try:
        return trainer.run()
    finally:
        torch.set_num_threads(n_threads)
        if trainer.dist.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Command line (glm5 pretrain ...)


def add_arguments(p) -> None:
    from .stages import PRETRAIN_PRESETS

    p.add_argument("--preset", default="debug", choices=sorted(PRETRAIN_PRESETS), help="named run config (default: debug)")
    p.add_argument("--out", required=True, help="run folder (metrics, checkpoints, tokenizer, HF export)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop at this global step of the stage chain (a resumed run continues up to it)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--stage", nargs="+", default=None, metavar="NAME", help="run only these stages of the preset")
    p.add_argument("--data", default=None, help='corpus: "stdlib" (default), a path, comma-separated paths, or hf:NAME')
    p.add_argument("--tokenizer", default=None, help="an existing tokenizer.json instead of training a BPE")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"], help="default: the preset's (auto)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--expert-parallel", action="store_true",
                   help="shard each MoE layer's experts over the torchrun ranks (with data parallel over the rest)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: one per free core by the load average; a resumed run keeps its own)")
    p.add_argument("--ops", default=None, choices=["kernel", "reference"], help="glm5.ops implementation")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")


def main_from_args(args) -> int:
    from .stages import pretrain_preset

    cfg = pretrain_preset(args.preset)
    if args.stage:
        cfg = cfg.with_stages(args.stage)
    data = cfg.data
    if args.data is not None:
        data = dataclasses.replace(data, source=args.data)
    if args.tokenizer is not None:
        data = dataclasses.replace(data, tokenizer=args.tokenizer)
    cfg = cfg.replace(data=data, precision=args.precision or cfg.precision,
                      expert_parallel=args.expert_parallel or cfg.expert_parallel)
    if args.ops is not None:
        glm5.ops.set_impl(args.ops)
    try:
        r = pretrain(cfg, args.out, max_steps=args.max_steps, resume=args.resume, progress=not args.no_progress,
                     device=args.device, threads=args.threads)
    except RunError as e:
        print(f"glm5 pretrain: error: {e}", file=sys.stderr)
        return 2
    if r.val_loss is not None and r.step == r.total_steps and not r.val_loss < r.unigram_entropy:
        print(f"glm5 pretrain: warning: validation loss {r.val_loss:.3f} is not below the unigram entropy "
              f"{r.unigram_entropy:.3f} (too few steps to learn more than token frequencies)", file=sys.stderr)
    return 0
