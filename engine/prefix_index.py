"""Automatic prefix caching, the index: hash chains over each sequence's tokens, where a waiting
sequence can resume, and the hit counters. The blocks and snapshots it finds by key are the block
pool's (engine/block_pool.py); the manager (engine/cache_manager.py) shares them with sequences.

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
"""
from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field

from .block_pool import BlockPool, Key
from .cache_layout import CacheLayout
from .sequence import Sequence


def clip_chunk(points: list[int], start: int, n: int) -> int:
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
        return clip_chunk(self.points, self.num_tokens, n)


@dataclass
class _Chain:
    keys: list[Key] = field(default_factory=list)  # keys of the sequence's full blocks so far
    registered: int = 0  # leading blocks already offered to the pool
    holding: bool = False  # admitted and not freed: its unregistered blocks are being computed


class PrefixIndex:
    """Per-sequence hash chains, the longest cached prefix of a waiting sequence, hit counters."""

    def __init__(self, layout: CacheLayout, pool: BlockPool, snapshot_interval: int) -> None:
        self.layout, self.pool, self.interval = layout, pool, snapshot_interval
        self.snapshot_blocks = layout.snapshot_blocks
        self.seed = hashlib.blake2b(repr((layout.spec.layers, layout.block_size, layout.kv_dtype)).encode(),
                                    digest_size=16).digest()
        self.seqs: dict[int, _Chain] = {}
        self.queries = self.hits = 0  # in tokens, at each admission (as vLLM's)

    # ---- hashing ---------------------------------------------------------------------------------------
    def chain(self, seq: Sequence) -> list[Key]:
        """Keys of seq's full blocks (extended as its tokens grow)."""
        st = self.seqs.setdefault(seq.seq_id, _Chain())
        end = self.layout.block_end
        while end(len(st.keys)) <= seq.num_tokens:
            i = len(st.keys)
            tokens = seq.token_ids(end(i - 1) if i else 0, end(i))
            parent = st.keys[-1] if st.keys else self.seed
            st.keys.append(hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest())
        return st.keys

    def key_at(self, seq: Sequence, length: int) -> Key:
        """The key of seq's block that ends at length (a block_end)."""
        return self.chain(seq)[self.layout.end_index(length)]

    # ---- lookup and admission -----------------------------------------------------------------------------
    def lookup(self, seq: Sequence) -> Hit | None:
        """The longest cached prefix seq can resume from (at most num_tokens - 1, so that a token is
        computed); None when its next block is being computed by a running sequence (wait for it)."""
        chain, end = self.chain(seq), self.layout.block_end
        usable = sum(1 for i in range(len(chain)) if end(i) < seq.num_tokens)
        k = 0
        while k < usable and self.pool.cached(chain[k]) is not None:
            k += 1
        if k < usable and any(chain[k] in st.keys[st.registered:] for st in self.seqs.values() if st.holding):
            return None
        j = k
        while self.snapshot_blocks and j > 0 and not self.pool.has_snapshot(chain[j - 1]):
            j -= 1
        start = end(j - 1) if j else 0
        return Hit(start, [self.pool.cached(key) for key in chain[:j]],
                   chain[j - 1] if j and self.snapshot_blocks else None, self._points(seq, chain, start, k))

    def _points(self, seq: Sequence, chain: list[Key], start: int, matched: int) -> list[int]:
        """Lengths after start at which seq's prefill saves a snapshot (none without slot state)."""
        if not self.snapshot_blocks:
            return []
        end = self.layout.block_end
        full = sum(1 for i in range(len(chain)) if end(i) <= len(seq.prompt_ids))
        wanted = {full - 1, matched - 1, *range(self.interval - 1, full, self.interval)}
        return sorted(end(i) for i in wanted if i >= 0 and end(i) > start and not self.pool.has_snapshot(chain[i]))

    def admit(self, seq: Sequence, hit: Hit) -> None:
        """seq resumes from hit (the caller shares its blocks): count the hit, and until seq is freed
        treat its next blocks as being computed."""
        st = self.seqs[seq.seq_id]
        st.holding, st.registered = True, len(hit.blocks)
        self.queries += seq.num_tokens
        self.hits += hit.num_tokens

    # ---- after a step and at the end ------------------------------------------------------------------------
    def register(self, seq: Sequence) -> None:
        """Offer seq's newly computed full blocks to the pool under their keys."""
        st, end = self.seqs[seq.seq_id], self.layout.block_end
        chain = self.chain(seq)
        while st.registered < min(len(chain), len(seq.block_table)) and end(st.registered) <= seq.num_computed:
            self.pool.cache(chain[st.registered], seq.block_table[st.registered])
            st.registered += 1

    def release(self, seq: Sequence, finished: bool) -> None:
        """seq freed its blocks (preempted: keep its chain; finished: forget it)."""
        if finished:
            self.seqs.pop(seq.seq_id, None)
        elif seq.seq_id in self.seqs:
            self.seqs[seq.seq_id].holding = False
