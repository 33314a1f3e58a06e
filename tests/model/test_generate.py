"""Generation: cached decode == full forward, sampling with exact logprobs, stop tokens, seeds,
MTP speculative decoding == greedy (drafts == the training-time MTP recursion), the cache, the CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

import glm5
from glm5.model import GLM5ForCausalLM, preset
from glm5.model.cache import PackedKVCache
from glm5.model.generate import GenerationResult, make_generators, mean_accept_length, sample
from glm5.model.transformer import pack_ranges
from model_helpers import tiny_config

# Prompt lengths around the tiny config's index_topk=16, so the sparse path really selects.
PROMPTS = [[3, 4, 5, 6, 7], list(range(10, 40)), [9], [100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 0, 1, 2, 3, 4, 5, 6]]


@dataclass
class Case:
    name: str
    cfg: dict = field(default_factory=dict)
    mode: str = "sparse"
    seed: int = 0

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("sparse"),                                            # every layer its own indexer
    Case("shared-indexer", {"indexer_types": "FSF"}),          # layer 1 reuses layer 0's top-k
    Case("group-limited", {"n_group": 4, "topk_group": 2}),   # group-limited routing in the MoE
    Case("sparse_mha", mode="sparse_mha"),                     # expanded form over the cache
    Case("dense", mode="dense"),                               # dense MLA over the cache
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared machine every small op of a decode step
    would wait for descheduled OpenMP workers (the kernels' results do not depend on the count)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(seed: int = 0, **kw) -> GLM5ForCausalLM:
    torch.manual_seed(seed)
    return GLM5ForCausalLM(tiny_config(**kw)).eval()


def _full_logits(model, ids: list[int], mode: str = "sparse") -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]), attn_mode=mode).logits[0].float()


# ---------------------------------------------------------------------------------------------------
# Incremental decode == full forward
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=str)
def test_decode_steps_match_the_full_forward(case):
    """Each step's logits equal the full forward's at that position (fp32), greedy tokens are its argmax."""
    model = _model(**case.cfg)
    results = model.generate(PROMPTS, 14, return_logits=True, attn_mode=case.mode)
    for p, r in zip(PROMPTS, results):
        assert len(r.tokens) == 14 and r.finish_reason == "length"
        assert all(isinstance(t, int) for t in r.tokens)
        full = _full_logits(model, p + r.tokens, case.mode)[len(p) - 1 : len(p) - 1 + len(r.tokens)]
        torch.testing.assert_close(r.logits, full, atol=2e-5, rtol=1e-5)
        assert full.argmax(-1).tolist() == r.tokens
        want_lp = torch.log_softmax(full, -1).gather(1, torch.tensor(r.tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(r.logprobs), want_lp, atol=2e-5, rtol=1e-5)


def test_batch_gives_each_prompt_what_it_gets_alone():
    model = _model()
    batch = model.generate(PROMPTS, 12)
    for p, r in zip(PROMPTS, batch):
        alone = model.generate([p], 12)[0]
        assert alone.tokens == r.tokens
        torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(r.logprobs), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not glm5.HAS_EXT, reason="glm5 kernels not built")
def test_kernels_generate_what_the_references_generate():
    """The same greedy continuation on the compiled kernels (per-sequence top-k slices of the cache)."""
    model = _model()
    ref = model.generate(PROMPTS, 16, return_logits=True)
    with glm5.ops.use_impl("kernel"):
        ker = model.generate(PROMPTS, 16, return_logits=True)
        spec = model.generate(PROMPTS, 16, speculative=True)
    for a, b, s in zip(ref, ker, spec):
        assert a.tokens == b.tokens == s.tokens
        torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------


def test_cache_holds_576_latent_values_and_one_indexer_key_per_token_per_layer():
    cfg = preset("glm5-744b")
    with torch.device("meta"):
        model = GLM5ForCausalLM(cfg, init=False)
    cache = PackedKVCache.for_model(model, n_seqs=2, capacity=8)
    assert len(cache.kv) == 78 and cache.kv[0].shape == (16, 576)  # kv_lora_rank 512 + qk_rope_head_dim 64
    assert len(cache.idx_k) == 78 and cache.idx_k[0].shape == (16, 128)  # the indexer's single key head
    shared = PackedKVCache.for_model(GLM5ForCausalLM(tiny_config(indexer_types="FSF")), 1, 4)
    assert sorted(shared.idx_k) == [0, 2]  # no indexer keys for a layer that shares its top-k


def test_cache_ranges_rollback_and_per_sequence_topk():
    cfg = tiny_config()
    cache = PackedKVCache(cfg, 3, 10, layers=[0], indexer_layers=[0], dtype=torch.float32, device="cpu")
    positions, ks, ke = cache.begin([0, 2], [4, 2])
    assert positions.tolist() == [0, 1, 2, 3, 0, 1]
    assert ks.tolist() == [0, 0, 0, 0, 20, 20] and ke.tolist() == [1, 2, 3, 4, 21, 22]
    g = torch.Generator().manual_seed(0)
    kv, k = cache.update(0, torch.randn(6, 40, generator=g), torch.randn(6, 32, generator=g))
    assert kv.shape == (30, 40) and torch.equal(kv[20:22], cache.kv[0][20:22])
    positions, ks, ke = cache.begin([0, 2], [3, 1])  # sequence 0 grows to 7, sequence 2 to 3
    cache.update(0, torch.randn(4, 40, generator=g), torch.randn(4, 32, generator=g))
    q, w = torch.randn(4, 8, 32, generator=g), torch.randn(4, 8, generator=g)
    got = cache.indexer_topk(q, cache.idx_k[0], w, ks, ke, 5)
    want = glm5.ops.indexer_topk(q, cache.idx_k[0], w, ks, ke, 5)  # one call over the whole packed buffer
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-6)  # the einsum's shape changes the rounding
    assert (got[0][3] >= 20).sum() == 3 and (got[0][3] == -1).sum() == 2  # sequence 2 sees its own 3 keys
    cache.truncate(0, 5)
    assert cache.begin([0], [1])[0].tolist() == [5]
    with pytest.raises(ValueError, match="capacity"):
        cache.begin([1], [11])
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(2, 9)


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------


def _kept_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """[B, V] log-probabilities of the truncated, renormalised sampling distribution (-inf: not kept)."""
    p = torch.softmax(logits.double() / temperature, dim=-1)
    sp, order = p.sort(dim=-1, descending=True, stable=True)
    keep_sorted = (sp.cumsum(-1) - sp) < top_p
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    q = torch.where(keep, p, torch.zeros_like(p))
    return (q / q.sum(-1, keepdim=True)).log()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (0.5, 0.05)])
def test_sample_draws_from_the_stated_distribution(temperature, top_p):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 6, generator=g) * 2
    n = 6000
    gens = make_generators(n, 123)
    tok, lp = sample(logits.expand(n, 6), temperature, top_p, gens)
    want = _kept_logprobs(logits, temperature, top_p)[0]
    torch.testing.assert_close(lp.double(), want[tok], atol=1e-5, rtol=1e-5)  # logprob of the drawn token, exactly
    assert torch.isfinite(want[tok]).all()  # never a token outside the top-p set
    freq = torch.bincount(tok, minlength=6).double() / n
    assert (freq - want.exp()).abs().max() < 4 * (0.25 / n) ** 0.5, (freq, want.exp())


def test_greedy_sample_is_argmax_with_log_softmax():
    logits = torch.tensor([[0.0, 2.0, 2.0, -1.0], [5.0, 1.0, 0.0, 0.0]])
    tok, lp = sample(logits, 0.0, 0.3)
    assert tok.tolist() == [1, 0]  # ties: the first index
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])


def test_generate_logprobs_are_those_of_the_truncated_distribution():
    model = _model()
    res = model.generate(PROMPTS[:2], 10, temperature=0.8, top_p=0.7, seed=5, return_logits=True)
    for r in res:
        want = _kept_logprobs(r.logits, 0.8, 0.7).gather(1, torch.tensor(r.tokens)[:, None])[:, 0]
        assert torch.isfinite(want).all()
        torch.testing.assert_close(torch.tensor(r.logprobs, dtype=torch.float64), want, atol=1e-5, rtol=1e-5)


def test_seeds_reproduce_and_each_prompt_draws_its_own_stream():
    model = _model()
    kw = dict(temperature=1.0, top_p=0.95)
    a = model.generate(PROMPTS, 10, seed=7, **kw)
    b = model.generate(PROMPTS, 10, seed=7, **kw)
    assert [r.tokens for r in a] == [r.tokens for r in b] and [r.logprobs for r in a] == [r.logprobs for r in b]
    c = model.generate(PROMPTS, 10, seed=8, **kw)
    assert [r.tokens for r in a] != [r.tokens for r in c]
    # prompt b uses seed + b: alone with seed 7 + 1 it draws what it drew at index 1 of the batch
    assert model.generate([PROMPTS[1]], 10, seed=8, **kw)[0].tokens == a[1].tokens
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert model.generate(PROMPTS, 6, seed=g1, **kw)[2].tokens == model.generate(PROMPTS, 6, seed=g2, **kw)[2].tokens
    torch.manual_seed(11)
    d = model.generate(PROMPTS, 6, **kw)
    torch.manual_seed(11)
    assert model.generate(PROMPTS, 6, **kw)[0].tokens == d[0].tokens


def test_stop_token_ends_its_sequence_and_is_included():
    model = _model()
    free = model.generate(PROMPTS, 12)
    stop = free[0].tokens[4]
    first = free[0].tokens.index(stop)
    res = model.generate(PROMPTS, 12, stop=[stop, 10**6])
    assert res[0].tokens == free[0].tokens[: first + 1] and res[0].finish_reason == "stop"
    for f, r in zip(free[1:], res[1:]):
        cut = f.tokens.index(stop) + 1 if stop in f.tokens else len(f.tokens)
        assert r.tokens == f.tokens[:cut] and len(r.logprobs) == len(r.tokens)
        assert r.finish_reason == ("stop" if stop in f.tokens else "length")


def test_zero_new_tokens_and_bad_arguments():
    model = _model()
    assert [r.tokens for r in model.generate(PROMPTS, 0)] == [[]] * len(PROMPTS)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        model.generate([[1], []], 3)
    with pytest.raises(ValueError, match="vocab_size"):
        model.generate([[1, 128]], 3)
    with pytest.raises(TypeError, match="list of token-id lists"):
        model.generate([1, 2, 3], 3)
    with pytest.raises(ValueError, match="temperature"):
        model.generate([[1]], 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate([[1]], 3, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="greedy only"):
        model.generate([[1]], 3, temperature=1.0, speculative=True)
    with pytest.raises(ValueError, match="MTP block"):
        _model(num_nextn_predict_layers=0).generate([[1]], 3, speculative=True)
    with pytest.raises(TypeError, match="seed"):
        model.generate([[1]], 3, temperature=1.0, seed="7")


# ---------------------------------------------------------------------------------------------------
# MTP speculative decoding
# ---------------------------------------------------------------------------------------------------

SPEC_CASES = [
    Case("3-drafts", {"mtp_steps": 3}),
    Case("1-draft", {"mtp_steps": 1}),
    Case("index-share-mtp", {"mtp_steps": 3, "index_share_for_mtp_iteration": True}),
    Case("shared-indexer", {"mtp_steps": 2, "indexer_types": "FSF"}),
    # a 3-token vocabulary: drafts often agree with the main model, so steps accept 0..3 drafts
    Case("vocab-3", {"mtp_steps": 3, "vocab_size": 3}, seed=2),
]


def _prompts(cfg_kw: dict) -> list[list[int]]:
    V = cfg_kw.get("vocab_size", 128)
    return [[t % V for t in p] for p in PROMPTS]


@pytest.mark.parametrize("case", SPEC_CASES, ids=str)
def test_speculative_gives_the_greedy_tokens(case):
    model = _model(case.seed, **case.cfg)
    prompts = _prompts(case.cfg)
    greedy = model.generate(prompts, 16, return_logits=True)
    spec = model.generate(prompts, 16, speculative=True, return_logits=True)
    n_draft = case.cfg["mtp_steps"]
    for g, s in zip(greedy, spec):
        assert s.tokens == g.tokens and s.finish_reason == g.finish_reason
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(g.logprobs), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s.logits, g.logits, atol=2e-5, rtol=1e-5)
        assert all(1 <= a <= n_draft + 1 for a in s.accept_lengths) and all(len(d) == n_draft for d in s.drafts)
        assert 1 + sum(s.accept_lengths[:-1]) < len(s.tokens) <= 1 + sum(s.accept_lengths)
    acc = mean_accept_length(spec)
    assert acc is not None and 1 <= acc <= n_draft + 1
    if case.name == "vocab-3":
        assert max(a for r in spec for a in r.accept_lengths) == n_draft + 1 and acc > 1.5


@pytest.mark.parametrize("case", SPEC_CASES[::2], ids=str)
def test_drafts_are_the_training_time_mtp_recursion(case):
    """Every step's drafts equal argmax lm_head(h^k_{P-1}) of mtp.py's recursion run without a cache
    over [committed tokens, drafts]: the per-depth caches, their catch-up and their rollback are exact."""
    model = _model(case.seed, **case.cfg)
    prompts = _prompts(case.cfg)[:2]
    share = model.config.index_share_for_mtp_iteration
    for p, r in zip(prompts, model.generate(prompts, 16, speculative=True)):
        emitted = 1
        for acc, drafts in zip(r.accept_lengths, r.drafts):
            y = p + r.tokens[:emitted] + drafts[:-1]
            P = len(p) + emitted - 1  # x_P (the last emitted token) is not yet processed by the main model
            with torch.no_grad():
                h = model(torch.tensor([y])).hidden_states[0]
                positions, ks, ke = pack_ranges(1, len(y), h.device)
                cos, sin = model.rope(positions)
                topk, want = None, []
                for k in range(1, len(drafts) + 1):
                    tok = torch.tensor([y[t + k] if t + k < len(y) else 0 for t in range(len(y))])
                    h, first, _ = model.mtp.step(h, model.model.embed_tokens(tok), cos, sin, ks, ke,
                                                 prev_topk_TK=topk if share else None)
                    topk = topk if topk is not None else first
                    want.append(int(model.lm_head(h[P - 1]).argmax()))
            assert drafts == want, (emitted, drafts, want)
            emitted += acc


def test_speculative_with_stop_and_length_cuts():
    model = _model(2, mtp_steps=3, vocab_size=3)
    prompts = _prompts({"vocab_size": 3})
    for n in (1, 2, 7):
        for stop in (None, [2]):
            g = model.generate(prompts, n, stop=stop)
            s = model.generate(prompts, n, stop=stop, speculative=True)
            assert [r.tokens for r in s] == [r.tokens for r in g]
            assert [r.finish_reason for r in s] == [r.finish_reason for r in g]


def test_result_accept_length():
    r = GenerationResult([1, 2, 3, 4], [0.0] * 4, accept_lengths=[1, 3])
    assert r.mean_accept_length == 2.0 and GenerationResult([], []).mean_accept_length is None
    assert mean_accept_length([r, GenerationResult([5], [0.0], accept_lengths=[4])]) == pytest.approx(8 / 3)


# ---------------------------------------------------------------------------------------------------
# glm5 generate
# ---------------------------------------------------------------------------------------------------


def test_cli_generate_from_a_preset_and_from_a_checkpoint_with_a_tokenizer(tmp_path, capsys):
    from glm5.cli import main
    from glm5.train.tokenizer import train_bpe

    assert main(["generate", "--preset", "debug", "--prompt-ids", "1,2,3", "--max-new-tokens", "3",
                 "--seed", "0", "--json", "--no-progress", "--stop-ids", "none"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(out) == 1 and len(out[0]["tokens"]) == 3 and len(out[0]["logprobs"]) == 3

    model = _model(vocab_size=300, mtp_steps=2)
    model.save_pretrained(tmp_path)
    tok = train_bpe(["def f(x):\n    return x + 1\n"] * 50, vocab_size=280)
    tok.save(tmp_path / "tokenizer.json")
    prompt_ids = tok.encode("def f(x):")
    want = model.generate([prompt_ids], 5)[0].tokens
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "def f(x):", "--max-new-tokens", "5",
                 "--stop-ids", "none", "--speculative", "--no-progress", "--json"]) == 0
    cap = capsys.readouterr()
    got = json.loads(cap.out.splitlines()[0])
    assert got["tokens"] == want and got["text"] == tok.decode(want) and got["mean_accept_length"] >= 1
    assert "mean accept length" in cap.err
    # a glm5 training run folder (train.checkpoint format; config.json names the model under "model")
    from glm5.train.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "run" / "checkpoints", 3, model=model, config={"model": model.config.to_dict()})
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt-ids", "5,6,7", "--max-new-tokens", "4",
                 "--stop-ids", "none", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == model.generate([[5, 6, 7]], 4)[0].tokens
    with pytest.raises(SystemExit, match="tokenizer"):
        main(["generate", "--preset", "debug", "--prompt", "hello"])
