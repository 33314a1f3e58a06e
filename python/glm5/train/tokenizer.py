"""Byte-level BPE tokenizer: train one on the corpus with Hugging Face `tokenizers`, or load a tokenizer.json.

The trained tokenizer is GPT-2 style byte-level BPE (every byte is in the alphabet, so any text
round-trips exactly) with a few special tokens, `<|endoftext|>` first (id 0). It is saved as
`tokenizer.json` next to the run, and `Tokenizer.from_file` loads it back, or loads any other
`tokenizer.json`, such as the released GLM-5 one (its end-of-text token is `<|endoftext|>` too).

    tok = train_bpe(texts, vocab_size=4096)       # seconds on 2 cores for a few MB of text
    tok.save(run_dir / "tokenizer.json")
    ids = tok.encode("def f(x):\\n    return x\\n") ; tok.decode(ids)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# EOS first, so it gets id 0 in a trained tokenizer; the others are reserved for later stages (chat/FIM).
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, "<|user|>", "<|assistant|>", "<|system|>", "<|fim_prefix|>",
                  "<|fim_middle|>", "<|fim_suffix|>")


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the end-of-text id the packer needs.

    Attributes: vocab_size (int, includes special tokens), eos_id (int), pad_id (int, = eos_id when the
    tokenizer has no pad token), inner (the `tokenizers.Tokenizer`).
    """

    def __init__(self, inner, *, eos_token: str = EOS_TOKEN, pad_token: str = PAD_TOKEN):
        self.inner = inner
        eos_id = inner.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"tokenizer has no end-of-text token {eos_token!r}; pass eos_token=<its name>")
        self.eos_token = eos_token
        self.eos_id = int(eos_id)
        pad_id = inner.token_to_id(pad_token)
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)
        self.vocab_size = int(inner.get_vocab_size(with_added_tokens=True))

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, eos_token: str = EOS_TOKEN) -> Tokenizer:
        """Load a tokenizer.json (ours, or e.g. the released GLM-5 one)."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        return cls(HFTokenizer.from_file(str(path)), eos_token=eos_token)

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; nothing is added (the packer appends EOS itself). Special-token strings
        in the text (a literal "<|endoftext|>") are encoded as plain text unless allow_special=True."""
        self.inner.encode_special_tokens = not allow_special
        return self.inner.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], *, allow_special: bool = False) -> list[list[int]]:
        """`encode` over a list, in parallel inside `tokenizers`."""
        self.inner.encode_special_tokens = not allow_special
        return [e.ids for e in self.inner.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.inner.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(self.inner.to_str(), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def fingerprint(self) -> str:
        """sha256 of the serialized tokenizer: keys the token cache (same tokenizer -> same ids)."""
        return hashlib.sha256(self.inner.to_str().encode("utf-8")).hexdigest()

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}:{self.eos_id})"


def _bounded(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Yield texts until about `max_chars` characters were given (the last one is cut to fit)."""
    left = max_chars
    for t in texts:
        if left <= 0:
            return
        yield t[:left]
        left -= len(t)


def train_bpe(
    texts: Iterable[str],
    *,
    vocab_size: int = 4096,
    max_chars: int = 2_000_000,
    min_frequency: int = 2,
    special_tokens: tuple[str, ...] = SPECIAL_TOKENS,
) -> Tokenizer:
    """Train a byte-level BPE on at most `max_chars` characters of `texts` (a bounded sample keeps it
    to seconds on 2 cores). Deterministic for the same texts. `special_tokens[0]` is the end-of-text token.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size={vocab_size} must be at least 256 bytes + {len(special_tokens)} special tokens")
    inner = HFTokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    inner.train_from_iterator(_bounded(texts, max_chars), trainer=trainer)
    return Tokenizer(inner, eos_token=special_tokens[0])


def load_or_train(
    path: str | os.PathLike, texts: Iterable[str] | None = None, *, vocab_size: int = 4096, max_chars: int = 2_000_000
) -> Tokenizer:
    """Load `path` (a tokenizer.json, or a folder holding one) if it exists, else train on `texts` and save there."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() or not path.suffix else path
    if file.is_file():
        return Tokenizer.from_file(file)
    if texts is None:
        raise FileNotFoundError(f"no tokenizer at {file} and no texts to train one on")
    tok = train_bpe(texts, vocab_size=vocab_size, max_chars=max_chars)
    tok.save(file)
    return tok
