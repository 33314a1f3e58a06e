"""glm5 against transformers' GlmMoeDsaForCausalLM (the reference implementation of glm_moe_dsa).

Each case builds a random tiny transformers model, writes it with save_pretrained, loads it with
glm5.from_pretrained and compares the logits in fp32. Draws are checked for ties at the indexer's
top-k boundary first (where transformers' torch.topk and glm5 may legitimately pick different keys).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import glm5
from model_helpers import TopkTieProbe, hf_kwargs, tiny_config

transformers = pytest.importorskip("transformers")

ATOL = 2e-5  # fp32; the observed difference is ~2e-7 on logits of magnitude ~1


@dataclass
class Case:
    name: str
    batch: int = 2
    seq: int = 48
    pattern: str = "FFF"
    n_group: int = 1
    topk_group: int = 1
    seed: int = 0
    mode: str = "sparse"

    def __str__(self) -> str:
        return f"{self.name}-B{self.batch}xS{self.seq}-{self.pattern}-g{self.n_group}/{self.topk_group}-{self.mode}"


CASES = [
    Case("seq>topk"),  # 48 tokens, top-16: DSA really drops keys
    Case("seq<=topk", batch=1, seq=12),  # every visible key selected: dense attention
    Case("shared-FSF", pattern="FSF"),  # IndexCache sharing: layer 1 reuses layer 0's top-k
    Case("shared-FSS-b3", batch=3, seq=40, pattern="FSS", seed=1),
    Case("group-routing", n_group=4, topk_group=2),  # group-limited expert choice
    Case("mha-form", pattern="FSF", mode="sparse_mha"),  # the expanded form with the top-k mask
]


def _hf_model(case: Case):
    cfg = tiny_config(indexer_types=case.pattern, n_group=case.n_group, topk_group=case.topk_group,
                      num_nextn_predict_layers=0)
    torch.manual_seed(case.seed)
    hf = transformers.GlmMoeDsaForCausalLM(transformers.GlmMoeDsaConfig(**hf_kwargs(cfg))).eval()
    with torch.no_grad():  # a non-zero correction bias, so it must be loaded and used to pick experts
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.1)
    return cfg, hf


@pytest.mark.parametrize("case", CASES, ids=str)
def test_logits_match_transformers(case, tmp_path, monkeypatch):
    cfg, hf = _hf_model(case)
    hf.save_pretrained(tmp_path)
    model = glm5.from_pretrained(tmp_path, dtype=torch.float32)
    assert model.config.indexer_types == cfg.indexer_types
    ids = torch.randint(0, cfg.vocab_size, (case.batch, case.seq))
    probe = TopkTieProbe(monkeypatch)
    with torch.no_grad():
        ours = model(ids, attn_mode=case.mode).logits
        ref = hf(ids).logits
    probe.assert_no_ties()
    assert ours.shape == ref.shape == (case.batch, case.seq, cfg.vocab_size)
    err = float((ours - ref).abs().max())
    assert err <= ATOL, f"max |glm5 - transformers| = {err:.3e}"


def test_transformers_loads_what_glm5_saves(tmp_path, monkeypatch):
    """The other direction: a glm5 model written by save_pretrained loads in transformers, same logits."""
    cfg = tiny_config(indexer_types="FSF", num_nextn_predict_layers=0)
    torch.manual_seed(3)
    model = glm5.model.GLM5ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    hf = transformers.GlmMoeDsaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    probe = TopkTieProbe(monkeypatch)
    with torch.no_grad():
        ours = model(ids).logits
        ref = hf(ids).logits
    probe.assert_no_ties()
    err = float((ours - ref).abs().max())
    assert err <= ATOL, f"max |glm5 - transformers| = {err:.3e}"


def test_config_pattern_derivation_matches_transformers():
    """indexer_types from index_topk_freq / index_skip_topk_offset (GLM-5.2 style), as transformers derives them."""
    from glm5.model.config import _hf_indexer_types

    for freq, offset, L in ((1, 2, 6), (4, 3, 78), (2, 1, 7), (3, 0, 9)):
        hf = transformers.GlmMoeDsaConfig(num_hidden_layers=L, index_topk_freq=freq, index_skip_topk_offset=offset)
        assert _hf_indexer_types({"index_topk_freq": freq, "index_skip_topk_offset": offset}, L) == hf.indexer_types
