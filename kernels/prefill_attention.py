"""Prefill chunks over their paged context: each row's queries see the boundary entries in its
blocks, its window ring, and the chunk itself, in one softmax.

Rows are right-padded to T tokens; row b's tokens sit at consecutive positions q_pos[b]. Three sets
of keys are read, what each query reads given by the step's metadata (models/paged.py asks
models/kv_spec.py, so no rule about which keys are kept is written here):
  boundary entries  query (b, i) reads entries 0 .. bnd_count[b, i]-1 through block_tables[b]
                    (entry e in block block_tables[b, e // block_size] at offset e % block_size);
                    the chunk's own boundaries are stored there before this runs
  window ring       entry w of slot slots[b], which precedes every query of the row, is read by
                    the queries at positions <= win_last[b, w] (-1: by none)
  the chunk         key j (of k, v) by the queries i >= j at positions <= k_last[b, j]
Query heads share KV heads in groups (query head i reads KV head i // (H / Hkv)). A query that
reads no key gives zeros.
`prefill_attention` gathers, per block of BLOCK_Q queries, only what the block can read: the
boundary entries the block's queries count at most (one host sync per call), the ring if one of them
reads it, and the chunk keys from `window` positions before the block (k_last never exceeds a key's position plus
`window`) to its end; then one scaled_dot_product_attention (a fused kernel on CUDA).
`prefill_attention_ref` is the naive twin (every key, a dense mask, an fp32 softmax) it is tested
against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._rows import cast
from ._triton import cdiv

BLOCK_Q = 128  # queries per block


def _rings(win: Tensor, slots: Tensor, dtype: torch.dtype) -> Tensor:
    """Each row's ring [B, W, Hkv, D] in dtype (the pool holds no slot when W is 0)."""
    if not win.shape[1]:
        return win.new_zeros(len(slots), 0, *win.shape[2:], dtype=dtype)
    return cast(win[slots.clamp(min=0)], dtype)


def prefill_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_last: Tensor, k_cache: Tensor, v_cache: Tensor,
    block_tables: Tensor, bnd_count: Tensor, win_k: Tensor, win_v: Tensor, slots: Tensor, win_last: Tensor,
    window: int, scale: float,
) -> Tensor:
    """q [B, T, H, D]; k, v [B, T, Hkv, D]; q_pos, k_last, bnd_count [B, T] int; k_cache, v_cache
    [num_blocks, block_size, Hkv, D]; block_tables [B, M] int; win_k, win_v [S, W, Hkv, D]; slots [B];
    win_last [B, W] int. Returns [B, T, H, D] in q's dtype."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    f32 = torch.float32
    ctx_k, ctx_v = (c[block_tables].flatten(1, 2) for c in (k_cache, v_cache))  # [B, N, Hkv, D]
    keys = torch.cat([cast(ctx_k, f32), _rings(win_k, slots, f32), cast(k, f32)], 1)  # [B, N + W + T, Hkv, D]
    vals = torch.cat([cast(ctx_v, f32), _rings(win_v, slots, f32), cast(v, f32)], 1)
    t = q_pos[:, :, None]  # [B, T, 1]
    mask = torch.cat([
        torch.arange(ctx_k.shape[1], device=q.device) < bnd_count[:, :, None],
        t <= win_last[:, None, :],
        (q_pos[:, None, :] <= t) & (t <= k_last[:, None, :]),
    ], -1)  # [B, T, N + W + T]
    qg = cast(q, f32).view(B, T, Hkv, H // Hkv, D) * scale
    scores = torch.einsum("btkgd,bskd->bkgts", qg, keys).masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # a row with no key: all -inf, NaN -> 0
    out = torch.einsum("bkgts,bskd->btkgd", probs, vals)
    return cast(out.reshape(B, T, H, D), q.dtype)


def prefill_attention(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_last: Tensor, k_cache: Tensor, v_cache: Tensor,
    block_tables: Tensor, bnd_count: Tensor, win_k: Tensor, win_v: Tensor, slots: Tensor, win_last: Tensor,
    window: int, scale: float,
) -> Tensor:
    """`prefill_attention_ref` by blocks of queries, each over only the keys it can read (same arguments)."""
    B, T, H, D = q.shape
    block_size = k_cache.shape[1]
    gqa = k.shape[2] != H
    ring_k, ring_v = _rings(win_k, slots, q.dtype), _rings(win_v, slots, q.dtype)
    starts = list(range(0, T, BLOCK_Q))
    ends = [min(a + BLOCK_Q, T) for a in starts]
    first = torch.tensor(starts, device=q.device)
    # the most boundary entries any query up to each block's end reads (counts grow along a row), and whether
    # any query of the block reads the ring (positions grow along a row: its first query reads most); one sync
    reach = bnd_count.amax(0).cummax(0).values[first.new_tensor(ends) - 1]
    rings = ((win_last.amax(-1, keepdim=True) >= q_pos[:, first]).any(0) if win_last.shape[-1]
             else torch.zeros_like(first, dtype=torch.bool))  # no ring at all
    idx = torch.arange(T, device=q.device)
    outs = []
    for a, e, n, ring in zip(starts, ends, *torch.stack([reach, rings.long()]).tolist()):
        t = q_pos[:, a:e, None]  # [B, tb, 1]
        lo = max(0, a - window)  # the band of chunk keys the block can read
        tables = block_tables[:, : cdiv(n, block_size)]
        ctx_k, ctx_v = (cast(c[tables].flatten(1, 2)[:, :n], q.dtype) for c in (k_cache, v_cache))
        w = ring_k.shape[1] if ring else 0  # a ring no query of the block reads (a fresh row's) is left out
        keys = torch.cat([ctx_k, ring_k[:, :w], k[:, lo:e]], 1).transpose(1, 2)  # [B, Hkv, n + w + e - lo, D]
        vals = torch.cat([ctx_v, ring_v[:, :w], v[:, lo:e]], 1).transpose(1, 2)
        mask = torch.cat([
            torch.arange(n, device=q.device) < bnd_count[:, a:e, None],
            t <= win_last[:, None, :w],
            (idx[lo:e] <= idx[a:e, None]) & (t <= k_last[:, None, lo:e]),
        ], -1)  # [B, tb, S]
        seen = mask.any(-1, keepdim=True)  # a query with no key reads every one, then gives zeros
        o = F.scaled_dot_product_attention(q[:, a:e].transpose(1, 2), keys, vals, attn_mask=(mask | ~seen)[:, None],
                                           scale=scale, enable_gqa=gqa)
        outs.append(o.transpose(1, 2) * seen[..., None])
    return torch.cat(outs, 1)
