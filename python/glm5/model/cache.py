"""A packed KV cache for generation: the MLA latent and the indexer key of every token, per layer.

Suffixes as in attention.py: C = kv_lora_rank + qk_rope_head_dim (the latent after kv_a_layernorm
and the roped k_rope: 576 values per token per layer in GLM-5), J = index_head_dim (the lightning
indexer's single key head), T tokens of this call.

Layout: one buffer per layer of n_seqs * capacity rows; sequence b owns the contiguous rows
[b * capacity, b * capacity + length_b). A forward over tokens of several sequences (packed, each
sequence's tokens contiguous) writes its tokens at their slots and attends through ks/ke, which
select each query's own sequence (causally) in the packed buffer, so the attention kernels, the
projections and the MoE all see one batch. Rolling back a sequence (rejected speculative tokens) is
`truncate`: the rows stay and are overwritten by the next write.

    cache = PackedKVCache.for_model(model, n_seqs=2, capacity=64)
    positions, ks, ke = cache.begin([0, 1], [5, 3])   # 5 tokens of sequence 0, then 3 of sequence 1
    model.model(h_TD, cos, sin, ks, ke, cache=cache)  # every layer calls cache.update(...)

The lightning indexer's top-k goes through `indexer_topk`, one call per sequence on that
sequence's own rows: a single call over the packed buffer would let a block of queries from
different sequences scan the union of their ranges (the CPU kernel tiles queries in blocks).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

import glm5.ops

from .config import ModelConfig

__all__ = ["PackedKVCache"]


class PackedKVCache:
    """Latent KV [n_seqs * capacity, C] and indexer keys [n_seqs * capacity, J] per cached layer."""

    def __init__(
        self,
        cfg: ModelConfig,
        n_seqs: int,
        capacity: int,
        *,
        layers: Iterable[int],
        indexer_layers: Iterable[int],
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if n_seqs <= 0 or capacity <= 0:
            raise ValueError(f"PackedKVCache needs n_seqs > 0 and capacity > 0, got {n_seqs} and {capacity}")
        self.n_seqs, self.capacity = n_seqs, capacity
        self.device = torch.device(device)
        rows = n_seqs * capacity
        C = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        # zeros, not empty: the dense (expanded) attention reads whole windows of rows and masks them.
        self.kv = {i: torch.zeros(rows, C, dtype=dtype, device=self.device) for i in layers}
        self.idx_k = {i: torch.zeros(rows, cfg.index_head_dim, dtype=dtype, device=self.device) for i in indexer_layers}
        self.lengths = [0] * n_seqs
        self._slots: torch.Tensor | None = None  # [T] rows this call writes
        self._segments: list[tuple[int, int, int]] = []  # (seq, first query row, query count) of this call

    @classmethod
    def for_model(cls, model, n_seqs: int, capacity: int) -> "PackedKVCache":
        """A cache for every decoder layer of a GLM5ForCausalLM (indexer keys on its 'full' layers)."""
        cfg = model.config
        full = [i for i, t in enumerate(cfg.indexer_types) if t == "full"]
        return cls(cfg, n_seqs, capacity, layers=range(cfg.num_hidden_layers), indexer_layers=full,
                   dtype=model.dtype, device=model.device)

    @classmethod
    def for_mtp(cls, model, n_seqs: int, capacity: int) -> "PackedKVCache":
        """A cache for the MTP block alone (its layer index is num_hidden_layers; it has an indexer)."""
        L = model.config.num_hidden_layers
        return cls(model.config, n_seqs, capacity, layers=[L], indexer_layers=[L], dtype=model.dtype, device=model.device)

    # ---- bookkeeping ------------------------------------------------------------------------------
    def slots(self, seq: int, start: int, stop: int) -> torch.Tensor:
        """Rows of positions [start, stop) of sequence `seq` (int64, on the cache's device)."""
        base = seq * self.capacity
        return torch.arange(base + start, base + stop, device=self.device)

    def begin(self, seqs: Sequence[int], counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Open a forward over counts[i] new tokens of sequence seqs[i], packed in that order.

        The tokens take positions length..length+count-1 of their sequence (the lengths grow now).
        Returns positions [T] int64 (for RoPE) and ks, ke [T] int32: query t sees its sequence's rows
        up to and including its own.
        """
        if len(seqs) != len(counts):
            raise ValueError(f"begin: {len(seqs)} sequences but {len(counts)} counts")
        pos, ks, ke, segs = [], [], [], []
        row = 0
        for b, n in zip(seqs, counts):
            if not 0 <= b < self.n_seqs:
                raise IndexError(f"begin: sequence {b} out of range [0, {self.n_seqs})")
            start = self.lengths[b]
            if n < 0 or start + n > self.capacity:
                raise ValueError(f"begin: sequence {b} holds {start} tokens, cannot add {n} (capacity {self.capacity})")
            base = b * self.capacity
            pos.extend(range(start, start + n))
            ks.extend([base] * n)
            ke.extend(range(base + start + 1, base + start + n + 1))
            segs.append((b, row, n))
            row += n
            self.lengths[b] = start + n
        positions = torch.tensor(pos, dtype=torch.long, device=self.device)
        ke_t = torch.tensor(ke, dtype=torch.int32, device=self.device)
        self._slots = ke_t.long() - 1
        self._segments = segs
        return positions, torch.tensor(ks, dtype=torch.int32, device=self.device), ke_t

    def truncate(self, seq: int, length: int) -> None:
        """Roll sequence `seq` back to its first `length` tokens (in every layer)."""
        if not 0 <= length <= self.lengths[seq]:
            raise ValueError(f"truncate: sequence {seq} holds {self.lengths[seq]} tokens, cannot keep {length}")
        self.lengths[seq] = length

    # ---- the hooks the attention calls ------------------------------------------------------------
    def update(self, layer_idx: int, kv_TC: torch.Tensor, k_idx_TJ: torch.Tensor | None):
        """Write this call's latents (and indexer keys) at their slots; return the layer's buffers."""
        if self._slots is None:
            raise RuntimeError("PackedKVCache.update before begin(): open each forward with cache.begin(...)")
        if kv_TC.shape[0] != self._slots.shape[0]:
            raise ValueError(f"cache.update: layer {layer_idx} got {kv_TC.shape[0]} tokens, begin() opened {self._slots.shape[0]}")
        if layer_idx not in self.kv:
            raise KeyError(f"cache.update: layer {layer_idx} is not cached here (layers {sorted(self.kv)})")
        kv = self.kv[layer_idx]
        kv.index_copy_(0, self._slots, kv_TC.to(kv.dtype))
        k = self.idx_k.get(layer_idx)
        if k_idx_TJ is not None:
            if k is None:
                raise KeyError(f"cache.update: layer {layer_idx} has no indexer-key buffer")
            k.index_copy_(0, self._slots, k_idx_TJ.to(k.dtype))
        return kv, k

    def indexer_topk(self, q, k, w, ks, ke, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """glm5.ops.indexer_topk over the packed buffer, one call per sequence on its own rows.

        Same contract and result as one call over the whole buffer (indices are buffer rows, -1 padded).
        """
        idx, val = [], []
        for b, r0, n in self._segments:
            if n == 0:
                continue
            lo, hi = b * self.capacity, b * self.capacity + self.lengths[b]
            rows = slice(r0, r0 + n)
            i, v = glm5.ops.indexer_topk(q[rows], k[lo:hi], w[rows], ks[rows] - lo, ke[rows] - lo, topk)
            idx.append(torch.where(i >= 0, i + lo, i))
            val.append(v)
        if not idx:
            return glm5.ops.indexer_topk(q, k, w, ks, ke, topk)
        return torch.cat(idx), torch.cat(val)
