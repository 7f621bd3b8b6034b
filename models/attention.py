"""Attention under the boundary-plus-window pattern, without a T x T mask.

Query t sees key s iff  s <= t  and  (s is a boundary  or  s >= t - window).
Full causal attention is the case where every key is a boundary; a sliding window the case
where none is. `block_attention` serves whole sequences and chunked prefill: queries go in
blocks, and each block gathers only the keys any of its queries can see (all boundaries so far
plus a band), so the cost is O(T * (T/P + block + window)). `gathered_attention` serves decode,
where each row attends over keys already gathered from its cache.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def expand_kv(x: Tensor, heads: int, dim: int) -> Tensor:
    """GQA: repeat each key/value head of x (heads along `dim`) to serve `heads` query heads.

    Query head h reads key/value head h // (heads / kv_heads), as in Hugging Face's repeat_kv.
    """
    return x if x.shape[dim] == heads else x.repeat_interleave(heads // x.shape[dim], dim)


def visible(q_pos: Tensor, k_pos: Tensor, k_bnd: Tensor, window: int) -> Tensor:
    """Dense visibility [..., Tq, S] for query positions [..., Tq] and keys [..., S]."""
    t, s = q_pos[..., :, None], k_pos[..., None, :]
    return (s <= t) & (k_bnd[..., None, :] | (s >= t - window))


def block_attention(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, k_bnd: Tensor, window: int, block: int = 128,
) -> Tensor:
    """q: [B, T, H, D] at increasing positions q_pos [T]; k, v: [B, S, Hkv, D] at k_pos [S], with
    k_bnd [S] marking boundaries (each position appears once among the keys). -> [B, T, H, D]."""
    H = q.shape[2]
    qh, kh, vh = q.transpose(1, 2), expand_kv(k, H, 2).transpose(1, 2), expand_kv(v, H, 2).transpose(1, 2)  # GQA
    T = q.shape[1]
    if bool(k_bnd.all()) and k.shape[1] == T and torch.equal(q_pos, k_pos):
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).transpose(1, 2)
    outs = []
    for a in range(0, T, block):
        t = q_pos[a : a + block]
        cand = (k_pos <= t[-1]) & (k_bnd | (k_pos >= t[0] - window))  # keys any query here sees
        idx = cand.nonzero().squeeze(1)
        mask = visible(t, k_pos[idx], k_bnd[idx], window)  # [Tb, n]
        outs.append(F.scaled_dot_product_attention(qh[:, :, a : a + block], kh[:, :, idx], vh[:, :, idx], attn_mask=mask))
    return torch.cat(outs, 2).transpose(1, 2)


def gathered_attention(q: Tensor, parts: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """One query per row over keys in several parts (e.g. boundary entries and the window ring),
    joined in one softmax without copying the keys together.

    q: [B, H, D]; each part (k, v, valid): k, v [B, M_i, Hkv, D], valid [B, M_i] bool. -> [B, H, D].
    """
    qf = q.float() / math.sqrt(q.shape[-1])
    parts = [(expand_kv(k, q.shape[1], 2), expand_kv(v, q.shape[1], 2), valid) for k, v, valid in parts]  # GQA
    scores = torch.cat([torch.einsum("bhd,bmhd->bhm", qf, k.float()).masked_fill(~valid[:, None, :], float("-inf"))
                        for k, _, valid in parts], -1)
    probs = torch.softmax(scores, -1).split([k.shape[1] for k, _, _ in parts], -1)
    out = sum(torch.einsum("bhm,bmhd->bhd", p, v.float()) for p, (_, v, _) in zip(probs, parts))
    return out.to(q.dtype)


def dense_attention_ref(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, bnd: Tensor, window: int) -> Tensor:
    """Naive reference: a dense T x T mask over one sequence's own keys. q: [B, T, H, D]; k, v: [B, T, Hkv, D]."""
    mask = visible(pos, pos, bnd, window)
    k, v = expand_kv(k, q.shape[2], 2), expand_kv(v, q.shape[2], 2)  # GQA
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    return torch.einsum("bhts,bshd->bthd", probs, v.float()).to(q.dtype)
