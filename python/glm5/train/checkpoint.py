"""Atomic, exactly-resumable training checkpoints.

    save_checkpoint(run_dir / "checkpoints", step, model=model, optimizer=opt, scheduler=sched,
                    data=train_loader, config=asdict(cfg), keep_last=3)
    ckpt = load_latest(run_dir / "checkpoints", model=model, optimizer=opt, scheduler=sched)
    if ckpt: train_loader.load_state_dict(ckpt.data_state); start = ckpt.step

A checkpoint is a folder `step_<step:08d>/` holding
    model.safetensors   model state (shared tensors stored once, aliases in the metadata)
    optimizer.pt        optimizer.state_dict()                      (torch.save; loaded weights_only)
    trainer.pt          step, scheduler and data-loader state, RNG states (python, numpy, torch, CUDA), extra
    config.json         the run config, for people and for checks
    manifest.json       written last: every file's size and sha256
It is written into `.tmp-...` in the same folder, each file fsynced, then renamed into place, so a crash
mid-save leaves the previous checkpoints untouched (stale temp folders are removed by the next save).
Loading verifies the manifest before touching the model, so a truncated or corrupt checkpoint raises
CheckpointError naming the file; load_latest then falls back to the previous one with a warning.
Round trips are bitwise: tensors keep their dtype and bits, RNG states are restored exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or corrupt."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict | None = None
    scheduler_state: dict | None = None
    data_state: dict | None = None
    rng_state: dict | None = None
    config: dict | None = None
    extra: Any = None
    files: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# RNG


def capture_rng_state() -> dict:
    """Python, numpy (global), torch CPU and (when available) every CUDA device's generator state."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            warnings.warn(f"checkpoint has {len(state['cuda'])} CUDA RNG states, this machine {torch.cuda.device_count()} "
                          "devices: CUDA RNG not restored", stacklevel=2)
        else:
            torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------------------------------
# Files


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_tensors(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """safetensors file of `state`; tensors sharing memory (tied weights) are stored once."""
    from safetensors.torch import save_file

    tensors, aliases, seen = {}, {}, {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model state entry {name!r} is a {type(t).__name__}, not a tensor")
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases), "format": str(FORMAT_VERSION)})


def _load_tensors(path: Path, device) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for alias, target in aliases.items():
        state[alias] = state[target]
    return state


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)


def _torch_load(path: Path, map_location):
    return torch.load(path, map_location=map_location, weights_only=True)


def _jsonable(config):
    if config is None:
        return None
    if is_dataclass(config) and not isinstance(config, type):
        config = asdict(config)
    return json.loads(json.dumps(config, default=str))


# --------------------------------------------------------------------------------------------------
# Save / load


