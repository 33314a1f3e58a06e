"""The pieces together on a toy model (the pattern the pretraining loop follows): packed batches with
ks/ke attention, Muon + AdamW, the LR schedule, metrics and checkpoints; a run interrupted after a
checkpoint and resumed in fresh objects logs exactly the losses of an uninterrupted run."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from glm5.ops import reference
from glm5.train.checkpoint import load_latest, save_checkpoint
from glm5.train.data import PackedLoader, split_documents
from glm5.train.metrics import MetricsLogger, read_metrics
from glm5.train.optim import OptimConfig, build_optimizer
from glm5.train.schedule import ScheduleConfig, build_scheduler


class ToyLM(nn.Module):
    """Embedding -> one single-head attention over the packed batch (visible keys ks <= s < ke) -> head."""

    def __init__(self, vocab: int, d: int = 32):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.norm = nn.RMSNorm(d)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids_BL, ks_T, ke_T):
        x_TD = self.embed_tokens(input_ids_BL.reshape(-1))
        h_TD = self.norm(x_TD)
        scores_TT = self.q_proj(h_TD) @ self.k_proj(h_TD).T / h_TD.shape[-1] ** 0.5
        mask_TT = reference.visible_mask(ks_T, ke_T, x_TD.shape[0])
        att_TT = scores_TT.masked_fill(~mask_TT, float("-inf")).softmax(-1)
        return self.lm_head(x_TD + att_TT @ self.v_proj(h_TD))


def _run(corpus, train_ids, run_dir, *, stop_at: int, total: int, resume: bool) -> None:
    torch.manual_seed(0)
    model = ToyLM(corpus.vocab_size)
    opt = build_optimizer(model, OptimConfig(lr=2e-2, ns_dtype="float32"))
    sched = build_scheduler(opt, ScheduleConfig(warmup_steps=2, total_steps=total, min_ratio=0.1))
    loader = PackedLoader(corpus, train_ids, seq_len=24, batch_size=3, seed=0)
    step = 0
    if resume:
        ckpt = load_latest(run_dir / "ckpt", model=model, optimizer=opt, scheduler=sched, data=loader)
        step = ckpt.step
    log = MetricsLogger(run_dir, resume_step=step if resume else None, tensorboard=False)
    while step < stop_at:
        batch = loader.next_batch()
        ks, ke = batch.ks_ke()
        logits = model(batch.input_ids, ks, ke)
        loss = nn.functional.cross_entropy(logits, batch.targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        log.log(step, loss=loss.item(), lr=sched.get_last_lr()[0], tokens=step * batch.num_tokens)
        if step % 3 == 0:
            save_checkpoint(run_dir / "ckpt", step, model=model, optimizer=opt, scheduler=sched, data=loader, keep_last=2)
    log.close()


def test_interrupted_and_resumed_run_matches(small_corpus, tmp_path):
    train_ids, _ = split_documents(small_corpus.names, val_fraction=0.1)
    _run(small_corpus, train_ids, tmp_path / "a", stop_at=10, total=10, resume=False)
    _run(small_corpus, train_ids, tmp_path / "b", stop_at=7, total=10, resume=False)  # "killed" after step 7
    _run(small_corpus, train_ids, tmp_path / "b", stop_at=10, total=10, resume=True)  # resumes from step 6
    a, b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in "ab")
    assert [r["step"] for r in b] == list(range(1, 11))
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and [r["lr"] for r in a] == [r["lr"] for r in b]
    losses = np.array([r["loss"] for r in a])
    assert losses[-3:].mean() < losses[:3].mean()
