"""Token data for pretraining: tokenize + cache a corpus, split it, pack it, and serve resumable batches.

    source = open_source("stdlib")                              # sources.py
    corpus = tokenize_corpus(source, tok, cache_dir)            # cached memmap, keyed by tokenizer + files
    train_ids, val_ids = split_documents(corpus.names, val_fraction=0.02)
    train = PackedLoader(corpus, train_ids, seq_len=256, batch_size=8, shuffle=True, seed=0)
    val = PackedLoader(corpus, val_ids, seq_len=256, batch_size=8, shuffle=False)
    b = train.next_batch()          # Batch: input_ids/targets [B, L] int64, doc_start [B, L] int32
    ks, ke = b.ks_ke()              # [B*L] int32 each: query t sees keys ks[t] <= s < ke[t]
    state = train.state_dict()      # {"epoch", "position", "seed", ...}: a resumed loader repeats nothing

Packing: every document is stored followed by one EOS. In each epoch the training documents are
concatenated in a seeded random order (the validation documents in a fixed order) into one stream, which is
cut into windows of L+1 tokens with stride L: inputs = window[:-1], targets = window[1:], so every stream
token is an input exactly once; the tail shorter than a window is dropped. A document longer than the
rest of a window continues in the next one. doc_start[b, t] is the first position, within row b, of the
document that holds input t (0 for a document continued from the previous window), so attention over the
packed layout uses ks[t] = doc_start[t] and ke[t] = t + 1 (offset by b*L for row b) and documents never
attend to each other. The target of an EOS is the next document's first token; that is allowed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("GLM5_CACHE_DIR", Path.home() / ".cache" / "glm5")) / "tokens"


# --------------------------------------------------------------------------------------------------
# Tokenized, cached corpus


class TokenizedCorpus:
    """All documents of a source as token ids (each ending with EOS), memory-mapped from the cache.

    Attributes: tokens [N] uint16/uint32 (memmap), offsets [n_docs+1] int64 (document i is
    tokens[offsets[i]:offsets[i+1]]), names (list[str]), eos_id, vocab_size, path (the cache folder).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            meta = json.loads((self.path / "meta.json").read_text())
            self.offsets = np.load(self.path / "offsets.npy")
            self.names = json.loads((self.path / "names.json").read_text())
            n = int(meta["n_tokens"])
            self.tokens = np.memmap(self.path / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r", shape=(n,))
        except (OSError, ValueError, KeyError) as e:
            raise RuntimeError(f"token cache {self.path} is unreadable ({e}); delete it to rebuild") from e
        if self.offsets[-1] != n or len(self.names) != len(self.offsets) - 1:
            raise RuntimeError(f"token cache {self.path} is inconsistent; delete it to rebuild")
        self.eos_id = int(meta["eos_id"])
        self.vocab_size = int(meta["vocab_size"])
        self.key = meta["key"]

    @property
    def num_docs(self) -> int:
        return len(self.names)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def doc_lengths(self, doc_ids: np.ndarray | None = None) -> np.ndarray:
        lengths = np.diff(self.offsets)
        return lengths if doc_ids is None else lengths[doc_ids]

    def document(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1]])

    def __repr__(self) -> str:
        return f"TokenizedCorpus({self.num_docs} docs, {self.num_tokens} tokens, {self.path})"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tokenize_corpus(source, tokenizer, cache_dir: str | os.PathLike | None = None, *,
                    max_docs: int | None = None, batch_docs: int = 256) -> TokenizedCorpus:
    """Tokenize every document of `source` (skipping blank ones), append EOS to each, and cache the result.

    The cache folder is `cache_dir/<key>`, key = sha256(tokenizer, source fingerprint, max_docs), written
    into a temporary folder beside it and renamed into place, so a crash never leaves a half cache.
    Tokens are uint16 when the vocabulary fits, else uint32. Returns the memory-mapped corpus.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(
        json.dumps({"v": CACHE_VERSION, "tok": tokenizer.fingerprint(), "src": source.fingerprint(),
                    "max_docs": max_docs}).encode()
    ).hexdigest()[:32]
    final = cache_dir / key
    if (final / "meta.json").is_file():
        return TokenizedCorpus(final)
    cache_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache_dir))
    try:
        names: list[str] = []
        offsets = [0]
        with open(tmp / "tokens.bin", "wb") as fh:
            pending: list[tuple[str, str]] = []

            def flush():
                for (name, _), ids in zip(pending, tokenizer.encode_batch([t for _, t in pending])):
                    arr = np.asarray([*ids, tokenizer.eos_id], dtype=dtype)
                    fh.write(arr.tobytes())
                    names.append(name)
                    offsets.append(offsets[-1] + len(arr))
                pending.clear()

            for name, text in source:
                if max_docs is not None and len(names) + len(pending) >= max_docs:
                    break
                if text.strip():
                    pending.append((name, text))
                if len(pending) >= batch_docs:
                    flush()
            flush()
            fh.flush()
            os.fsync(fh.fileno())
        if not names:
            raise ValueError(f"{source!r} has no non-empty documents")
        np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        (tmp / "names.json").write_text(json.dumps(names))
        meta = {"key": key, "dtype": np.dtype(dtype).name, "n_tokens": offsets[-1], "n_docs": len(names),
                "eos_id": tokenizer.eos_id, "vocab_size": tokenizer.vocab_size, "source": repr(source)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _fsync_dir(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process built the same cache first: use theirs
            if not (final / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(cache_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenizedCorpus(final)


# --------------------------------------------------------------------------------------------------
# Split


def _unit_hash(seed: int, name: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "little") / 2**64


def is_validation(name: str, val_fraction: float, seed: int = 0) -> bool:
    """Whether a document name falls in the held-out split (stable: depends only on the name and seed)."""
    return _unit_hash(seed, name) < val_fraction


def split_documents(names: Sequence[str], *, val_fraction: float = 0.02, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split document indices into (train_ids, val_ids), int64 and sorted, by a hash of each name.

    Adding or removing other documents does not move a document between splits. With val_fraction > 0
    and at least two documents, both splits are non-empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    u = np.array([_unit_hash(seed, n) for n in names], dtype=np.float64)
    is_val = u < val_fraction
    if val_fraction > 0 and len(names) >= 2:
        if not is_val.any():
            is_val[np.argmin(u)] = True
        if is_val.all():
            is_val[np.argmax(u)] = False
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Packing and loading


def make_ks_ke(doc_start: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Visible key ranges of B packed rows laid out as T = B*L tokens.

    Args:
        doc_start: [B, L] int, first position in its row of the document holding each token.
    Returns:
        ks, ke: [B*L] int32; token t = b*L + i sees keys ks[t] = b*L + doc_start[b, i] <= s < ke[t] = t + 1.
    """
    ds = torch.as_tensor(doc_start)
    B, L = ds.shape
    base = (torch.arange(B, device=ds.device, dtype=torch.int32) * L)[:, None]
    ks = (ds.to(torch.int32) + base).reshape(-1)
    ke = (torch.arange(L, device=ds.device, dtype=torch.int32)[None, :] + base + 1).reshape(-1)
    return ks, ke


