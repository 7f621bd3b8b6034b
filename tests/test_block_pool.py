"""The block pool as a unit (every block free, held or cached, never two of these), and the cache
rooms' one-way imports: cache_layout <- block_pool <- prefix_index <- cache_manager."""
from __future__ import annotations

import ast
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_pool import BlockPool

ROOMS = ["cache_layout", "block_pool", "prefix_index", "cache_manager"]


def engine_imports(module: str) -> set[str]:
    """The engine modules a module of engine/ imports (relative or absolute)."""
    tree = ast.parse((Path(__file__).parent.parent / "engine" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("engine."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("engine.")}
    return found


def test_cache_rooms_import_one_way() -> None:
    for i, room in enumerate(ROOMS):
        assert engine_imports(room) <= set(ROOMS[:i]) | {"sequence"}, room


def check(pool: BlockPool, held: list[int]) -> None:
    """Each block is exactly one of: free, held, evictable in the LRU, in a pinned snapshot."""
    snapshots = pool._snapshots
    lru = [b for item in pool.lru for b in ([item] if isinstance(item, int) else snapshots[item])]
    pinned = [b for key in pool.pins for b in snapshots[key]]
    assert sorted(pool.free + sorted(set(held)) + lru + pinned) == list(range(len(pool.ref)))
    assert all(pool.ref[b] == held.count(b) for b in range(len(pool.ref)))
    assert pool.num_free == len(pool.free) + len(lru)


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["take", "compute", "release", "share", "snapshot", "pin", "unpin",
                                               "reset"]), st.integers(0, 5)), max_size=60))
def test_pool_never_loses_or_double_hands_out_a_block(ops) -> None:
    """Random takes, cached full blocks, shares, snapshots, loads and resets keep the partition; once
    every holder is gone and the cache reset, every block is free."""
    pool = BlockPool(8)
    held: list[int] = []  # one entry per holder
    pinned: list[bytes] = []
    for op, k in ops:
        key = bytes([k % 3])
        if op in ("take", "compute") and pool.num_free:
            held.append(pool.take())
            if op == "compute":  # a full block computed by its sequence, offered under its key
                pool.cache(key, held[-1])
        elif op == "release" and held:
            pool.release(held.pop(k % len(held)))
        elif op == "share" and pool.cached(key) is not None:
            pool.touch(pool.cached(key))
            held.append(pool.cached(key))
        elif op == "snapshot" and pool.num_free >= 2:
            pool.store_snapshot(key, [pool.take(), pool.take()])  # a duplicate key frees them again
        elif op == "pin" and pool.has_snapshot(key):
            assert len(pool.pin(key)) == 2
            pinned.append(key)
        elif op == "unpin" and pinned:
            pool.unpin(pinned.pop(k % len(pinned)))
        elif op == "reset":
            pool.reset()
            assert not pool.lru and pool.num_free == len(pool.free)
        check(pool, held)
    for block in held:
        pool.release(block)
    for key in pinned:
        pool.unpin(key)
    assert pool.idle()
    pool.reset()
    assert sorted(pool.free) == list(range(8)) and pool.num_cached == 0
