"""Automatic prefix caching: shared boundary blocks plus recurrent-state snapshots (indices only).

Hash scope. Block i of a sequence holds boundary entries [i*bs, (i+1)*bs) of every layer; entry e
of layer l summarises the tokens up to that layer's e-th boundary, so the block is fully determined
by the tokens before `CacheLayout.block_end(i)`, the first length at which every layer has written
all its entries. Its key chains the previous block's key with exactly those tokens (vLLM's APC);
the seed covers every layer's KeySpec (kind, P, offsets, window) and the block size, so a
different P never shares. For full-attention kinds block_end(i) = (i+1)*bs: vLLM's scheme.

Snapshots. Resuming at t > 0 also needs the slot state at t (window rings, SSM and conv states,
ring positions). A snapshot is that state after block_end(i) tokens, keyed by block i's key and
stored in pool blocks, so blocks and snapshots share one byte budget. A sequence's prefill saves
one (its chunks are cut to end there) at: the end of its prompt's last full block, every
`interval` blocks, and the end of the cached blocks it matched (the branch point, as SGLang's
MambaRadixCache keeps state where prefixes diverge). Kinds without slot state need none.

Eviction. Cached blocks no sequence holds and snapshots not being loaded wait in one LRU (a
sequence's blocks enter tail first, so chains shrink from the end) and are evicted oldest first
when the pool needs a block.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .sequence import Sequence

if TYPE_CHECKING:
    from .cache_manager import CacheLayout

Key = bytes


def _clip(points: list[int], start: int, n: int) -> int:
    """Shorten a chunk of n tokens from start so that it ends at the first snapshot point inside it."""
    for p in points:
        if start < p < start + n:
            return p - start
    return n


@dataclass
class Hit:
    """Where a waiting sequence resumes: the first num_tokens come from the cache."""

    num_tokens: int = 0
    blocks: list[int] = field(default_factory=list)  # shared blocks 0..j-1
    snapshot: Key | None = None  # the state to load into its slot (None: nothing to load)
    points: list[int] = field(default_factory=list)  # lengths at which its prefill saves a snapshot

    def chunk(self, n: int) -> int:
        """The first chunk after the hit: at most n tokens, ending at a snapshot point."""
        return _clip(self.points, self.num_tokens, n)


@dataclass
class _SeqPrefix:
    chain: list[Key] = field(default_factory=list)  # keys of the sequence's full blocks so far
    registered: int = 0  # leading blocks already offered to the cache
    points: list[int] = field(default_factory=list)
    holding: bool = False  # admitted and not freed: its unregistered blocks are being computed
    loading: Key | None = None  # snapshot pinned until this step's load is done
    saving: tuple[Key, list[int]] | None = None  # snapshot this step's prefill writes


class PrefixCache:
    """Block and snapshot index, LRU of evictable entries, per-sequence hash chains, hit counters.
    The CacheManager owns the free list and refcounts and asks this class what to share."""

    def __init__(self, layout: CacheLayout, snapshot_interval: int) -> None:
        self.layout, self.interval = layout, snapshot_interval
        self.snapshot_blocks = layout.snapshot_blocks
        self.seed = hashlib.blake2b(repr((layout.spec.layers, layout.block_size, layout.kv_dtype)).encode(),
                                    digest_size=16).digest()
        self.block_of: dict[Key, int] = {}  # cached full blocks
        self.key_of: dict[int, Key] = {}
        self.snapshots: dict[Key, list[int]] = {}
        self.pins: dict[Key, int] = {}  # snapshots with a load pending
        self.lru: OrderedDict[int | Key, int] = OrderedDict()  # evictable block id or snapshot key -> blocks
        self.num_evictable = 0
        self.seqs: dict[int, _SeqPrefix] = {}
        self.queries = self.hits = 0  # in tokens, at each admission (as vLLM's)

    # ---- hashing ---------------------------------------------------------------------------------------
    def chain(self, seq: Sequence) -> list[Key]:
        """Keys of seq's full blocks (extended as its tokens grow)."""
        st = self.seqs.setdefault(seq.seq_id, _SeqPrefix())
        end = self.layout.block_end
        while end(len(st.chain)) <= seq.num_tokens:
            i = len(st.chain)
            tokens = seq.token_ids(end(i - 1) if i else 0, end(i))
            parent = st.chain[-1] if st.chain else self.seed
            st.chain.append(hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest())
        return st.chain

    # ---- lookup and admission -----------------------------------------------------------------------------
    def lookup(self, seq: Sequence) -> Hit | None:
        """The longest cached prefix seq can resume from (at most num_tokens - 1, so that a token is
        computed); None when its next block is being computed by a running sequence (wait for it)."""
        chain, end = self.chain(seq), self.layout.block_end
        usable = sum(1 for i in range(len(chain)) if end(i) < seq.num_tokens)
        k = 0
        while k < usable and chain[k] in self.block_of:
            k += 1
        if k < usable and any(chain[k] in st.chain[st.registered:] for st in self.seqs.values() if st.holding):
            return None
        j = k
        while self.snapshot_blocks and j > 0 and chain[j - 1] not in self.snapshots:
            j -= 1
        start = end(j - 1) if j else 0
        return Hit(start, [self.block_of[key] for key in chain[:j]],
                   chain[j - 1] if j and self.snapshot_blocks else None, self._points(seq, chain, start, k))

    def _points(self, seq: Sequence, chain: list[Key], start: int, matched: int) -> list[int]:
        """Lengths after start at which seq's prefill saves a snapshot (none without slot state)."""
        if not self.snapshot_blocks:
            return []
        end = self.layout.block_end
        full = sum(1 for i in range(len(chain)) if end(i) <= len(seq.prompt_ids))
        wanted = {full - 1, matched - 1, *range(self.interval - 1, full, self.interval)}
        return sorted(end(i) for i in wanted if i >= 0 and end(i) > start and chain[i] not in self.snapshots)

    def admit(self, seq: Sequence, hit: Hit) -> list[int]:
        """Record seq's admission with hit (its blocks are shared by the caller); pin the snapshot.
        Returns the snapshot's blocks to load into seq's slot ([] when none)."""
        st = self.seqs[seq.seq_id]
        st.holding, st.points, st.registered = True, hit.points, len(hit.blocks)
        self.queries += seq.num_tokens
        self.hits += hit.num_tokens
        if hit.snapshot is None:
            return []
        st.loading = hit.snapshot
        if self.pins.get(hit.snapshot, 0) == 0:
            self.num_evictable -= self.lru.pop(hit.snapshot)
        self.pins[hit.snapshot] = self.pins.get(hit.snapshot, 0) + 1
        return self.snapshots[hit.snapshot]

    def chunk(self, seq: Sequence, n: int) -> int:
        """A running sequence's next chunk: at most n tokens, ending at its next snapshot point."""
        st = self.seqs.get(seq.seq_id)
        return _clip(st.points, seq.num_computed, n) if st else n

    def wants_snapshot(self, seq: Sequence, length: int) -> Key | None:
        """The key under which seq saves its state after length tokens, if that is a point of its."""
        st = self.seqs[seq.seq_id]
        if length not in st.points:
            return None
        key = self.chain(seq)[self.layout.end_index(length)]
        return None if key in self.snapshots else key

    def saving(self, seq: Sequence, key: Key, blocks: list[int]) -> None:
        """seq's prefill writes its snapshot under key into blocks this step."""
        self.seqs[seq.seq_id].saving = (key, blocks)

    # ---- after a step -------------------------------------------------------------------------------------
    def commit(self, seq: Sequence) -> tuple[list[int], bool]:
        """After seq's step: offer its newly full blocks, register its saved snapshot, unpin its load.
        Returns the snapshot blocks written this step and whether they are now cached (False: another
        sequence saved the same snapshot first; the caller frees them)."""
        st, end = self.seqs[seq.seq_id], self.layout.block_end
        chain = self.chain(seq)
        while st.registered < min(len(chain), len(seq.block_table)) and end(st.registered) <= seq.num_computed:
            key, block = chain[st.registered], seq.block_table[st.registered]
            if key not in self.block_of:
                self.block_of[key], self.key_of[block] = block, key
            st.registered += 1
        saved, cached = [], False
        if st.saving is not None:
            (key, saved), st.saving = st.saving, None
            cached = key not in self.snapshots
            if cached:
                self.snapshots[key] = saved
                self._park(key, len(saved))
        if st.loading is not None:
            key, st.loading = st.loading, None
            self.pins[key] -= 1
            if self.pins[key] == 0:
                del self.pins[key]
                self._park(key, len(self.snapshots[key]))
        return saved, cached

    def release(self, seq: Sequence, finished: bool) -> None:
        """seq freed its blocks (preempted: keep its chain; finished: forget it)."""
        if finished:
            self.seqs.pop(seq.seq_id, None)
        elif seq.seq_id in self.seqs:
            st = self.seqs[seq.seq_id]
            st.holding, st.points = False, []

    # ---- the LRU of evictable entries ---------------------------------------------------------------------
    def _park(self, item: int | Key, nblocks: int) -> None:
        self.lru[item] = nblocks
        self.num_evictable += nblocks

    def park(self, block: int) -> bool:
        """A block no sequence holds any more: True when it stays cached (evictable) under its key."""
        if block not in self.key_of:
            return False
        self._park(block, 1)
        return True

    def unpark(self, block: int) -> None:
        """A cached block with no holder is shared again."""
        self.num_evictable -= self.lru.pop(block)

    def evict(self) -> list[int]:
        """Drop the least recently used entry; returns the blocks it frees."""
        item, nblocks = self.lru.popitem(last=False)
        self.num_evictable -= nblocks
        if isinstance(item, int):
            del self.block_of[self.key_of.pop(item)]
            return [item]
        return self.snapshots.pop(item)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding cached entries or snapshots (held by sequences or not)."""
        return len(self.key_of) + sum(len(b) for b in self.snapshots.values())
