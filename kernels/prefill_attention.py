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
`prefill_attention` gathers, per block of BLOCK_Q queries, only what the block can read (`prefill_plan`: the
boundary entries the block's queries count at most, the ring if one of them reads it, and the chunk keys from
`window` positions before the block, since k_last never exceeds a key's position plus `window`, to its end); then
one scaled_dot_product_attention (a fused kernel on CUDA).
`prefill_attention_ref` is the naive twin (every key, a dense mask, an fp32 softmax) it is tested
against.
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class QueryBlock:
    """Queries [start, end) of every row, and what they read: the first `entries` boundary entries, the first
    `ring` ring entries and the chunk keys [lo, end), as mask [B, 1, end - start, entries + ring + end - lo]
    says (a query that reads no key reads every one, then seen [B, end - start, 1, 1] zeroes it)."""

    start: int
    end: int
    lo: int
    entries: int
    ring: int
    mask: Tensor
    seen: Tensor


def prefill_plan(q_pos: Tensor, k_last: Tensor, bnd_count: Tensor, win_last: Tensor, window: int) -> list[QueryBlock]:
    """The blocks of BLOCK_Q queries `prefill_attention` computes and what each reads (its arguments of the same
    names): the boundary entries the block's queries count at most, the ring if one of them reads it, and the
    chunk keys from `window` positions before the block to its end. Layers with the same key rule have the same
    metadata and share one plan (models/paged.py). One host sync."""
    T = q_pos.shape[1]
    starts = list(range(0, T, BLOCK_Q))
    ends = [min(a + BLOCK_Q, T) for a in starts]
    first = torch.tensor(starts, device=q_pos.device)
    # counts grow along a row, so the most any query up to a block's end reads is the running maximum; positions
    # grow too, so a block's first query reads most of the ring
    reach = bnd_count.amax(0).cummax(0).values[first.new_tensor(ends) - 1]
    W = win_last.shape[-1]
    rings = ((win_last.amax(-1, keepdim=True) >= q_pos[:, first]).any(0) if W
             else torch.zeros_like(first, dtype=torch.bool))  # no ring at all
    idx = torch.arange(T, device=q_pos.device)
    plan = []
    for a, e, n, ring in zip(starts, ends, *torch.stack([reach, rings.long()]).tolist()):
        t = q_pos[:, a:e, None]  # [B, tb, 1]
        lo, w = max(0, a - window), W if ring else 0  # a ring no query of the block reads (a fresh row's): left out
        mask = torch.cat([
            torch.arange(n, device=q_pos.device) < bnd_count[:, a:e, None],
            t <= win_last[:, None, :w],
            (idx[lo:e] <= idx[a:e, None]) & (t <= k_last[:, None, lo:e]),
        ], -1)  # [B, tb, S]
        seen = mask.any(-1, keepdim=True)
        plan.append(QueryBlock(a, e, lo, n, w, (mask | ~seen)[:, None], seen[..., None]))
    return plan


def prefill_attention(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_last: Tensor, k_cache: Tensor, v_cache: Tensor,
    block_tables: Tensor, bnd_count: Tensor, win_k: Tensor, win_v: Tensor, slots: Tensor, win_last: Tensor,
    window: int, scale: float, plan: list[QueryBlock] | None = None,
) -> Tensor:
    """`prefill_attention_ref` by blocks of queries, each over only the keys it can read (same arguments; plan:
    `prefill_plan` of them, made here when not given)."""
    if plan is None:
        plan = prefill_plan(q_pos, k_last, bnd_count, win_last, window)
    block_size = k_cache.shape[1]
    gqa = k.shape[2] != q.shape[2]
    ring_k, ring_v = _rings(win_k, slots, q.dtype), _rings(win_v, slots, q.dtype)
    n = max(blk.entries for blk in plan)  # every block's entries gathered once, each block reads a prefix
    tables = block_tables[:, : cdiv(n, block_size)]
    ctx_k, ctx_v = (cast(c[tables].flatten(1, 2)[:, :n], q.dtype) for c in (k_cache, v_cache))
    outs = []
    for blk in plan:
        keys = torch.cat([ctx_k[:, : blk.entries], ring_k[:, : blk.ring], k[:, blk.lo : blk.end]], 1)
        vals = torch.cat([ctx_v[:, : blk.entries], ring_v[:, : blk.ring], v[:, blk.lo : blk.end]], 1)
        o = F.scaled_dot_product_attention(q[:, blk.start : blk.end].transpose(1, 2), keys.transpose(1, 2),
                                           vals.transpose(1, 2), attn_mask=blk.mask, scale=scale, enable_gqa=gqa)
        outs.append(o.transpose(1, 2) * blk.seen)
    return torch.cat(outs, 1)