@dataclass
class Batch:
    """B packed sequences of length L. input_ids, targets: [B, L] int64; doc_start: [B, L] int32."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    doc_start: torch.Tensor

    def ks_ke(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[B*L] int32 key ranges for attention over the flattened batch (see make_ks_ke)."""
        return make_ks_ke(self.doc_start)

    def position_ids(self) -> torch.Tensor:
        """[B, L] int64 position of each token within its document (RoPE may use these or plain 0..L-1)."""
        return torch.arange(self.input_ids.shape[1], dtype=torch.int64)[None, :] - self.doc_start.long()

    def to(self, device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.targets, self.doc_start)))

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


class PackedLoader:
    """Deterministic, resumable batches of packed sequences from a subset of a corpus' documents.

    Args:
        corpus: a TokenizedCorpus.
        doc_ids: [n] int, which documents (e.g. the train or validation split).
        seq_len: L, tokens per row (each row reads L+1 tokens for its targets).
        batch_size: B, rows per batch on this rank.
        shuffle: permute the document order each epoch with (seed, epoch); False keeps `doc_ids` order.
        seed: shuffle seed (part of the state).
        rank, world_size: data parallel: one step consumes world_size*B rows of the epoch; rank r takes
            rows [position + r*B, position + (r+1)*B). The state is the same on every rank.

    The state is {"epoch", "position" (next row of the epoch), "seed"} plus the geometry it is valid for.
    An epoch ends when fewer than world_size*B rows are left; the next one starts with a new order.
    """

    def __init__(self, corpus: TokenizedCorpus, doc_ids: np.ndarray | Sequence[int], *, seq_len: int, batch_size: int,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        if seq_len < 1 or batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad loader geometry: seq_len={seq_len} batch_size={batch_size} rank={rank}/{world_size}")
        self.corpus = corpus
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.seq_len, self.batch_size, self.shuffle = seq_len, batch_size, shuffle
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch, self.position = seed, 0, 0
        self.num_tokens = int(corpus.doc_lengths(self.doc_ids).sum())
        self.sequences_per_epoch = max(self.num_tokens - 1, 0) // seq_len
        self.batches_per_epoch = self.sequences_per_epoch // (batch_size * world_size)
        if self.batches_per_epoch < 1:
            raise ValueError(f"{len(self.doc_ids)} documents with {self.num_tokens} tokens give {self.sequences_per_epoch} "
                             f"sequences of {seq_len}+1 tokens: fewer than one batch of {batch_size}x{world_size}")
        self._layout_epoch: int | None = None

    # -- the stream of one epoch
    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, cum): document order of the epoch and the stream start of each ([n+1] int64)."""
        if self._layout_epoch != epoch:
            order = self.doc_ids
            if self.shuffle:
                order = order[np.random.default_rng([self.seed, epoch]).permutation(len(order))]
            self._order = order
            self._cum = np.concatenate([[0], np.cumsum(self.corpus.doc_lengths(order))])
            self._layout_epoch = epoch
        return self._order, self._cum

    def sequence(self, epoch: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Row i of `epoch`: (window [L+1] int64, doc_start [L] int32)."""
        if not 0 <= i < self.sequences_per_epoch:
            raise IndexError(f"row {i} out of range [0, {self.sequences_per_epoch})")
        order, cum = self._layout(epoch)
        a, L = i * self.seq_len, self.seq_len
        p = a + np.arange(L + 1)
        d = np.searchsorted(cum, p, side="right") - 1
        window = self.corpus.tokens[self.corpus.offsets[order[d]] + (p - cum[d])].astype(np.int64)
        doc_start = np.maximum(cum[d[:L]] - a, 0).astype(np.int32)
        return window, doc_start

    def _batch(self, epoch: int, first_row: int) -> Batch:
        rows = [self.sequence(epoch, first_row + j) for j in range(self.batch_size)]
        windows = torch.from_numpy(np.stack([w for w, _ in rows]))
        doc_start = torch.from_numpy(np.stack([s for _, s in rows]))
        return Batch(windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), doc_start)

    # -- iteration
    def next_batch(self) -> Batch:
        """This rank's batch at the current state, then advance the state by one step."""
        step_rows = self.batch_size * self.world_size
        if self.position + step_rows > self.sequences_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self._batch(self.epoch, self.position + self.rank * self.batch_size)
        self.position += step_rows
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def epoch_batches(self, epoch: int = 0, max_batches: int | None = None) -> Iterator[Batch]:
        """This rank's batches of one whole epoch, without touching the state (e.g. for validation)."""
        n = self.batches_per_epoch if max_batches is None else min(max_batches, self.batches_per_epoch)
        step_rows = self.batch_size * self.world_size
        for k in range(n):
            yield self._batch(epoch, k * step_rows + self.rank * self.batch_size)

    # -- state
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "world_size": self.world_size, "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seq_len", "batch_size", "world_size", "num_tokens"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"loader state was saved with {k}={state[k]} but this loader has {k}={getattr(self, k)}")
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self._layout_epoch = None

    def __repr__(self) -> str:
        return (f"PackedLoader({len(self.doc_ids)} docs, {self.num_tokens} tokens, L={self.seq_len}, B={self.batch_size}, "
                f"{self.batches_per_epoch} batches/epoch, epoch={self.epoch}, position={self.position})")


