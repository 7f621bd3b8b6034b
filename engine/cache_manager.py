"""Cache bookkeeping per sequence: the blocks and state slot each sequence holds, where a waiting
one resumes, and what they cost. Indices only: the model runner owns the tensors.

Blocks come from the BlockPool (engine/block_pool.py), slots (one per running sequence, see
engine/cache_layout.py) from a free list here; both are sized from one byte budget. With prefix
caching (engine/prefix_index.py) a waiting sequence resumes after its longest cached prefix: it
shares those blocks and loads the snapshot of its slot state saved there; its prefill saves
snapshots at the points the index chose (its chunks end there). The rooms import one way only:
cache_layout <- block_pool <- prefix_index <- cache_manager.
"""
from __future__ import annotations

from dataclasses import dataclass

from .block_pool import BlockPool, Key
from .cache_layout import CacheLayout
from .prefix_index import Hit, PrefixIndex, clip_chunk
from .sequence import Sequence


@dataclass
class _Snapshots:
    """A sequence's snapshot plan: where its prefill saves its state, and this step's transfers."""

    points: list[int]
    loading: Key | None = None  # pinned until this step's load is done
    saving: tuple[Key, list[int]] | None = None  # written into these blocks by this step's prefill


class CacheManager:
    """Allocates blocks and slots to sequences; with prefix caching, resumes them from cached prefixes."""

    def __init__(self, layout: CacheLayout, num_blocks: int, num_slots: int, prefix_caching: bool = False,
                 snapshot_interval: int = 8) -> None:
        self.layout = layout
        self.num_blocks, self.num_slots = num_blocks, num_slots
        self.pool = BlockPool(num_blocks)
        self.free_slots = list(range(num_slots - 1, -1, -1))  # pop() hands out low ids first
        self.prefix = (PrefixIndex(layout, self.pool, snapshot_interval)
                       if prefix_caching and layout.supports_prefix_caching else None)
        self._snapshots: dict[int, _Snapshots] = {}  # by seq_id, with prefix caching

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
        return cls(layout, max(num_blocks, 0), num_slots, prefix_caching, snapshot_interval)

    def fits_alone(self, n: int) -> bool:
        """Whether a sequence of n tokens fits the whole cache."""
        return self.layout.blocks(n) <= self.num_blocks

    # ---- a sequence's blocks and slot ---------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, n: int) -> bool:
        """Whether seq can grow to hold n tokens."""
        more = self.layout.blocks(n) - len(seq.block_table)
        return more <= self.pool.num_free and (seq.slot >= 0 or bool(self.free_slots))

    def allocate(self, seq: Sequence, n: int) -> None:
        """Grow seq's blocks (and take a slot) so it can hold n tokens."""
        assert self.can_allocate(seq, n)
        if seq.slot < 0:  # every running sequence has a slot (of 0 bytes for full-attention kinds)
            seq.slot = self.free_slots.pop()
        for _ in range(self.layout.blocks(n) - len(seq.block_table)):
            seq.block_table.append(self.pool.take())

    def free(self, seq: Sequence, finished: bool = True) -> None:
        """Return everything seq holds (its cached blocks stay cached until evicted); a preempted seq
        (finished=False) keeps its hash chain."""
        for block in reversed(seq.block_table):  # the tail of a chain is evicted first
            self.pool.release(block)
        seq.block_table = []
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            seq.slot = -1
        self._snapshots.pop(seq.seq_id, None)
        if self.prefix:
            self.prefix.release(seq, finished)

    # ---- resuming from the prefix cache -------------------------------------------------------------------
    def resume(self, seq: Sequence) -> tuple[Hit, list[int]] | None:
        """Admit a waiting seq after its longest cached prefix (Hit() without prefix caching) if the
        whole of it fits: share the prefix's blocks, pin its snapshot. Returns the hit and the snapshot
        blocks to load into seq's slot; None: seq waits (it does not fit, or its next block is being
        computed by a running sequence)."""
        hit = self.prefix.lookup(seq) if self.prefix else Hit()
        if hit is None:
            return None
        more = self.layout.blocks(seq.num_tokens) - len(hit.blocks)
        if more > self.pool.num_free - self.pool.evictable_among(hit.blocks, hit.snapshot) or not self.free_slots:
            return None
        for block in hit.blocks:
            self.pool.touch(block)
        seq.block_table = list(hit.blocks)
        if not self.prefix:
            return hit, []
        self.prefix.admit(seq, hit)
        self._snapshots[seq.seq_id] = _Snapshots(hit.points, hit.snapshot)
        return hit, self.pool.pin(hit.snapshot) if hit.snapshot is not None else []

    def chunk(self, seq: Sequence, n: int) -> int:
        """At most n tokens of a running seq, cut at its next snapshot point."""
        plan = self._snapshots.get(seq.seq_id)
        return clip_chunk(plan.points, seq.num_computed, n) if plan else n

    def plan_snapshot(self, seq: Sequence, n: int) -> list[int]:
        """Blocks to save seq's state into after it reaches n tokens ([] when no snapshot is due there,
        one exists already, or no block is free)."""
        plan = self._snapshots.get(seq.seq_id)
        if plan is None or n not in plan.points:
            return []
        key = self.prefix.key_at(seq, n)
        if self.pool.has_snapshot(key) or self.layout.snapshot_blocks > self.pool.num_free:
            return []
        blocks = [self.pool.take() for _ in range(self.layout.snapshot_blocks)]
        plan.saving = (key, blocks)
        return blocks

    def commit(self, seq: Sequence) -> None:
        """After a step: seq's newly full blocks and its saved snapshot become cached; the snapshot it
        loaded is unpinned."""
        if not self.prefix:
            return
        self.prefix.register(seq)
        plan = self._snapshots[seq.seq_id]
        if plan.saving is not None:
            self.pool.store_snapshot(*plan.saving)
            plan.saving = None
        if plan.loading is not None:
            self.pool.unpin(plan.loading)
            plan.loading = None

    # ---- accounting ---------------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.layout.block_bytes + self.num_slots * self.layout.slot_bytes

    def used_bytes(self) -> int:
        """Bytes of the blocks and slots held by live sequences."""
        slots = self.num_slots - len(self.free_slots) if self.layout.needs_slot else 0
        return self.pool.num_held * self.layout.block_bytes + slots * self.layout.slot_bytes

    def prefix_cache_bytes(self) -> int:
        """Bytes of cached blocks and snapshots (in use by sequences or evictable)."""
        return self.pool.num_cached * self.layout.block_bytes

    def full_kv_equivalent(self, seqs: list[Sequence]) -> int:
        """Bytes a full-KV transformer of the same dims would hold for these sequences' cached tokens."""
        return sum(self.layout.spec.full_kv_bytes(s.num_computed, self.layout.kv_dtype) for s in seqs)

    def all_free(self) -> bool:
        """No block or slot held and no snapshot load pending (cached entries may remain: evictable)."""
        return self.pool.idle() and len(self.free_slots) == self.num_slots
