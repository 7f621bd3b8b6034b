"""Cache bookkeeping: which blocks and state slots each sequence holds, and what that costs.

The model runner owns the tensors; this class only hands out indices. Two pools:
  blocks  `block_size` boundary K/V entries for every layer (for full-attention kinds every
          token is an entry, so this is an ordinary paged KV cache);
  slots   one per running sequence: the window ring of recent K/V, and the K/V SSM and conv
          states (Attamba), or just the window (sliding); 0 bytes for full-attention kinds.
Both are sized from one byte budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.config import ModelConfig
from models.kv_spec import CacheSpec

from .sequence import Sequence


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

    def blocks(self, n: int) -> int:
        """Blocks a sequence of n tokens needs (for the layer that keeps the most entries)."""
        return math.ceil(self.spec.max_entries(n) / self.block_size)


class CacheManager:
    """Allocates blocks and slots to sequences from fixed pools."""

    def __init__(self, layout: CacheLayout, num_blocks: int, num_slots: int) -> None:
        self.layout = layout
        self.num_blocks, self.num_slots = num_blocks, num_slots
        self.free_blocks = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.free_slots = list(range(num_slots - 1, -1, -1))

    @classmethod
    def from_budget(cls, layout: CacheLayout, budget: int, max_num_seqs: int) -> "CacheManager":
        """Split `budget` bytes: a slot per sequence (up to max_num_seqs), the rest in blocks."""
        if layout.needs_slot:
            num_slots = min(max_num_seqs, budget // (layout.slot_bytes + layout.block_bytes))
        else:
            num_slots = max_num_seqs
        num_blocks = (budget - num_slots * layout.slot_bytes) // layout.block_bytes
        if num_slots < 1 or (num_blocks < 1 and layout.blocks(1) > 0):
            need = layout.slot_bytes + layout.block_bytes
            raise ValueError(f"cache memory {budget} B is too small: one sequence needs at least {need} B")
        return cls(layout, max(num_blocks, 0), num_slots)

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.layout.block_bytes + self.num_slots * self.layout.slot_bytes

    def fits_alone(self, n: int) -> bool:
        """Whether a sequence of n tokens fits the whole cache."""
        return self.layout.blocks(n) <= self.num_blocks

    def can_allocate(self, seq: Sequence, n: int) -> bool:
        """Whether seq can grow to hold n tokens."""
        more = self.layout.blocks(n) - len(seq.block_table)
        return more <= len(self.free_blocks) and (seq.slot >= 0 or bool(self.free_slots))

    def allocate(self, seq: Sequence, n: int) -> None:
        """Grow seq's blocks (and take a slot) so it can hold n tokens."""
        assert self.can_allocate(seq, n)
        if seq.slot < 0:  # every running sequence has a slot (of 0 bytes for full-attention kinds)
            seq.slot = self.free_slots.pop()
        for _ in range(self.layout.blocks(n) - len(seq.block_table)):
            seq.block_table.append(self.free_blocks.pop())

    def free(self, seq: Sequence) -> None:
        """Return everything seq holds."""
        self.free_blocks.extend(reversed(seq.block_table))
        seq.block_table = []
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            seq.slot = -1

    def used_bytes(self) -> int:
        """Bytes of the blocks and slots held by live sequences."""
        blocks = self.num_blocks - len(self.free_blocks)
        slots = self.num_slots - len(self.free_slots) if self.layout.needs_slot else 0
        return blocks * self.layout.block_bytes + slots * self.layout.slot_bytes

    def full_kv_equivalent(self, seqs: list[Sequence]) -> int:
        """Bytes a full-KV transformer of the same dims would hold for these sequences' cached tokens."""
        return sum(self.layout.spec.full_kv_bytes(s.num_computed, self.layout.kv_dtype) for s in seqs)

    def all_free(self) -> bool:
        return len(self.free_blocks) == self.num_blocks and len(self.free_slots) == self.num_slots