# --------------------------------------------------------------------------------------------------
# Everything the training loop needs, from one config


@dataclass(kw_only=True, slots=True)
class DataConfig:
    source: str = "stdlib"  # "stdlib" | "hf:NAME[:CONFIG][@SPLIT]" | path(s), comma-separated
    text_field: str = "text"  # JSONL key / parquet column / HF column
    tokenizer: str | None = None  # an existing tokenizer.json; None: train a byte-level BPE on the corpus
    vocab_size: int = 4096
    tokenizer_max_chars: int = 2_000_000  # bounded training sample: ~2 s on 2 cores
    seq_len: int = 256
    batch_size: int = 8  # rows per rank per micro-batch
    val_fraction: float = 0.02  # of documents, by a hash of their names
    split_seed: int = 0
    shuffle_seed: int = 0
    max_docs: int | None = None  # use only the first N documents (tests, quick runs)
    cache_dir: str | None = None  # default $GLM5_CACHE_DIR/tokens or ~/.cache/glm5/tokens


@dataclass
class Data:
    tokenizer: object  # glm5.train.tokenizer.Tokenizer
    corpus: TokenizedCorpus
    train: PackedLoader
    val: PackedLoader


def tokenizer_sample(source, *, max_chars: int, val_fraction: float, split_seed: int = 0,
                     max_docs: int | None = None) -> Iterator[str]:
    """Texts to train the tokenizer on: training documents only, a name-hashed subset of about max_chars
    characters when the source's size is known (files), else the first ones."""
    files = getattr(source, "files", None)
    total = sum(f.stat().st_size for f in files) if files and max_docs is None else 0
    keep = min(1.0, 1.25 * max_chars / total) if total else 1.0
    for k, (name, text) in enumerate(source):
        if max_docs is not None and k >= max_docs:
            return
        if not is_validation(name, val_fraction, split_seed) and _unit_hash(split_seed + 1, name) < keep:
            yield text


