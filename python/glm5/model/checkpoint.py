"""Hugging Face `glm_moe_dsa` checkpoint I/O: config.json + safetensors shards (+ index json).

Layout (the released zai-org/GLM-5 checkpoint, and what transformers 5.23 writes):
- every module under the transformers name (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.*`,
  `model.norm.weight`, `lm_head.weight`);
- routed experts one by one: `model.layers.{i}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight`,
  fused on load into `gate_up_proj` [E, 2F, D] (gate rows first) and `down_proj` [E, D, F], split on save;
- the MTP block as layer index num_hidden_layers (`model.layers.{N}.{enorm,hnorm,eh_proj,shared_head.norm,...}`);
  DeepSeek-style redundant copies `model.layers.{N}.embed_tokens.weight` / `shared_head.head.weight`
  are accepted if they equal the main embedding / head;
- FP8 checkpoints: float8 weights with `<name>_scale_inv` fp32 block scales (128x128 blocks, or the
  config's quantization_config.weight_block_size), dequantised on load: w = w8 * scale_inv[block].
Every tensor of the model must come from the checkpoint and every checkpoint tensor must be used;
anything else raises an error naming the tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Iterator

import torch

from .config import ModelConfig, config_from_hf, config_to_hf
from .transformer import KEEP_FP32, GLM5ForCausalLM

__all__ = ["from_pretrained", "save_pretrained", "load_config", "CheckpointError", "dequantize_fp8_blocks"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or this model (the message names the tensor)."""


def _dtype(d) -> torch.dtype:
    if d is None or isinstance(d, torch.dtype):
        return d
    name = str(d).removeprefix("torch.")
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {d!r}")
    return dt


def load_config(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """(ModelConfig, the raw config.json dict) of a checkpoint directory."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    raw = json.loads(f.read_text())
    return config_from_hf(raw), raw


def dequantize_fp8_blocks(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str = "weight") -> torch.Tensor:
    """fp32 w8 * scale_inv, one scale per (block[0] x block[1]) tile of the [O, I] weight."""
    O, I = w.shape
    bo, bi = block
    want = (math.ceil(O / bo), math.ceil(I / bi))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(f"{name}_scale_inv has shape {tuple(scale_inv.shape)}, expected {want} for a {O}x{I} "
                              f"weight in {bo}x{bi} blocks")
    s = scale_inv.float().repeat_interleave(bo, 0)[:O].repeat_interleave(bi, 1)[:, :I]
    return w.float() * s


class _Reader:
    """Lazily opened safetensors shards with a key -> file map and a record of what was read."""

    def __init__(self, path: Path, block: tuple[int, int]) -> None:
        from safetensors import safe_open

        self._open, self.block, self.used = safe_open, block, set()
        index = path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map'")
            self.files = {k: path / v for k, v in weight_map.items()}
            for f in sorted(set(self.files.values())):
                if not f.is_file():
                    raise CheckpointError(f"{index} names shard {f.name}, which is missing")
        else:
            shards = sorted(path.glob("*.safetensors"))
            if not shards:
                raise FileNotFoundError(f"no *.safetensors in {path}")
            self.files = {}
            for f in shards:
                with safe_open(f, framework="pt") as h:
                    for k in h.keys():
                        if k in self.files:
                            raise CheckpointError(f"tensor {k} appears in both {self.files[k].name} and {f.name}")
                        self.files[k] = f
        self._handles: dict[Path, object] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def keys(self) -> Iterator[str]:
        return iter(self.files)

    def _raw(self, key: str) -> torch.Tensor:
        f = self.files[key]
        if f not in self._handles:
            self._handles[f] = self._open(f, framework="pt")
        self.used.add(key)
        try:
            return self._handles[f].get_tensor(key)
        except Exception as e:  # noqa: BLE001 - a shard that lies about its content
            raise CheckpointError(f"cannot read tensor {key} from {f.name}: {e}") from e

    def get(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor `key` (dequantised if FP8), checked against the expected shape."""
        if key not in self.files:
            raise KeyError(key)
        t = self._raw(key)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"tensor {key} has shape {tuple(t.shape)}, but the config needs {tuple(shape)}")
        scale_key = key + "_scale_inv"
        if t.dtype in _FP8:
            if scale_key not in self.files:
                raise CheckpointError(f"tensor {key} is {t.dtype} but {scale_key} is missing")
            t = dequantize_fp8_blocks(t, self._raw(scale_key), self.block, key)
        elif scale_key in self.files:
            raise CheckpointError(f"{scale_key} present but {key} is {t.dtype}, not FP8")
        return t


def _ckpt_prefix(name: str, cfg: ModelConfig) -> str:
    """Our parameter name -> the checkpoint's (MTP block: `mtp.` -> `model.layers.{N}.`)."""
    return f"model.layers.{cfg.num_hidden_layers}." + name[4:] if name.startswith("mtp.") else name


