"""One query per sequence over its paged boundary entries plus its window ring, one softmax.

Row b reads boundary entries 0 .. context_lens[b]-1 through its block table (entry e lives in
block block_tables[b, e // block_size] at offset e % block_size) and the ring entries of state
slot slots[b] that win_mask[b] selects (the window positions that are not boundaries: a
boundary inside the window is read once, from the blocks). Query heads share KV heads in groups
(grouped-query attention: query head i reads KV head i // (H / Hkv)). Padding rows (slot -1)
give zeros.
`decode_attention_ref` is the PyTorch reference and the CPU path: it gathers the row's blocks
(the one copy it makes); the Triton kernel reads them in place.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._rows import cast, live_rows


def decode_attention_ref(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
    win_k: Tensor, win_v: Tensor, slots: Tensor, win_mask: Tensor, scale: float,
) -> Tensor:
    """q [B, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, M] int;
    context_lens [B]; win_k, win_v [S, W, Hkv, D]; slots [B] (-1: padding); win_mask [B, W] bool.
    Returns [B, H, D] in q's dtype."""
    live = live_rows(slots)
    if live is not None:
        out = torch.zeros_like(q)
        out[live] = decode_attention_ref(q[live], k_cache, v_cache, block_tables[live], context_lens[live],
                                         win_k, win_v, slots[live], win_mask[live], scale)
        return out
    B, H, D = q.shape
    Hkv = k_cache.shape[2]
    f32 = torch.float32
    qg = cast(q, f32).view(B, Hkv, H // Hkv, D) * scale  # [B, Hkv, G, D]
    kb = cast(k_cache[block_tables].flatten(1, 2), f32)  # [B, n, Hkv, D]
    vb = cast(v_cache[block_tables].flatten(1, 2), f32)
    scores = torch.einsum("bkgd,bnkd->bkgn", qg, kb)
    scores = scores.masked_fill((torch.arange(kb.shape[1], device=q.device) >= context_lens[:, None])[:, None, None], float("-inf"))
    if win_k.shape[1]:  # the ring joins the same softmax; its scores, not its keys, are concatenated
        kw, vw = cast(win_k[slots], f32), cast(win_v[slots], f32)  # [B, W, Hkv, D]
        sw = torch.einsum("bkgd,bwkd->bkgw", qg, kw).masked_fill(~win_mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(torch.cat([scores, sw], -1), -1)
        out = torch.einsum("bkgn,bnkd->bkgd", probs[..., : kb.shape[1]], vb)
        out = out + torch.einsum("bkgw,bwkd->bkgd", probs[..., kb.shape[1] :], vw)
    else:
        out = torch.einsum("bkgn,bnkd->bkgd", torch.softmax(scores, -1), vb)
    return cast(out.reshape(B, H, D), q.dtype)
