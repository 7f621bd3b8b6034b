"""What the cache costs: block, slot and snapshot sizes for one model (from its CacheSpec), and
which tokens determine each block. Pure numbers: no tensors, no bookkeeping.

  block     `block_size` boundary K/V entries of every layer (for full-attention kinds every token
            is an entry, so blocks form an ordinary paged KV cache);
  slot      one per running sequence: the window ring of recent K/V, and the K/V SSM and conv
            states (Attamba), or just the window (sliding); 0 bytes for full-attention kinds;
  snapshot  a slot's state saved for the prefix cache, stored in whole blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from models.config import ModelConfig
from models.kv_spec import CacheSpec


@lru_cache(maxsize=None)
def _block_end(spec: CacheSpec, block_size: int, i: int) -> int:
    """The fewest tokens after which every layer has all entries of block i (binary search)."""
    need = (i + 1) * block_size

    def has(n: int) -> bool:
        return min(int(layer.num_entries(n)) for layer in spec.layers) >= need

    lo, hi = 0, need  # has(hi) is False until hi is large enough
    while not has(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if has(mid) else (mid, hi)
    return hi


@dataclass(frozen=True)
class CacheLayout:
    """Block and slot sizes of the cache for one model, from its CacheSpec."""

    spec: CacheSpec
    block_size: int
    kv_dtype: torch.dtype

    @classmethod
    def for_model(cls, cfg: ModelConfig, block_size: int, kv_dtype: torch.dtype) -> "CacheLayout":
        return cls(CacheSpec.from_config(cfg), block_size, kv_dtype)

    @property
    def block_bytes(self) -> int:
        """block_size boundary entries (K and V) of every layer."""
        return self.block_size * self.spec.entry_bytes(self.kv_dtype)

    @property
    def slot_bytes(self) -> int:
        """Window ring plus SSM (fp32) and conv states of one sequence, every layer."""
        return self.spec.slot_bytes(self.kv_dtype)

    @property
    def needs_slot(self) -> bool:
        return self.slot_bytes > 0

    @property
    def snapshot_bytes(self) -> int:
        """A saved slot state: window rings and their positions, SSM and conv states (0: no slot)."""
        return self.slot_bytes + self.spec.window_slots * 8 if self.needs_slot else 0

    @property
    def snapshot_blocks(self) -> int:
        """Pool blocks one snapshot occupies."""
        return math.ceil(self.snapshot_bytes / self.block_bytes)

    @property
    def supports_prefix_caching(self) -> bool:
        """Whether sequences keep boundary entries (a sliding window keeps none to share)."""
        return self.spec.max_entries(1) > 0

    def block_end(self, i: int) -> int:
        """Tokens that determine block i: each of its entries depends only on tokens before this."""
        return _block_end(self.spec, self.block_size, i)

    def end_index(self, n: int) -> int:
        """The block i with block_end(i) == n."""
        i = 0
        while self.block_end(i) < n:
            i += 1
        assert self.block_end(i) == n, n
        return i

    def blocks(self, n: int) -> int:
        """Blocks a sequence of n tokens needs (for the layer that keeps the most entries)."""
        return math.ceil(self.spec.max_entries(n) / self.block_size)