def _state_items(model: GLM5ForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    tied = model.config.tie_word_embeddings
    for name, t in model.state_dict(keep_vars=True).items():
        if tied and name == "lm_head.weight":
            continue
        yield name, t


def from_pretrained(
    path: str | os.PathLike, *, dtype=None, device: str | torch.device = "cpu", mtp: bool = True
) -> GLM5ForCausalLM:
    """Load a `glm_moe_dsa` checkpoint directory into a GLM5ForCausalLM (eval mode).

    Args:
        dtype: torch dtype (or name) of the weights; default the config's dtype. The indexer's
            weights_proj and the router bias stay fp32 (as in transformers).
        mtp: load the MTP block when the checkpoint has it (False skips it; its tensors are then
            accepted unread).
    """
    path = Path(path)
    cfg, raw = load_config(path)
    dt = _dtype(dtype) or _dtype(cfg.torch_dtype)
    qc = raw.get("quantization_config") or {}
    if qc and qc.get("quant_method", "fp8") != "fp8":
        raise CheckpointError(f"config.json: quantization_config.quant_method={qc.get('quant_method')!r} is not supported (fp8 only)")
    block = tuple(qc.get("weight_block_size") or (128, 128))
    reader = _Reader(path, block)

    N = cfg.num_hidden_layers
    mtp_prefix = f"model.layers.{N}."
    has_mtp = any(k.startswith(mtp_prefix) for k in reader.keys())
    if has_mtp and not cfg.num_nextn_predict_layers:
        bad = next(k for k in reader.keys() if k.startswith(mtp_prefix))
        raise CheckpointError(f"unexpected tensor {bad}: config.json has num_nextn_predict_layers=0 (no MTP layer)")
    with torch.device("meta"):
        model = GLM5ForCausalLM(cfg, init=False)
    if not (has_mtp and mtp):
        model.mtp = None

    E, Fi = cfg.n_routed_experts, cfg.moe_intermediate_size
    state: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for name, meta in _state_items(model):
        tdt = torch.float32 if name.endswith(KEEP_FP32) else dt
        out = torch.empty(meta.shape, dtype=tdt, device=device)
        key = _ckpt_prefix(name, cfg)
        m = _EXPERT.match(key)
        try:
            if m is None:
                out.copy_(reader.get(key, tuple(meta.shape)))
            elif m.group(2) == "gate_up_proj":
                for e in range(E):
                    out[e, :Fi].copy_(reader.get(f"{m.group(1)}.{e}.gate_proj.weight", (Fi, cfg.hidden_size)))
                    out[e, Fi:].copy_(reader.get(f"{m.group(1)}.{e}.up_proj.weight", (Fi, cfg.hidden_size)))
            else:
                for e in range(E):
                    out[e].copy_(reader.get(f"{m.group(1)}.{e}.down_proj.weight", (cfg.hidden_size, Fi)))
        except KeyError as e:
            missing.append(e.args[0])
            continue
        state[name] = out
    if missing:
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise CheckpointError(f"checkpoint {path} is missing tensor(s) {missing[:10]}{more}")

    # Tensors that were not read: FP8 scales are read with their weight; the MTP block's
    # DeepSeek-style copies of the embedding and head must equal the main ones.
    for key in sorted(set(reader.keys()) - reader.used):
        if key.startswith(mtp_prefix) and not (has_mtp and mtp):
            continue
        copy_of = {mtp_prefix + "embed_tokens.weight": "model.embed_tokens.weight",
                   mtp_prefix + "shared_head.head.weight": "lm_head.weight"}.get(key)
        if copy_of is not None and copy_of in state:
            ref = state[copy_of]
            if not torch.equal(reader.get(key, tuple(ref.shape)).to(ref.dtype), ref):
                raise CheckpointError(f"tensor {key} differs from {copy_of}; glm5 shares one embedding and head")
            continue
        raise CheckpointError(f"unexpected tensor {key} in checkpoint {path} (not part of this config's model)")

    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # a bug in this loader, never a silently random weight
        raise CheckpointError(f"tensors not loaded: {leftover[:10]}")
    return model.eval()


def _hf_tensors(model: GLM5ForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, contiguous CPU tensor) in checkpoint layout (experts split one by one)."""
    cfg = model.config
    Fi = cfg.moe_intermediate_size
    for name, t in _state_items(model):
        t = t.detach()
        key = _ckpt_prefix(name, cfg)
        m = _EXPERT.match(key)
        if m is None:
            yield key, t.contiguous().cpu()
        elif m.group(2) == "gate_up_proj":
            for e in range(t.shape[0]):
                yield f"{m.group(1)}.{e}.gate_proj.weight", t[e, :Fi].contiguous().cpu()
                yield f"{m.group(1)}.{e}.up_proj.weight", t[e, Fi:].contiguous().cpu()
        else:
            for e in range(t.shape[0]):
                yield f"{m.group(1)}.{e}.down_proj.weight", t[e].contiguous().cpu()


def save_pretrained(model: GLM5ForCausalLM, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and safetensors shards (+ model.safetensors.index.json when sharded).

    Tensors keep their dtype (so a load of the result is exact); the MTP block is written as layer
    num_hidden_layers when the model has one.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg_dict = config_to_hf(model.config)
    cfg_dict["dtype"] = str(model.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")

    for stale in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        if stale.exists():
            stale.unlink()
    # Shards are written as they fill (never the whole model in memory), then renamed "-of-N".
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        tmp = path / f"model-{len(written) + 1:05d}.partial.safetensors"
        save_file(shard, tmp, metadata={"format": "pt"})
        written.append((tmp, list(shard)))

    for key, t in _hf_tensors(model):
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[key] = t
        size += nbytes
        total += nbytes
    flush()
    if len(written) == 1:
        written[0][0].rename(path / SINGLE_FILE)
        return
    weight_map = {}
    for i, (tmp, keys) in enumerate(written):
        fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        tmp.rename(path / fname)
        weight_map.update({k: fname for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
