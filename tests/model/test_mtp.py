"""Multi-token prediction: one block applied mtp_steps times with shared weights, and its loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm5.model import GLM5ForCausalLM
from glm5.model.transformer import IGNORE_INDEX, doc_ends, pack_ranges, shifted_targets
from model_helpers import tiny_config


def _model(**kw):
    cfg = tiny_config(**kw)
    torch.manual_seed(0)
    return cfg, GLM5ForCausalLM(cfg)


def test_one_block_serves_every_step():
    cfg, model = _model(mtp_steps=3)
    names = [n for n, _ in model.named_parameters() if n.startswith("mtp.")]
    assert "mtp.eh_proj.weight" in names and "mtp.shared_head.norm.weight" in names
    assert model.mtp.eh_proj.weight.shape == (cfg.hidden_size, 2 * cfg.hidden_size)
    assert not any(n.startswith("mtp.embed") or "head.weight" in n for n in names)  # shared with the main model
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    out = model(ids, labels=ids)
    assert len(out.mtp_losses) == 3
    torch.testing.assert_close(out.mtp_loss, torch.stack(out.mtp_losses).mean())
    torch.testing.assert_close(out.loss, out.lm_loss + 0.1 * out.mtp_loss)


def test_mtp_loss_matches_a_manual_recursion():
    cfg, model = _model(mtp_steps=2, index_topk=64)
    B, S = 2, 16
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    with torch.no_grad():
        out = model(ids, labels=ids)
        h = out.hidden_states  # [B, S, D], final-normed
        emb = model.model.embed_tokens
        for k in (1, 2):
            x = torch.zeros_like(ids)
            x[:, : S - k] = ids[:, k:]
            rows = []
            for b in range(B):  # each row on its own: a causal block over S tokens
                positions, ks, ke = pack_ranges(1, S, ids.device)
                cos, sin = model.rope(positions)
                rows.append(model.mtp.step(h[b], emb(x[b]), cos, sin, ks, ke, mode="dense")[0])
            h = torch.stack(rows)
            logits = model.lm_head(h)[:, : S - k - 1]
            want = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), ids[:, k + 1:].reshape(-1))
            torch.testing.assert_close(out.mtp_losses[k - 1], want, atol=1e-5, rtol=1e-5)


def test_targets_never_cross_a_document():
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    _, ks, _ = pack_ranges(1, 9, pos.device, pos)
    ends = doc_ends(ks)
    assert ends.tolist() == [4, 4, 4, 4, 7, 7, 7, 9, 9]
    labels = torch.arange(100, 109)
    assert shifted_targets(labels, ks, ends, 1).tolist() == [101, 102, 103, -100, 105, 106, -100, 108, -100]
    assert shifted_targets(labels, ks, ends, 3).tolist() == [103, -100, -100, -100, -100, -100, -100, -100, -100]
    assert IGNORE_INDEX == -100


def test_mtp_loss_trains_the_block_and_the_trunk():
    cfg, model = _model()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    model(ids, labels=ids).mtp_loss.backward()
    assert model.mtp.eh_proj.weight.grad.abs().sum() > 0
    assert model.mtp.self_attn.q_a_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_a_proj.weight.grad.abs().sum() > 0  # through h^0
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_mtp_can_be_off():
    cfg, model = _model()
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    assert model(ids, labels=ids, mtp_steps=0).mtp_loss is None
    _, no_mtp = _model(num_nextn_predict_layers=0)
    assert no_mtp.mtp is None and no_mtp(ids, labels=ids).mtp_loss is None


def test_glm52_mtp_steps_can_share_the_first_steps_topk(monkeypatch):
    import glm5

    calls = []
    inner = glm5.ops.indexer_topk
    monkeypatch.setattr(glm5.ops, "indexer_topk", lambda *a: calls.append(1) or inner(*a))
    for share, want in ((False, 3), (True, 1)):
        cfg, model = _model(mtp_steps=3, indexer_types="FSS", index_share_for_mtp_iteration=share)
        ids = torch.randint(0, cfg.vocab_size, (1, 24))
        calls.clear()
        with torch.no_grad():
            model(ids, labels=ids)
        assert len(calls) == 1 + want, share  # layer 0, then the MTP block's own indexer runs


def test_mtp_indexer_trains_with_the_indexer_loss():
    cfg, model = _model()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    out = model(ids, labels=ids, indexer_loss="sparse")
    out.indexer_loss.backward()
    assert model.mtp.self_attn.indexer.wq_b.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.indexer.wq_b.weight.grad.abs().sum() > 0
    assert model.mtp.eh_proj.weight.grad is None or model.mtp.eh_proj.weight.grad.abs().sum() == 0
