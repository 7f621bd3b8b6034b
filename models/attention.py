"""Attention under the boundary-plus-window pattern, without a T x T mask.

Query t sees key s iff  s <= t <= last_query(s)  (models/kv_spec.py: a boundary stays visible for
good, any other key for `window` positions). Full causal attention is the case where every key is
a boundary; a sliding window the case where none is. `block_attention` serves whole sequences
(training, the dense reference's prefill): queries go in blocks, and each block gathers only the
keys any of its queries can see (all boundaries so far plus a band), so the cost is
O(T * (T/P + block + window)). `gathered_attention` serves the dense reference's decode, where
each row attends over keys already gathered from its cache. The engine's paged pools are read by
the ops in kernels/ (models/paged.py says what they read).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .kv_spec import last_query, sees, visible


def block_attention(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, k_bnd: Tensor, window: int, block: int = 128,
) -> Tensor:
    """q: [B, T, H, D] at increasing positions q_pos [T]; k, v: [B, S, H, D] at k_pos [S], with
    k_bnd [S] marking boundaries (each position appears once among the keys). -> [B, T, H, D]."""
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, *, D]
    T = q.shape[1]
    gqa = k.shape[2] != q.shape[2]  # grouped-query: query head i reads KV head i // (H / Hkv)
    if bool(k_bnd.all()) and k.shape[1] == T and torch.equal(q_pos, k_pos):
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=gqa).transpose(1, 2)
    k_last = last_query(k_pos, k_bnd, window)
    outs = []
    for a in range(0, T, block):
        t = q_pos[a : a + block]
        cand = (k_pos <= t[-1]) & (k_last >= t[0])  # keys some query of the block sees
        idx = cand.nonzero().squeeze(1)
        mask = sees(t[:, None], k_pos[idx], k_last[idx])  # [Tb, n]
        outs.append(F.scaled_dot_product_attention(qh[:, :, a : a + block], kh[:, :, idx], vh[:, :, idx], attn_mask=mask,
                                                   enable_gqa=gqa))
    return torch.cat(outs, 2).transpose(1, 2)


def gathered_attention(q: Tensor, parts: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """One query per row over keys in several parts (e.g. boundary entries and the window ring),
    joined in one softmax without copying the keys together.

    q: [B, H, D]; each part (k, v, valid): k, v [B, M_i, Hkv, D], valid [B, M_i] bool. -> [B, H, D].
    """
    B, H, D = q.shape
    Hkv = parts[0][0].shape[2]
    qf = q.float().view(B, Hkv, H // Hkv, D) / math.sqrt(D)  # query heads grouped by KV head
    scores = torch.cat([torch.einsum("bkgd,bmkd->bkgm", qf, k.float()).masked_fill(~valid[:, None, None, :], float("-inf"))
                        for k, _, valid in parts], -1)
    probs = torch.softmax(scores, -1).split([k.shape[1] for k, _, _ in parts], -1)
    out = sum(torch.einsum("bkgm,bmkd->bkgd", p, v.float()) for p, (_, v, _) in zip(probs, parts))
    return out.reshape(B, H, D).to(q.dtype)


def dense_attention_ref(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, bnd: Tensor, window: int) -> Tensor:
    """Naive reference: a dense T x T mask over one sequence's own keys. q [B, T, H, D], k, v [B, T, Hkv, D]."""
    mask = visible(pos, pos, bnd, window)
    k, v = (x.repeat_interleave(q.shape[2] // k.shape[2], 2) for x in (k, v))
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    return torch.einsum("bhts,bshd->bthd", probs, v.float()).to(q.dtype)
