"""Cache bookkeeping: which blocks and state slots each sequence holds, and what that costs.

The model runner owns the tensors; this class only hands out indices. Two pools:
  blocks  `block_size` boundary K/V entries for every layer (for full-attention kinds every
          token is an entry, so this is an ordinary paged KV cache);
  slots   one per running sequence: the window ring of recent K/V, and the K/V SSM and conv
          states (Attamba), or just the window (sliding). Full-attention kinds need none.
Both are sized from one byte budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.config import ModelConfig
from models.layers import num_boundaries
from models.state import full_kv_bytes

from .sequence import Sequence


@dataclass(frozen=True)
class CacheLayout:
    """Per-entry sizes of the cache for one model."""

    cfg: ModelConfig
    block_size: int
    kv_dtype: torch.dtype

    @property
    def kv_bytes(self) -> int:
        return torch.empty(0, dtype=self.kv_dtype).element_size()

    @property
    def block_bytes(self) -> int:
        """block_size entries of K and V, for every layer."""
        return self.block_size * self.cfg.n_layers * 2 * self.cfg.kv_dim * self.kv_bytes  # GQA: kv_dim

    @property
    def slot_bytes(self) -> int:
        """Window ring plus SSM (fp32) and conv states of one sequence, every layer."""
        c = self.cfg
        per_layer = c.window_slots * 2 * c.kv_dim * self.kv_bytes  # GQA: kv_dim
        if c.has_ssm:
            per_layer += 2 * (c.ssm_inner * c.ssm_state * 4 + c.conv_channels * (c.conv_width - 1) * self.kv_bytes)
        return c.n_layers * per_layer

    @property
    def needs_slot(self) -> bool:
        return self.slot_bytes > 0

    def entries(self, n: int) -> int:
        """Boundary entries (max over layers) a sequence of n tokens keeps."""
        c = self.cfg
        if c.kind == "attamba":
            return max(num_boundaries(n, c.chunk_size, c.layer_offset(i)) for i in range(c.n_layers))
        return n if c.all_boundaries else 0

    def blocks(self, n: int) -> int:
        return math.ceil(self.entries(n) / self.block_size)


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
        if num_slots < 1 or (num_blocks < 1 and layout.entries(1) > 0):
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
        slot_ok = seq.slot >= 0 or not self.layout.needs_slot or bool(self.free_slots)
        return more <= len(self.free_blocks) and slot_ok

    def allocate(self, seq: Sequence, n: int) -> None:
        """Grow seq's blocks (and take a slot) so it can hold n tokens."""
        assert self.can_allocate(seq, n)
        if seq.slot < 0 and self.layout.needs_slot:
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
        return sum(full_kv_bytes(self.layout.cfg, s.num_computed, self.layout.kv_dtype) for s in seqs)

    def all_free(self) -> bool:
        return len(self.free_blocks) == self.num_blocks and len(self.free_slots) == self.num_slots
