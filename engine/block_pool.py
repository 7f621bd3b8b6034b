"""The block pool: the one owner of cache blocks (indices only; the model runner owns the tensors).

Each block is in one of three states:
  free     on the free list (pop() hands out low ids first);
  held     refcount > 0: in the block tables of running sequences, or a snapshot being written;
  cached   refcount 0 but kept under its key, as a full block or part of a state snapshot, in the
           LRU of evictable entries until a block is needed (oldest first).
A full block may also be cached while held (shared). A cached block that is shared again leaves
the LRU; a snapshot being loaded is pinned out of it until the load is done. Keys are opaque (the
prefix index makes them). As vLLM's v1/core/block_pool.py: free queue, refcounts, hash -> block.
"""
from __future__ import annotations

from collections import OrderedDict

Key = bytes


class BlockPool:
    """Free list, refcounts, cached full blocks and snapshots by key, LRU of evictable entries."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.free = list(range(num_blocks - 1, -1, -1))
        self.ref = [0] * num_blocks  # holders of each block
        self._block_of: dict[Key, int] = {}  # cached full blocks
        self._key_of: dict[int, Key] = {}
        self._snapshots: dict[Key, list[int]] = {}
        self.pins: dict[Key, int] = {}  # snapshots with a load pending
        self.lru: OrderedDict[int | Key, int] = OrderedDict()  # evictable block id or snapshot key -> blocks
        self.num_evictable = 0

    @property
    def num_free(self) -> int:
        """Blocks free now or cached but evictable."""
        return len(self.free) + self.num_evictable

    # ---- holders ------------------------------------------------------------------------------------------
    def take(self) -> int:
        """A block for one holder, evicting the least recently used entry when none is free."""
        if not self.free:
            self.free.extend(self._evict())
        block = self.free.pop()
        self.ref[block] = 1
        return block

    def touch(self, block: int) -> None:
        """One more holder of a cached block (it leaves the LRU if nobody held it)."""
        if self.ref[block] == 0:
            self.num_evictable -= self.lru.pop(block)
        self.ref[block] += 1

    def release(self, block: int) -> None:
        """One holder less; with none left the block stays cached (evictable) under its key, or is free."""
        self.ref[block] -= 1
        if self.ref[block] == 0:
            if block in self._key_of:
                self._park(block, 1)
            else:
                self.free.append(block)

    def evictable_among(self, blocks: list[int], snapshot: Key | None) -> int:
        """Evictable blocks among these and the snapshot's: what sharing them takes from num_free."""
        n = sum(1 for b in blocks if self.ref[b] == 0)
        return n + self.lru.get(snapshot, 0) if snapshot is not None else n

    # ---- cached full blocks -------------------------------------------------------------------------------
    def cached(self, key: Key) -> int | None:
        """The cached block under key, if any."""
        return self._block_of.get(key)

    def cache(self, key: Key, block: int) -> None:
        """Keep a full block under key (the first block cached under a key stays the one)."""
        if key not in self._block_of:
            self._block_of[key], self._key_of[block] = block, key

    # ---- state snapshots ----------------------------------------------------------------------------------
    def has_snapshot(self, key: Key) -> bool:
        return key in self._snapshots

    def store_snapshot(self, key: Key, blocks: list[int]) -> None:
        """Taken blocks now holding a written snapshot: cached under key (evictable), or freed when
        key already has one (another sequence saved it first)."""
        for block in blocks:
            self.ref[block] = 0
        if key in self._snapshots:
            self.free.extend(blocks)
        else:
            self._snapshots[key] = blocks
            self._park(key, len(blocks))

    def pin(self, key: Key) -> list[int]:
        """Keep a snapshot out of the LRU while it is loaded; returns its blocks."""
        if key not in self.pins:
            self.num_evictable -= self.lru.pop(key)
        self.pins[key] = self.pins.get(key, 0) + 1
        return self._snapshots[key]

    def unpin(self, key: Key) -> None:
        """A load of the snapshot is done (with none pending it is evictable again)."""
        self.pins[key] -= 1
        if self.pins[key] == 0:
            del self.pins[key]
            self._park(key, len(self._snapshots[key]))

    # ---- the LRU of evictable entries ---------------------------------------------------------------------
    def _park(self, item: int | Key, nblocks: int) -> None:
        self.lru[item] = nblocks
        self.num_evictable += nblocks

    def _evict(self) -> list[int]:
        """Drop the least recently used entry; returns the blocks it frees."""
        item, nblocks = self.lru.popitem(last=False)
        self.num_evictable -= nblocks
        if isinstance(item, int):
            del self._block_of[self._key_of.pop(item)]
            return [item]
        return self._snapshots.pop(item)

    def reset(self) -> None:
        """Evict every cached entry nobody holds."""
        while self.lru:
            self.free.extend(self._evict())

    # ---- accounting ---------------------------------------------------------------------------------------
    @property
    def num_held(self) -> int:
        return sum(1 for r in self.ref if r > 0)

    @property
    def num_cached(self) -> int:
        """Blocks holding cached entries or snapshots (held or not)."""
        return len(self._key_of) + sum(len(b) for b in self._snapshots.values())

    def idle(self) -> bool:
        """Nobody holds a block or has a snapshot load pending (cached entries may remain)."""
        return not any(self.ref) and not self.pins
