"""Fixtures for the training building blocks: a small slice of the stdlib corpus, tokenized once per session."""

from __future__ import annotations

import pytest

from glm5.train.data import tokenize_corpus
from glm5.train.sources import FileSource, stdlib_files, stdlib_root
from glm5.train.tokenizer import train_bpe


@pytest.fixture(scope="session")
def small_source():
    """~40 small stdlib modules (a few hundred KB): real code, tokenized in well under a second."""
    files = [f for f in stdlib_files() if 2_000 < f.stat().st_size < 12_000][:40]
    return FileSource(files, root=stdlib_root())


@pytest.fixture(scope="session")
def small_tokenizer(small_source):
    return train_bpe((t for _, t in small_source), vocab_size=512, max_chars=300_000)


@pytest.fixture(scope="session")
def small_corpus(small_source, small_tokenizer, tmp_path_factory):
    return tokenize_corpus(small_source, small_tokenizer, tmp_path_factory.mktemp("tokcache"))