def checkpoint_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every complete-looking checkpoint (name step_N), oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, *, model, optimizer=None, scheduler=None, data=None,
                    config=None, extra=None, keep_last: int | None = 3, rng: bool = True) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep_last` (None: keep all).

    Args:
        model: nn.Module or a state dict of tensors.
        optimizer, scheduler: objects with state_dict() (or None).
        data: a loader with state_dict(), or the state dict itself.
        config: a dataclass or JSON-able dict.
        extra: anything torch.load(weights_only=True) can read back (tensors, numbers, str, lists, dicts).
    Returns the checkpoint folder.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(".tmp-*"):  # left by a crashed save (one writer per folder)
        shutil.rmtree(stale, ignore_errors=True)
    final = checkpoint_path(ckpt_dir, step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=ckpt_dir))
    try:
        model_state = model.state_dict() if hasattr(model, "state_dict") else model
        _save_tensors(model_state, tmp / "model.safetensors")
        if optimizer is not None:
            _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        data_state = data.state_dict() if hasattr(data, "state_dict") else data
        trainer = {"format": FORMAT_VERSION, "step": int(step), "data": data_state, "extra": extra,
                   "scheduler": scheduler.state_dict() if scheduler is not None else None,
                   "rng": capture_rng_state() if rng else None}
        _torch_save(trainer, tmp / "trainer.pt")
        (tmp / "config.json").write_text(json.dumps(_jsonable(config), indent=1))
        files = {}
        for f in sorted(tmp.iterdir()):
            _fsync_file(f)
            files[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
        manifest = {"format": FORMAT_VERSION, "step": int(step), "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _fsync_file(tmp / "manifest.json")
        _fsync_dir(tmp)
        old = None
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{final.name}-", dir=ckpt_dir))
            os.rename(final, old / final.name)
        os.rename(tmp, final)
        _fsync_dir(ckpt_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        for _, p in list_checkpoints(ckpt_dir)[:-max(keep_last, 1)]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def verify_checkpoint(path: str | os.PathLike, *, checksums: bool = True) -> dict:
    """The manifest of checkpoint `path` after checking every file's size (and sha256); raises CheckpointError."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint {path} has no manifest.json (an incomplete save?)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: manifest.json is corrupt ({e})") from None
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        size = f.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"checkpoint {path}: {name} has {size} bytes, the manifest says {info['size']} (truncated?)")
        if checksums and _sha256(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} fails its sha256 check (corrupt)")
    return manifest


def load_checkpoint(path: str | os.PathLike, *, model=None, optimizer=None, scheduler=None, data=None,
                    restore_rng: bool = True, map_location="cpu", checksums: bool = True, strict: bool = True) -> Checkpoint:
    """Verify checkpoint `path`, then load it into the given objects (each optional) and return it.

    model: nn.Module (load_state_dict(strict=strict)); optimizer/scheduler/data: objects with
    load_state_dict. RNG states are restored unless restore_rng=False. Nothing is touched when the
    checkpoint is corrupt (CheckpointError).
    """
    path = Path(path)
    manifest = verify_checkpoint(path, checksums=checksums)
    try:
        model_state = _load_tensors(path / "model.safetensors", map_location)
        opt_state = _torch_load(path / "optimizer.pt", map_location) if (path / "optimizer.pt").is_file() else None
        trainer = _torch_load(path / "trainer.pt", "cpu")
        config = json.loads((path / "config.json").read_text())
    except Exception as e:  # a file that passed the size check but does not parse
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(e).__name__}: {e}") from e
    if optimizer is not None and opt_state is None:
        raise CheckpointError(f"checkpoint {path} has no optimizer state")
    ckpt = Checkpoint(path=path, step=int(trainer["step"]), model_state=model_state, optimizer_state=opt_state,
                      scheduler_state=trainer["scheduler"], data_state=trainer["data"], rng_state=trainer["rng"],
                      config=config, extra=trainer["extra"], files=manifest["files"])
    if model is not None:
        model.load_state_dict(model_state, strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(opt_state)
    if scheduler is not None:
        if ckpt.scheduler_state is None:
            raise CheckpointError(f"checkpoint {path} has no scheduler state")
        scheduler.load_state_dict(ckpt.scheduler_state)
    if data is not None:
        data.load_state_dict(ckpt.data_state)
    if restore_rng and ckpt.rng_state is not None:
        restore_rng_state(ckpt.rng_state)
    return ckpt


def load_latest(ckpt_dir: str | os.PathLike, *, fallback: bool = True, **kwargs) -> Checkpoint | None:
    """Load the newest valid checkpoint in `ckpt_dir` (see load_checkpoint for kwargs), or None if there is none.

    A corrupt or partial newest checkpoint raises CheckpointError when fallback=False; otherwise it is
    skipped with a warning naming the problem and the previous one is loaded.
    """
    errors = []
    for step, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return load_checkpoint(path, **kwargs)
        except CheckpointError as e:
            if not fallback:
                raise
            warnings.warn(f"skipping checkpoint step {step}: {e}", stacklevel=2)
            errors.append(str(e))
    if errors:
        raise CheckpointError(f"no loadable checkpoint in {ckpt_dir}: " + "; ".join(errors))
    return None
