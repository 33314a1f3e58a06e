"""Pretraining configuration: the run config, the training stages, and named presets.

A run is a chain of stages (GLM-5 recipe, ../shared/GLM5_REFERENCE.md sections 2.3 and 4):

    pretrain       dense MLA attention, short context, all parameters but the indexers, warm-up + cosine
    ctx_ext        longer sequences and a larger RoPE base (mid-training's context extension)
    dsa_warmup     DSA dense warm-up: everything frozen but the lightning indexers, which learn the KL to
                   the main attention over every visible key (the model's indexer loss "dense"); its own
                   LR (GLM-5: 5e-3 -> 2e-4); the main attention stays dense
    dsa_sparse     DSA sparse adaptation: all parameters, top-k sparse attention, indexer KL on the
                   selected keys (indexer loss "sparse"), constant LR

Dense attention is used before DSA is switched on (pretrain, ctx_ext, dsa_warmup), sparse after.
Steps are counted over the whole chain: stage i runs global steps [start_i, start_i + steps_i).

    cfg = pretrain_preset("debug")                 # the debug model through all four stages, minutes on 2 cores
    cfg = cfg.with_stages(["pretrain", "dsa_warmup"])
    print(json.dumps(asdict(cfg), indent=1))       # the full config, as logged with a run
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from glm5.model import ModelConfig, preset
from glm5.train.data import DataConfig
from glm5.train.optim import OptimConfig

TRAINABLE = ("all", "no_indexer", "indexer")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass(kw_only=True, slots=True)
class StageConfig:
    """One training stage. None fields inherit the run's values (PretrainConfig.data / .optim / model)."""

    name: str
    steps: int
    attn_mode: str = "dense"  # glm5.model.ATTN_MODES: "dense" | "sparse" | "sparse_mha"
    indexer_loss: str | None = None  # None | "dense" (KL over all visible keys) | "sparse" (over the top-k)
    trainable: str = "no_indexer"  # "all" | "no_indexer" (the indexers get no gradient without a KL) | "indexer"
    lr: float = 3e-3  # peak LR of every optimizer group (Muon's update RMS is matched to AdamW's)
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # the LR decays to lr * min_lr_ratio
    seq_len: int | None = None  # tokens per row (None: data.seq_len)
    batch_size: int | None = None  # rows per rank per micro-batch (None: data.batch_size)
    grad_accum: int = 1  # micro-batches per optimizer step
    rope_theta: float | None = None  # set the model's RoPE base from this stage on (None: keep)
    mtp_loss_weight: float = 0.3  # GLM-4.5: 0.3, later 0.1
    indexer_loss_weight: float = 1.0  # the indexer's inputs are detached: only an indexer LR multiplier
    bias_update_rate: float = 1e-3  # loss-free balancing step of the router bias (0: frozen)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"stage {self.name!r}: {name} {msg}")

        need(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        need(self.attn_mode in ("dense", "sparse", "sparse_mha"), "attn_mode", f"must be dense/sparse/sparse_mha, got {self.attn_mode!r}")
        need(self.indexer_loss in (None, "dense", "sparse"), "indexer_loss", f"must be None/'dense'/'sparse', got {self.indexer_loss!r}")
        need(self.indexer_loss != "dense" or self.attn_mode == "dense", "indexer_loss",
             "'dense' needs attn_mode='dense' (the KL target is the full attention)")
        need(self.trainable in TRAINABLE, "trainable", f"must be one of {TRAINABLE}, got {self.trainable!r}")
        need(self.trainable != "indexer" or self.indexer_loss is not None, "trainable",
             "'indexer' needs an indexer_loss (the indexers learn only from their KL)")
        need(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        need(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "lr", f"lr={self.lr} min_lr_ratio={self.min_lr_ratio} out of range")
        need(0 <= self.warmup_steps <= self.steps, "warmup_steps", f"must be in [0, steps={self.steps}]")
        need(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")

    def replace(self, **changes) -> "StageConfig":
        return dataclasses.replace(self, **changes)


@dataclass(kw_only=True, slots=True)
class PretrainConfig:
    """Everything a pretraining run needs; `asdict(cfg)` is saved with every checkpoint."""

    name: str = "custom"
    model: ModelConfig = field(default_factory=lambda: preset("debug"))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)  # lr here is ignored: each stage sets its own
    stages: tuple[StageConfig, ...] = ()
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "fp32" | "bf16" (autocast)
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    val_every: int = 50  # steps between validation losses (0: only at stage ends)
    val_batches: int = 8  # batches per validation (rank-sharded; the same batches every time)
    ckpt_every: int = 25  # steps between checkpoints (also at every stage end)
    keep_last: int = 2  # checkpoints kept on disk
    log_every: int = 1  # metrics.jsonl lines (the progress bar updates every step)
    expert_parallel: bool = False  # shard the routed experts over the data-parallel ranks (ExpertParallel)
    export_hf: bool = True  # write DIR/hf (config.json + safetensors + tokenizer.json) at the end

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("PretrainConfig.stages: at least one stage is needed")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"PretrainConfig.stages: stage names must be unique, got {names}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"PretrainConfig.precision must be auto/fp32/bf16, got {self.precision!r}")
        self.stages = tuple(self.stages)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_starts(self) -> list[int]:
        """Global step at which each stage starts, plus the end of the chain: [n_stages + 1]."""
        out = [0]
        for s in self.stages:
            out.append(out[-1] + s.steps)
        return out

    def stage_at(self, step: int) -> int:
        """Index of the stage that runs global step `step` (0-based; the step about to be taken)."""
        starts = self.stage_starts()
        for i in range(len(self.stages)):
            if step < starts[i + 1]:
                return i
        raise ValueError(f"step {step} is past the last stage (total {self.total_steps} steps)")

    def stage_seq_len(self, i: int) -> int:
        return self.stages[i].seq_len or self.data.seq_len

    def stage_batch_size(self, i: int) -> int:
        return self.stages[i].batch_size or self.data.batch_size

    def with_stages(self, names: list[str] | tuple[str, ...]) -> "PretrainConfig":
        """A copy running only the named stages (in the preset's order)."""
        known = [s.name for s in self.stages]
        bad = [n for n in names if n not in known]
        if bad:
            raise ValueError(f"unknown stage(s) {bad}; this preset has {known}")
        return dataclasses.replace(self, stages=tuple(s for s in self.stages if s.name in names))

    def replace(self, **changes) -> "PretrainConfig":
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------------
# Stage templates (GLM-5 recipe shapes; the step counts and LRs are the presets' business)


def pretrain_stage(steps: int, *, lr: float, warmup: int, seq_len: int | None = None, **kw) -> StageConfig:
    return StageConfig(name="pretrain", steps=steps, lr=lr, warmup_steps=warmup, seq_len=seq_len, attn_mode="dense",
                       trainable="no_indexer", schedule="cosine", **kw)


def ctx_ext_stage(steps: int, *, lr: float, seq_len: int, rope_theta: float, **kw) -> StageConfig:
    """Mid-training's context extension: longer rows, larger RoPE base, linear decay (GLM-5: 4e-5 -> 1e-5)."""
    return StageConfig(name="ctx_ext", steps=steps, lr=lr, seq_len=seq_len, rope_theta=rope_theta, attn_mode="dense",
                       trainable="no_indexer", schedule="linear", min_lr_ratio=0.25, **kw)


def dsa_warmup_stage(steps: int, *, lr: float, **kw) -> StageConfig:
    """DSA dense warm-up: only the indexers train (KL to the dense attention); GLM-5 LR 5e-3 -> 2e-4."""
    kw.setdefault("min_lr_ratio", 0.04)
    return StageConfig(name="dsa_warmup", steps=steps, lr=lr, attn_mode="dense", indexer_loss="dense",
                       trainable="indexer", schedule="cosine", bias_update_rate=0.0, **kw)


def dsa_sparse_stage(steps: int, *, lr: float, **kw) -> StageConfig:
    """DSA sparse adaptation: everything trains, top-k sparse attention, KL on the selected keys, constant LR."""
    return StageConfig(name="dsa_sparse", steps=steps, lr=lr, attn_mode="sparse", indexer_loss="sparse",
                       trainable="all", schedule="constant", **kw)


# --------------------------------------------------------------------------------------------------
# Presets


def _debug_model() -> ModelConfig:
    """The debug model (glm5.model.preset("debug")) with one MTP step instead of three (a third of the
    MTP cost; the mechanism is the same) and the RoPE base GLM-4.5 pretrained with."""
    return preset("debug").replace(mtp_steps=1, rope_theta=10_000.0)


def _debug() -> PretrainConfig:
    """The debug model through all four stages on the embedded corpus, in minutes on a 2-core CPU:
    260 steps of 1024 tokens (~1.1 s each on one free core, benchmarks/README.md); a kill loses at
    most 10 steps."""
    return PretrainConfig(
        name="debug",
        model=_debug_model(),
        data=DataConfig(vocab_size=4096, seq_len=128, batch_size=8),
        stages=(
            pretrain_stage(180, lr=3e-3, warmup=15, bias_update_rate=1e-2),
            ctx_ext_stage(30, lr=1e-3, seq_len=256, batch_size=4, rope_theta=100_000.0, bias_update_rate=1e-2),
            dsa_warmup_stage(20, lr=5e-3, seq_len=256, batch_size=4),
            dsa_sparse_stage(30, lr=3e-4, seq_len=256, batch_size=4, bias_update_rate=1e-2),
        ),  # bias rate 1e-2, not GLM's 1e-3: with 1e-3 the expert load stayed 4-7x max/mean over 260 steps
        val_every=60, val_batches=8, ckpt_every=10, keep_last=2,
    )


def _tiny_model() -> ModelConfig:
    """A 2-layer model (one dense, one MoE layer + MTP) for tests: a step takes tens of milliseconds."""
    return preset("debug").replace(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=2,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        index_n_heads=2, index_head_dim=16, index_topk=8, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, mtp_steps=1, rope_theta=10_000.0)


def _tiny() -> PretrainConfig:
    """Every stage for a few steps at a toy size (tests and smoke runs; seconds)."""
    return PretrainConfig(
        name="tiny",
        model=_tiny_model(),
        data=DataConfig(vocab_size=512, seq_len=32, batch_size=4, tokenizer_max_chars=200_000, max_docs=60),
        optim=OptimConfig(ns_dtype="float32"),  # bf16 Newton-Schulz is slower than fp32 on CPU at 64x64
        stages=(
            pretrain_stage(4, lr=1e-2, warmup=1),
            ctx_ext_stage(2, lr=3e-3, seq_len=64, batch_size=2, rope_theta=100_000.0),
            dsa_warmup_stage(2, lr=5e-3, seq_len=64, batch_size=2),
            dsa_sparse_stage(2, lr=1e-3, seq_len=64, batch_size=2),
        ),
        val_every=4, val_batches=2, ckpt_every=3, keep_last=2,
    )


def _mid_model() -> ModelConfig:
    """Between debug and glm5-small: 8 layers at width 512, 32 experts (the benchmark's second size)."""
    return preset("debug").replace(
        hidden_size=512, num_hidden_layers=8, intermediate_size=1536, num_attention_heads=8, q_lora_rank=256,
        kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, index_n_heads=8,
        index_head_dim=32, index_topk=128, n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=256,
        mtp_steps=1, rope_theta=10_000.0)


def _mid() -> PretrainConfig:
    """The mid model: 8 layers, width 512, sequences of 512 (benchmarks; an hour-scale CPU run)."""
    return PretrainConfig(
        name="mid",
        model=_mid_model(),
        data=DataConfig(vocab_size=8192, seq_len=512, batch_size=4),
        stages=(
            pretrain_stage(2000, lr=2e-3, warmup=100),
            ctx_ext_stage(200, lr=5e-4, seq_len=1024, batch_size=2, rope_theta=100_000.0),
            dsa_warmup_stage(100, lr=5e-3, seq_len=1024, batch_size=2),
            dsa_sparse_stage(200, lr=2e-4, seq_len=1024, batch_size=2),
        ),
        val_every=200, val_batches=16, ckpt_every=100, keep_last=2,
    )


PRETRAIN_PRESETS = {"debug": _debug, "tiny": _tiny, "mid": _mid}


def pretrain_preset(name: str) -> PretrainConfig:
    """A fresh PretrainConfig for a named preset (exact names: one of PRETRAIN_PRESETS)."""
    try:
        return PRETRAIN_PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown pretrain preset {name!r}; known: {sorted(PRETRAIN_PRESETS)}") from None
