"""Document sources: where the training text comes from.

A source yields `(name, text)` documents in a fixed order and has a `fingerprint()` that changes when
its contents may have changed (it keys the token cache). Names are stable identifiers (a path relative
to the source root, `path:line` for JSONL, `path:row` for parquet) and decide the validation split.

- `StdlibSource()`: the embedded default corpus, the Python standard library's own `.py` files on this
  machine (sorted; test folders, site-packages and unreadable files skipped). No download needed.
- `FileSource(paths)`: plain text files or folders, `.jsonl` (one JSON object per line, text in
  `text_field`) and `.parquet` (the `text_field` column; needs pyarrow).
- `HFSource(name)`: a Hugging Face `datasets` dataset (optional extra; imported only when used).
- `open_source(spec)` parses "stdlib", "hf:NAME[:CONFIG][@SPLIT]" or a path (or several, comma-separated).
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


def _walk(root: Path, keep) -> list[Path]:
    """Files under `root` (sorted, deterministic) for which keep(path) holds; hidden and SKIP_DIRS folders skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and keep(Path(dirpath) / f))
    return sorted(out)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The standard library's .py files (sorted), without tests, site-packages and machine-generated
    `_sysconfigdata*` modules."""
    root = Path(root) if root is not None else stdlib_root()
    return _walk(root, lambda p: p.suffix == ".py" and not p.name.startswith("_sysconfigdata"))


def _read_text(path: Path) -> str | None:
    """UTF-8 text of a file, or None when it is unreadable or binary (undecodable or holding NUL bytes)."""
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return None if "\x00" in text else text


class FileSource:
    """Documents from files: each text file is one document, each JSONL line / parquet row is one.

    Args:
        paths: files and/or folders (folders are walked recursively, sorted).
        root: names are relative to it (default: the common folder of `paths`).
        text_field: the JSONL key / parquet column holding the text.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], *, root: str | os.PathLike | None = None,
                 text_field: str = "text"):
        files: list[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                files.extend(_walk(p, lambda f: True))
            elif p.is_file():
                files.append(p)
            else:
                raise FileNotFoundError(f"data path {p} does not exist")
        if not files:
            raise ValueError(f"no files found in {list(map(str, paths))}")
        self.files = files
        self.root = Path(root) if root is not None else Path(os.path.commonpath([f.parent for f in files]))
        self.text_field = text_field

    def _name(self, f: Path) -> str:
        try:
            return f.relative_to(self.root).as_posix()
        except ValueError:
            return f.as_posix()

    def fingerprint(self) -> str:
        """Hash of (name, size, mtime) of every file and the text field: like make, cheap for big data."""
        h = hashlib.sha256(f"files-v1\0{self.text_field}".encode())
        for f in self.files:
            st = f.stat()
            h.update(f"\0{self._name(f)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for f in self.files:
            name = self._name(f)
            if f.suffix in JSONL_SUFFIXES:
                yield from self._jsonl(f, name)
            elif f.suffix in PARQUET_SUFFIXES:
                yield from self._parquet(f, name)
            else:
                text = _read_text(f)
                if text is not None:
                    yield name, text

    def _jsonl(self, f: Path, name: str) -> Iterator[tuple[str, str]]:
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{lineno}: not valid JSON ({e})") from None
                if not isinstance(obj, dict) or self.text_field not in obj:
                    raise KeyError(f"{f}:{lineno}: no text field {self.text_field!r} (set text_field=...)")
                yield f"{name}:{lineno}", str(obj[self.text_field])

    def _parquet(self, f: Path, name: str) -> Iterator[tuple[str, str]]:
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError("reading parquet needs pyarrow: pip install 'glm5[data]'") from e
        pf = pq.ParquetFile(f)
        if self.text_field not in pf.schema_arrow.names:
            raise KeyError(f"{f}: no column {self.text_field!r} (columns: {pf.schema_arrow.names})")
        row = 0
        for batch in pf.iter_batches(columns=[self.text_field]):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield f"{name}:{row}", str(text)
                row += 1

    def __repr__(self) -> str:
        return f"FileSource({len(self.files)} files under {self.root})"


class StdlibSource(FileSource):
    """The embedded default corpus: the standard library's .py sources on this machine."""

    def __init__(self, root: str | os.PathLike | None = None, *, max_files: int | None = None):
        root = Path(root) if root is not None else stdlib_root()
        files = stdlib_files(root)
        super().__init__(files[:max_files] if max_files is not None else files, root=root)

    def __repr__(self) -> str:
        return f"StdlibSource({len(self.files)} files under {self.root})"


class HFSource:
    """A Hugging Face `datasets` dataset, imported only when used (pip install 'glm5[data]')."""

    def __init__(self, name: str, *, config: str | None = None, split: str = "train", text_field: str = "text"):
        try:
            import datasets
        except ImportError as e:
            raise ImportError("Hugging Face datasets are an optional extra: pip install 'glm5[data]'") from e
        self.name, self.config, self.split, self.text_field = name, config, split, text_field
        self.ds = datasets.load_dataset(name, config, split=split)
        if text_field not in self.ds.column_names:
            raise KeyError(f"dataset {name} has no column {text_field!r} (columns: {self.ds.column_names})")

    def fingerprint(self) -> str:
        fp = getattr(self.ds, "_fingerprint", None) or f"{len(self.ds)}"
        return hashlib.sha256(f"hf-v1\0{self.name}\0{self.config}\0{self.split}\0{self.text_field}\0{fp}".encode()).hexdigest()

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for i, row in enumerate(self.ds):
            text = row[self.text_field]
            if text is not None:
                yield f"{self.split}:{i}", str(text)

    def __repr__(self) -> str:
        return f"HFSource({self.name!r}, config={self.config!r}, split={self.split!r})"


def open_source(spec: str | os.PathLike | Sequence[str | os.PathLike], *, text_field: str = "text"):
    """"stdlib" | "hf:NAME[:CONFIG][@SPLIT]" | a path | comma-separated paths | a list of paths -> a source."""
    if isinstance(spec, (list, tuple)):
        return FileSource(spec, text_field=text_field)
    spec = str(spec)
    if spec == "stdlib":
        return StdlibSource()
    if spec.startswith("hf:"):
        rest, _, split = spec[3:].partition("@")
        name, _, config = rest.partition(":")
        return HFSource(name, config=config or None, split=split or "train", text_field=text_field)
    return FileSource([p for p in spec.split(",") if p], text_field=text_field)
