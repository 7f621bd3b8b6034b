"""Cache bookkeeping: which blocks and state slots each sequence holds, and what that costs.

The model runner owns the tensors; this class only hands out indices. Two pools:
  blocks  `block_size` boundary K/V entries for every layer (for full-attention kinds every
          token is an entry, so this is an ordinary paged KV cache);
  slots   one per running sequence: the window ring of recent K/V, and the K/V SSM and conv
          states (Attamba), or just the window (sliding); 0 bytes for full-attention kinds.
Both are sized from one byte budget. With prefix caching (engine/prefix_cache.py) blocks are
reference-counted: full blocks are shared by a hash of the tokens they depend on, and freed ones
(and state snapshots, stored in blocks) stay cached until the pool needs them back (LRU).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from models.config import ModelConfig
from models.kv_spec import CacheSpec

from .prefix_cache import Hit, PrefixCache
from .sequence import Sequence


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


class CacheManager:
    """Allocates blocks and slots to sequences from fixed pools; shares cached prefixes when given a
    PrefixCache."""

    def __init__(self, layout: CacheLayout, num_blocks: int, num_slots: int, prefix: PrefixCache | None = None) -> None:
        self.layout = layout
        self.num_blocks, self.num_slots = num_blocks, num_slots
        self.free_blocks = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.ref = [0] * num_blocks  # holders of each block (sequences, or a snapshot being written)
        self.prefix = prefix

    @classmethod
    def from_budget(cls, layout: CacheLayout, budget: int, max_num_seqs: int, prefix_caching: bool = False,
                    snapshot_interval: int = 8) -> "CacheManager":
        """Split `budget` bytes: a slot per sequence (up to max_num_seqs), the rest in blocks (which
        also hold the prefix cache's snapshots)."""
        if layout.needs_slot:
            num_slots = min(max_num_seqs, budget // (layout.slot_bytes + layout.block_bytes))
        else:
            num_slots = max_num_seqs
        num_blocks = (budget - num_slots * layout.slot_bytes) // layout.block_bytes
        if num_slots < 1 or (num_blocks < 1 and layout.blocks(1) > 0):
            need = layout.slot_bytes + layout.block_bytes
            raise ValueError(f"cache memory {budget} B is too small: one sequence needs at least {need} B")
        prefix = PrefixCache(layout, snapshot_interval) if prefix_caching and layout.supports_prefix_caching else None
        return cls(layout, max(num_blocks, 0), num_slots, prefix)

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.layout.block_bytes + self.num_slots * self.layout.slot_bytes

    @property
    def num_free_blocks(self) -> int:
        """Blocks free now or cached but evictable."""
        return len(self.free_blocks) + (self.prefix.num_evictable if self.prefix else 0)

    def fits_alone(self, n: int) -> bool:
        """Whether a sequence of n tokens fits the whole cache."""
        return self.layout.blocks(n) <= self.num_blocks

    def can_allocate(self, seq: Sequence, n: int) -> bool:
        """Whether seq can grow to hold n tokens."""
        more = self.layout.blocks(n) - len(seq.block_table)
        return more <= self.num_free_blocks and (seq.slot >= 0 or bool(self.free_slots))

    def allocate(self, seq: Sequence, n: int) -> None:
        """Grow seq's blocks (and take a slot) so it can hold n tokens."""
        assert self.can_allocate(seq, n)
        if seq.slot < 0:  # every running sequence has a slot (of 0 bytes for full-attention kinds)
            seq.slot = self.free_slots.pop()
        for _ in range(self.layout.blocks(n) - len(seq.block_table)):
            seq.block_table.append(self._take())

    def _take(self) -> int:
        if not self.free_blocks:
            self.free_blocks.extend(self.prefix.evict())
        block = self.free_blocks.pop()
        self.ref[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref[block] -= 1
        if self.ref[block] == 0 and not (self.prefix and self.prefix.park(block)):
            self.free_blocks.append(block)

    def free(self, seq: Sequence, finished: bool = True) -> None:
        """Return everything seq holds (its cached blocks stay cached until evicted)."""
        for block in reversed(seq.block_table):  # the tail of a chain is evicted first
            self._release(block)
        seq.block_table = []
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            seq.slot = -1
        if self.prefix:
            self.prefix.release(seq, finished)

    # ---- prefix caching ----------------------------------------------------------------------------------
    def lookup(self, seq: Sequence) -> Hit | None:
        """Where a waiting seq resumes (Hit() without prefix caching); None: wait for a running
        sequence that is computing its next block."""
        return self.prefix.lookup(seq) if self.prefix else Hit()

    def can_admit(self, seq: Sequence, hit: Hit, n: int) -> bool:
        """Whether seq can resume from hit and grow to n tokens."""
        if not hit.blocks:
            return self.can_allocate(seq, n)
        parked = sum(1 for b in hit.blocks if self.ref[b] == 0)
        if hit.snapshot is not None and hit.snapshot in self.prefix.lru:
            parked += self.prefix.lru[hit.snapshot]
        more = self.layout.blocks(n) - len(hit.blocks)
        return more <= self.num_free_blocks - parked and bool(self.free_slots)

    def admit(self, seq: Sequence, hit: Hit) -> list[int]:
        """Share hit's blocks with seq; returns the snapshot blocks to load into its slot."""
        if not self.prefix:
            return []
        for block in hit.blocks:
            if self.ref[block] == 0:
                self.prefix.unpark(block)
            self.ref[block] += 1
        seq.block_table = list(hit.blocks)
        return self.prefix.admit(seq, hit)

    def chunk(self, seq: Sequence, n: int) -> int:
        """At most n tokens of a running seq, cut at its next snapshot point."""
        return self.prefix.chunk(seq, n) if self.prefix else n

    def plan_snapshot(self, seq: Sequence, n: int) -> list[int]:
        """Blocks to save seq's state into after it reaches n tokens ([] when none is due or no
        block is free)."""
        key = self.prefix.wants_snapshot(seq, n) if self.prefix else None
        if key is None or self.prefix.snapshot_blocks > self.num_free_blocks:
            return []
        blocks = [self._take() for _ in range(self.prefix.snapshot_blocks)]
        self.prefix.saving(seq, key, blocks)
        return blocks

    def commit(self, seq: Sequence) -> None:
        """After a step: seq's full blocks and saved snapshot become cached."""
        if not self.prefix:
            return
        saved, cached = self.prefix.commit(seq)
        for block in saved:  # now owned by the snapshot index (evictable), or a duplicate
            self.ref[block] = 0
            if not cached:
                self.free_blocks.append(block)

    def used_bytes(self) -> int:
        """Bytes of the blocks and slots held by live sequences."""
        blocks = sum(1 for r in self.ref if r > 0)
        slots = self.num_slots - len(self.free_slots) if self.layout.needs_slot else 0
        return blocks * self.layout.block_bytes + slots * self.layout.slot_bytes

    def prefix_cache_bytes(self) -> int:
        """Bytes of cached blocks and snapshots (in use by sequences or evictable)."""
        return self.prefix.num_cached_blocks * self.layout.block_bytes if self.prefix else 0

    def reset_prefix_cache(self) -> None:
        """Evict every cached entry no sequence uses."""
        while self.prefix and self.prefix.lru:
            self.free_blocks.extend(self.prefix.evict())

    def full_kv_equivalent(self, seqs: list[Sequence]) -> int:
        """Bytes a full-KV transformer of the same dims would hold for these sequences' cached tokens."""
        return sum(self.layout.spec.full_kv_bytes(s.num_computed, self.layout.kv_dtype) for s in seqs)

    def all_free(self) -> bool:
        """No block or slot held (cached entries may remain: they are evictable)."""
        return not any(self.ref) and len(self.free_slots) == self.num_slots and not (self.prefix and self.prefix.pins)
