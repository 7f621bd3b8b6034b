"""Write this step's K/V into a pool: the paged boundary entries or the window ring.

A pool is viewed flat as [num_entries, Hkv, D]; slot_mapping[b] is the flat entry of row b's
K/V, or -1 when the row stores nothing there (not a boundary of this layer, or a padding row),
as in vLLM's reshape_and_cache and nano-vllm's store kernel.
"""
from __future__ import annotations

from torch import Tensor

from ._rows import cast


def store_kv_ref(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """k, v [B, Hkv, D] -> k_cache, v_cache [num_entries, Hkv, D] at slot_mapping [B] (-1 skipped)."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache[slot_mapping] = cast(k, k_cache.dtype)
    v_cache[slot_mapping] = cast(v, v_cache.dtype)
