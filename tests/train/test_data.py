"""Sources, tokenizer, token cache, validation split, packing (ks/ke boundaries) and the resumable loader."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from glm5.ops import reference
from glm5.train.data import (
    DataConfig,
    PackedLoader,
    build_data,
    make_ks_ke,
    split_documents,
    tokenize_corpus,
)
from glm5.train.sources import FileSource, open_source, stdlib_files
from glm5.train.tokenizer import EOS_TOKEN, Tokenizer, train_bpe

# --------------------------------------------------------------------------------------------------
# Sources


def test_stdlib_files_sorted_and_filtered():
    files = stdlib_files()
    assert len(files) > 100 and files == sorted(files) and files == stdlib_files()
    assert all(f.suffix == ".py" for f in files)
    bad = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    assert not [f for f in files if bad & set(f.parts)]


def test_file_source_text_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"content": "first"}) + "\n\n" + json.dumps({"content": "second"}) + "\n")
    (tmp_path / "c.bin").write_bytes(b"\x00\xff\xfe binary")  # skipped: not UTF-8 text
    (tmp_path / ".hidden").write_text("never read")
    src = FileSource([tmp_path], text_field="content")
    assert list(src) == [("a.txt", "hello world\n"), ("sub/b.jsonl:1", "first"), ("sub/b.jsonl:3", "second")]
    fp = src.fingerprint()
    (tmp_path / "a.txt").write_text("hello world, changed\n")
    assert FileSource([tmp_path], text_field="content").fingerprint() != fp


def test_jsonl_missing_field_names_it(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": "t"}) + "\n")
    with pytest.raises(KeyError, match="body"):
        list(FileSource([tmp_path / "x.jsonl"], text_field="body"))


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["row zero", None, "row two"], "id": [0, 1, 2]}), tmp_path / "d.parquet")
    assert list(open_source(str(tmp_path / "d.parquet"))) == [("d.parquet:0", "row zero"), ("d.parquet:2", "row two")]
    with pytest.raises(KeyError, match="body"):
        list(FileSource([tmp_path / "d.parquet"], text_field="body"))


def test_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        open_source(str(tmp_path / "nope"))


def test_optional_extras_not_imported():
    code = ("import sys, glm5.train.data, glm5.train.sources, glm5.train.optim, glm5.train.checkpoint, "
            "glm5.train.metrics, glm5.train.schedule, glm5.train.tokenizer; "
            "print([m for m in ('datasets', 'pyarrow', 'tensorboard', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trip(small_tokenizer, small_source):
    tok = small_tokenizer
    assert tok.vocab_size == 512 and tok.eos_id == 0 and tok.inner.id_to_token(0) == EOS_TOKEN
    for _, text in list(small_source)[:5]:
        assert tok.decode(tok.encode(text)) == text
    odd = "naïve — 日本語 🙂 \t\r\n\x01 <|endoftext|>"
    ids = tok.encode(odd)
    assert tok.eos_id not in ids, "a literal special-token string in data must not become EOS"
    assert tok.decode(ids) == odd
    assert tok.encode(EOS_TOKEN, allow_special=True) == [tok.eos_id]


def test_tokenizer_save_load_and_deterministic(small_tokenizer, small_source, tmp_path):
    path = small_tokenizer.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.from_file(tmp_path)
    text = list(small_source)[0][1]
    assert loaded.encode(text) == small_tokenizer.encode(text)
    assert loaded.fingerprint() == small_tokenizer.fingerprint()
    again = train_bpe((t for _, t in small_source), vocab_size=512, max_chars=300_000)
    assert again.fingerprint() == small_tokenizer.fingerprint()
    with pytest.raises(ValueError, match="eos_token"):
        Tokenizer.from_file(path, eos_token="<|nope|>")


# --------------------------------------------------------------------------------------------------
# Token cache


def test_corpus_documents_end_with_eos(small_corpus, small_tokenizer, small_source):
    docs = list(small_source)
    assert small_corpus.num_docs == len(docs)
    assert small_corpus.tokens.dtype == np.uint16
    for i in (0, 7, len(docs) - 1):
        d = small_corpus.document(i)
        assert d[-1] == small_tokenizer.eos_id and (d[:-1] != small_tokenizer.eos_id).all()
        assert small_tokenizer.decode(d[:-1]) == docs[i][1] and small_corpus.names[i] == docs[i][0]


def test_cache_hit_does_not_retokenize(small_corpus, small_source, small_tokenizer, monkeypatch):
    monkeypatch.setattr(small_tokenizer, "encode_batch", lambda *a, **k: pytest.fail("re-tokenized"))
    again = tokenize_corpus(small_source, small_tokenizer, small_corpus.path.parent)
    assert again.path == small_corpus.path


def test_cache_build_crash_leaves_nothing(small_source, small_tokenizer, tmp_path, monkeypatch):
    calls = []

    def boom(texts, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("killed")
        return [small_tokenizer.encode(t) for t in texts]

    monkeypatch.setattr(small_tokenizer, "encode_batch", boom)
    with pytest.raises(RuntimeError, match="killed"):
        tokenize_corpus(small_source, small_tokenizer, tmp_path, batch_docs=4)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Split


def test_split_disjoint_fixed_and_stable():
    names = [f"mod{i}.py" for i in range(200)]
    tr, va = split_documents(names, val_fraction=0.1, seed=3)
    assert len(set(tr) & set(va)) == 0 and sorted([*tr, *va]) == list(range(200))
    assert 5 <= len(va) <= 40
    tr2, va2 = split_documents(names, val_fraction=0.1, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    # adding documents does not move the old ones between splits
    names2 = names + [f"new{i}.py" for i in range(50)]
    _, va3 = split_documents(names2, val_fraction=0.1, seed=3)
    assert {names[i] for i in va} == {names2[j] for j in va3} & set(names)
    # tiny corpora still get both splits
    tr4, va4 = split_documents(["a", "b"], val_fraction=0.01)
    assert len(tr4) == 1 and len(va4) == 1


# --------------------------------------------------------------------------------------------------
# Packing


def test_make_ks_ke_small_example():
    ks, ke = make_ks_ke(torch.tensor([[0, 0, 2, 2], [0, 1, 1, 1]]))
    assert ks.dtype == ke.dtype == torch.int32
    assert ks.tolist() == [0, 0, 2, 2, 4, 5, 5, 5] and ke.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]


def _epoch_stream(corpus, doc_ids, seed, epoch):
    """The specification of an epoch's stream: the documents in the seeded order, concatenated."""
    order = np.asarray(doc_ids)[np.random.default_rng([seed, epoch]).permutation(len(doc_ids))]
    doc_of = np.concatenate([np.full(corpus.doc_lengths()[i], i) for i in order])
    return np.concatenate([corpus.document(i) for i in order]).astype(np.int64), doc_of, order