def build_data(cfg: DataConfig, run_dir: str | os.PathLike | None = None, *, rank: int = 0, world_size: int = 1,
               source=None) -> Data:
    """Tokenizer + cached corpus + train/validation loaders for `cfg`.

    The tokenizer is, in order: run_dir/tokenizer.json if present (a resumed run keeps its own),
    cfg.tokenizer if set, else a BPE trained on the training documents (cached by source and settings).
    It is saved to run_dir/tokenizer.json. `source` overrides cfg.source with a ready source object.
    """
    from .sources import open_source
    from .tokenizer import Tokenizer, train_bpe

    source = source if source is not None else open_source(cfg.source, text_field=cfg.text_field)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir is not None else default_cache_dir()
    run_tok = Path(run_dir) / "tokenizer.json" if run_dir is not None else None
    if run_tok is not None and run_tok.is_file():
        tok = Tokenizer.from_file(run_tok)
    elif cfg.tokenizer is not None:
        tok = Tokenizer.from_file(cfg.tokenizer)
    else:
        key = hashlib.sha256(json.dumps([source.fingerprint(), cfg.vocab_size, cfg.tokenizer_max_chars, cfg.val_fraction,
                                         cfg.split_seed, cfg.max_docs]).encode()).hexdigest()[:32]
        cached = cache_dir.parent / "tokenizers" / f"{key}.json"
        if cached.is_file():
            tok = Tokenizer.from_file(cached)
        else:
            texts = tokenizer_sample(source, max_chars=cfg.tokenizer_max_chars, val_fraction=cfg.val_fraction,
                                     split_seed=cfg.split_seed, max_docs=cfg.max_docs)
            tok = train_bpe(texts, vocab_size=cfg.vocab_size, max_chars=cfg.tokenizer_max_chars)
            tok.save(cached)
    if run_tok is not None and not run_tok.is_file():
        tok.save(run_tok)
    corpus = tokenize_corpus(source, tok, cache_dir, max_docs=cfg.max_docs)
    train_ids, val_ids = split_documents(corpus.names, val_fraction=cfg.val_fraction, seed=cfg.split_seed)
    common = dict(seq_len=cfg.seq_len, batch_size=cfg.batch_size, rank=rank, world_size=world_size)
    train = PackedLoader(corpus, train_ids, shuffle=True, seed=cfg.shuffle_seed, **common)
    val = PackedLoader(corpus, val_ids, shuffle=False, **common)
    return Data(tokenizer=tok, corpus=corpus, train=train, val=val)