@pytest.mark.parametrize("seq_len", [17, 64, 500])  # shorter and longer than most documents
def test_packing_conserves_tokens_and_respects_documents(small_corpus, seq_len):
    ids = np.arange(small_corpus.num_docs)
    ld = PackedLoader(small_corpus, ids, seq_len=seq_len, batch_size=3, seed=5)
    stream, doc_of, order = _epoch_stream(small_corpus, ids, 5, 0)
    assert sorted(order) == list(ids)  # every document once per epoch
    batches = list(ld.epoch_batches(0))
    inputs = torch.cat([b.input_ids.reshape(-1) for b in batches]).numpy()
    targets = torch.cat([b.targets.reshape(-1) for b in batches]).numpy()
    n = len(inputs)
    assert n == ld.batches_per_epoch * 3 * seq_len
    assert np.array_equal(inputs, stream[:n]) and np.array_equal(targets, stream[1:n + 1])
    eos = small_corpus.eos_id
    T = 0
    for k, b in enumerate(batches):
        B, L = b.input_ids.shape
        ks, ke = b.ks_ke()
        reference.check_ranges(ks, ke, B * L, B * L)
        t = torch.arange(B * L)
        pos = T + t.numpy()  # stream position of each flattened token
        assert (ke.long() == t + 1).all()
        # ks[t] is in the same document as t, and the key just before it (same row) is not
        row_start = (t // L) * L
        assert np.array_equal(doc_of[T + (ks.long() - 0).numpy()], doc_of[pos])
        before = ks.long() - 1
        inner = (before >= row_start).numpy()
        assert (doc_of[T + before.numpy()[inner]] != doc_of[pos[inner]]).all()
        # a document that starts inside a row is preceded by EOS
        flat = b.input_ids.reshape(-1)
        assert (flat[before[torch.from_numpy(inner)]] == eos).all()
        if k < 2:  # the visible mask is exactly "same document, causal, same row"
            vis = reference.visible_mask(ks, ke, B * L)
            same = torch.from_numpy(doc_of[pos][:, None] == doc_of[pos][None, :]) & (t[:, None] // L == t[None, :] // L)
            assert torch.equal(vis, same & (t[None, :] <= t[:, None]))
        assert (b.position_ids() >= 0).all()
        T += B * L


def test_loader_resume_mid_epoch_and_across_epochs(small_corpus):
    ids = np.arange(small_corpus.num_docs)
    make = lambda: PackedLoader(small_corpus, ids, seq_len=64, batch_size=4, seed=11)  # noqa: E731
    a = make()
    n_epoch = a.batches_per_epoch
    ref = [a.next_batch() for _ in range(n_epoch + 5)]  # crosses into epoch 1
    for stop in (3, n_epoch - 1, n_epoch + 2):
        b = make()
        for _ in range(stop):
            b.next_batch()
        state = json.loads(json.dumps(b.state_dict()))  # small and JSON-able
        c = make()
        c.load_state_dict(state)
        for k in range(stop, n_epoch + 5):
            got = c.next_batch()
            assert torch.equal(got.input_ids, ref[k].input_ids) and torch.equal(got.doc_start, ref[k].doc_start)
    assert a.epoch == 1
    # epoch 1 uses a different order; another seed another order
    assert not torch.equal(ref[0].input_ids, ref[n_epoch].input_ids)
    assert not torch.equal(PackedLoader(small_corpus, ids, seq_len=64, batch_size=4, seed=12).next_batch().input_ids,
                           ref[0].input_ids)


def test_loader_state_checks_geometry(small_corpus):
    ids = np.arange(small_corpus.num_docs)
    state = PackedLoader(small_corpus, ids, seq_len=64, batch_size=4).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(small_corpus, ids, seq_len=32, batch_size=4).load_state_dict(state)


def test_loader_ranks_partition_the_global_batch(small_corpus):
    ids = np.arange(small_corpus.num_docs)
    whole = PackedLoader(small_corpus, ids, seq_len=32, batch_size=4, seed=1)
    ranks = [PackedLoader(small_corpus, ids, seq_len=32, batch_size=2, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(whole.batches_per_epoch + 2):
        w = whole.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(w.input_ids, torch.cat([p.input_ids for p in parts]))
    assert ranks[0].state_dict() == ranks[1].state_dict()


def test_validation_loader_fixed_and_stateless(small_corpus):
    tr, va = split_documents(small_corpus.names, val_fraction=0.2, seed=0)
    val = PackedLoader(small_corpus, va, seq_len=32, batch_size=2, shuffle=False)
    first = [b.input_ids for b in val.epoch_batches(0)]
    second = [b.input_ids for b in val.epoch_batches(0)]
    assert all(torch.equal(x, y) for x, y in zip(first, second)) and val.state_dict()["position"] == 0
    expect = np.concatenate([small_corpus.document(i) for i in va])[: 2 * 32]
    assert np.array_equal(first[0].reshape(-1).numpy(), expect)


def test_too_small_corpus_raises(small_corpus):
    with pytest.raises(ValueError, match="fewer than one batch"):
        PackedLoader(small_corpus, [0], seq_len=4096, batch_size=8)


def test_build_data_end_to_end(small_source, tmp_path, monkeypatch):
    cfg = DataConfig(vocab_size=300, tokenizer_max_chars=50_000, seq_len=32, batch_size=2, val_fraction=0.1,
                     cache_dir=str(tmp_path / "cache" / "tokens"))
    d = build_data(cfg, tmp_path / "run", source=small_source)
    assert (tmp_path / "run" / "tokenizer.json").is_file() and d.tokenizer.vocab_size == 300
    assert set(d.train.doc_ids).isdisjoint(d.val.doc_ids) and len(d.val.doc_ids) > 0
    # a resumed run loads its own tokenizer and the cached corpus: nothing is trained or tokenized
    import glm5.train.tokenizer as tok_mod

    monkeypatch.setattr(tok_mod, "train_bpe", lambda *a, **k: pytest.fail("retrained"))
    d2 = build_data(cfg, tmp_path / "run", source=small_source)
    assert d2.corpus.path == d.corpus.path
    assert torch.equal(d2.train.next_batch().input_ids, d.train.next_batch().input_ids)


def test_hf_source_with_a_stub_datasets_module(monkeypatch):
    """The HF path without a download: a stub `datasets` module with load_dataset."""
    import types

    class DS(list):
        column_names = ["text", "meta"]
        _fingerprint = "abc123"

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return DS([{"text": "alpha", "meta": 1}, {"text": None, "meta": 2}, {"text": "gamma", "meta": 3}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    src = open_source("hf:org/corpus:en@validation")
    assert calls == [("org/corpus", "en", "validation")]
    assert list(src) == [("validation:0", "alpha"), ("validation:2", "gamma")]
    assert src.fingerprint() == open_source("hf:org/corpus:en@validation").fingerprint()
    with pytest.raises(KeyError, match="body"):
        open_source("hf:org/corpus", text_field="body")


def test_tokenizer_sample_excludes_validation(small_source):
    from glm5.train.data import is_validation, tokenizer_sample

    texts = set(tokenizer_sample(small_source, max_chars=10**9, val_fraction=0.3))
    val = {t for n, t in small_source if is_validation(n, 0.3)}
    assert val and texts and not (texts & val)
