"""One query per sequence over its paged boundary entries plus its window ring, one softmax.

Row b reads boundary entries 0 .. context_lens[b]-1 through its block table (entry e lives in
block block_tables[b, e // block_size] at offset e % block_size) and the ring entries of state
slot slots[b] that win_mask[b] selects (the window positions that are not boundaries: a
boundary inside the window is read once, from the blocks). Query heads share KV heads in groups
(grouped-query attention: query head i reads KV head i // (H / Hkv)). Padding rows (slot -1)
give zeros.
`decode_attention_ref` is the PyTorch reference and the CPU path: it gathers the row's blocks
(the one copy it makes). `decode_attention_triton` reads them in place, flash-decoding style: one
program per (row, KV head, split of the boundary entries) runs an online softmax for the KV
head's group of query heads over its split (split 0 also reads the ring), and a second launch
merges the splits by their log-sum-exp. The split count depends only on shapes (no host sync),
so the step can be captured in a CUDA graph. `decode_attention` picks one (kernels/_triton.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._rows import cast, live_rows
from ._triton import cdiv, check, jit, next_pow2, tl, use_triton

BLOCK_N = 64  # keys per tile


CPU_PROGRAMS = 8  # split target under the interpreter (on CUDA: two programs per SM)


MAX_SPLITS = 128
_LOG2E = 1.4426950408889634


def _scores(q: Tensor, k: Tensor, fused: bool) -> Tensor:
    """q [B, Hkv, G, D] . k [B, n, Hkv, D] -> [B, Hkv, G, n]. fused: as a broadcast product and a sum, which
    Inductor compiles into one loop that gathers and casts the pool's entries as it reads them (the matrix
    product of einsum needs them gathered into an fp32 copy first; eagerly the broadcast would be n x G x D)."""
    if fused:
        return (q[:, :, :, None, :] * k.permute(0, 2, 1, 3)[:, :, None]).sum(-1)
    return torch.einsum("bkgd,bnkd->bkgn", q, k)


def _weighted(p: Tensor, v: Tensor, fused: bool) -> Tensor:
    """p [B, Hkv, G, n] . v [B, n, Hkv, D] -> [B, Hkv, G, D]; fused as in _scores."""
    if fused:
        return (p[..., None] * v.permute(0, 2, 1, 3)[:, :, None]).sum(-2)
    return torch.einsum("bkgn,bnkd->bkgd", p, v)


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
    fused = torch.compiler.is_compiling()
    qg = cast(q, f32).view(B, Hkv, H // Hkv, D) * scale  # [B, Hkv, G, D]
    if fused:  # into a buffer: Inductor inlines a value with one user, so the loop would redo the query's RoPE per key
        qg = qg.as_strided(qg.shape, qg.stride())  # (its as_strided lowering realizes its input)
    kb = cast(k_cache[block_tables].flatten(1, 2), f32)  # [B, n, Hkv, D]
    vb = cast(v_cache[block_tables].flatten(1, 2), f32)
    scores = _scores(qg, kb, fused)
    scores = scores.masked_fill((torch.arange(kb.shape[1], device=q.device) >= context_lens[:, None])[:, None, None], float("-inf"))
    if win_k.shape[1]:  # the ring joins the same softmax; its scores, not its keys, are concatenated
        kw, vw = cast(win_k[slots], f32), cast(win_v[slots], f32)  # [B, W, Hkv, D]
        sw = _scores(qg, kw, fused).masked_fill(~win_mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(torch.cat([scores, sw], -1), -1)
        out = _weighted(probs[..., : kb.shape[1]], vb, fused) + _weighted(probs[..., kb.shape[1] :], vw, fused)
    else:
        out = _weighted(torch.softmax(scores, -1), vb, fused)
    return cast(out.reshape(B, H, D), q.dtype)


@jit
def _online_update(q, k, v, valid, m, l, acc, qk_scale, DOT: tl.constexpr, IEEE: tl.constexpr):
    """Fold one tile into the running max m [G], sum l [G] and output acc [G, D] (log2 domain)."""
    if DOT:  # a group of query heads: one matrix product per tile
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q.to(k.dtype), tl.trans(k))
    else:  # one query head: a dot product per key
        s = tl.sum(q.to(tl.float32) * k.to(tl.float32), 1)[None, :]
    s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    if DOT:
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
    else:
        pv = tl.sum(tl.trans(p) * v.to(tl.float32), 0)[None, :]
    return m_new, l, acc * alpha[:, None] + pv


@jit


def _attn_split_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, ctx_ptr, wk_ptr, wv_ptr, slot_ptr, wm_ptr, o_ptr, lse_ptr,
    qk_scale, block_size, split_len, num_splits,
    stride_qb, stride_qh, stride_cb, stride_co, stride_ch, stride_tb, stride_ws, stride_ww, stride_wh, stride_mb,
    stride_ob, stride_oh, stride_os,
    G: tl.constexpr, D: tl.constexpr, W: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr,
):
    """Row b, KV head kvh, split sp: the softmax over boundary entries [sp * split_len, ...) of
    its G query heads (and the ring in split 0). With one split it writes the normalised output;
    otherwise its normalised partial output and its log2-sum-exp for the merge."""
    b, kvh, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * G + g
    gd_mask = (g[:, None] < G) & (d[None, :] < D)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    m = tl.full([BLOCK_G], -1e30, tl.float32)  # finite, so fully masked tiles give exp2(-inf) = 0, not NaN
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    if slot >= 0:  # a padding row keeps l = 0: zeros
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gd_mask, other=0.0)
        ctx = tl.load(ctx_ptr + b)
        lo = sp * split_len
        hi = tl.minimum(lo + split_len, ctx)
        n = tl.arange(0, BLOCK_N)
        for start in range(lo, hi, BLOCK_N):
            e = start + n
            valid = e < hi
            block = tl.load(bt_ptr + b * stride_tb + e // block_size, mask=valid, other=0).to(tl.int64)
            off = block * stride_cb + (e % block_size) * stride_co + kvh * stride_ch
            kv_mask = valid[:, None] & (d[None, :] < D)
            k = tl.load(kc_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(vc_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            m, l, acc = _online_update(q, k, v, valid, m, l, acc, qk_scale, DOT, IEEE)
        if W > 0:
            if sp == 0:
                w = tl.arange(0, BLOCK_W)
                valid = tl.load(wm_ptr + b * stride_mb + w, mask=w < W, other=0) != 0
                off = slot * stride_ws + w * stride_ww + kvh * stride_wh
                kv_mask = valid[:, None] & (d[None, :] < D)
                k = tl.load(wk_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
                v = tl.load(wv_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
                m, l, acc = _online_update(q, k, v, valid, m, l, acc, qk_scale, DOT, IEEE)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    o_out = o_ptr + b * stride_ob + heads[:, None] * stride_oh + sp * stride_os + d[None, :]
    if SPLIT:
        tl.store(o_out, out, mask=gd_mask)
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))  # -inf: an empty split
        tl.store(lse_ptr + (b * G * tl.num_programs(1) + heads) * num_splits + sp, lse, mask=g < G)
    else:
        tl.store(o_out, out.to(o_ptr.dtype.element_ty), mask=gd_mask)


@jit


def _attn_merge_kernel(
    part_ptr, lse_ptr, out_ptr, num_splits, stride_pb, stride_ph, stride_ps, stride_ob, stride_oh,
    H: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row b, query head h: weight each split's output by its share of the softmax mass."""
    b, h = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + (b * H + h) * num_splits + s, mask=s < num_splits, other=float("-inf"))
    top = tl.maximum(tl.max(lse, 0), -1e30)  # finite even when every split is empty (a padding row)
    w = tl.exp2(lse - top)  # empty splits weigh 0
    part = tl.load(part_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
                   mask=(s[:, None] < num_splits) & (d[None, :] < D), other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def _num_splits(rows: int, n_tiles: int, device: torch.device) -> int:
    """Enough (row, KV head, split) programs to fill the GPU; known from shapes alone."""
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else CPU_PROGRAMS
    return max(1, min(n_tiles, cdiv(target, rows), MAX_SPLITS))


def decode_attention_triton(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
    win_k: Tensor, win_v: Tensor, slots: Tensor, win_mask: Tensor, scale: float,
) -> Tensor:
    """`decode_attention_ref` as one or two Triton launches (same arguments)."""
    B, H, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    W = win_k.shape[1]
    check(k_cache.shape[-1] == D and v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride(),
          f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must match, with head dim {D}")
    check(H % Hkv == 0, f"{H} query heads do not group over {Hkv} KV heads")
    check(win_k.dim() == 4 and win_k.shape[2:] == (Hkv, D) and win_v.shape == win_k.shape
          and win_v.stride() == win_k.stride(), f"ring {tuple(win_k.shape)} is not [S, W, {Hkv}, {D}]")
    check(block_tables.dim() == 2 and block_tables.shape[0] == B and context_lens.shape == (B,) and slots.shape == (B,),
          "block_tables [B, M], context_lens [B] and slots [B] must match q's rows")
    check(win_mask.shape == (B, W) and win_mask.dtype == torch.bool, f"win_mask must be [{B}, {W}] bool")
    check(q.dtype == k_cache.dtype == win_k.dtype, f"q ({q.dtype}) and the caches ({k_cache.dtype}, {win_k.dtype}) "
          "must share a dtype")
    check(k_cache.stride(-1) == 1 and win_k.stride(-1) == 1, "the caches' head dimension must be contiguous")
    out = torch.empty_like(q)
    if B == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables, win_mask = block_tables.contiguous(), win_mask.contiguous().view(torch.uint8)
    G = H // Hkv
    n_tiles = cdiv(block_tables.shape[1] * block_size, BLOCK_N)  # the most any row can read
    splits = _num_splits(B * Hkv, n_tiles, q.device)
    split_len = cdiv(n_tiles, splits) * BLOCK_N
    splits = cdiv(n_tiles, cdiv(n_tiles, splits))  # no split left empty by the rounding
    dot = G > 1
    if splits == 1:
        part, lse = out.unsqueeze(2), out  # written directly; lse is not touched
    else:
        part = torch.empty(B, H, splits, D, device=q.device, dtype=torch.float32)
        lse = torch.empty(B, H, splits, device=q.device, dtype=torch.float32)
    BLOCK_D = next_pow2(D)
    # a group of query heads uses tl.dot, whose operands need 16 rows and columns at least
    tile = (lambda n: max(16, next_pow2(n))) if dot else next_pow2
    _attn_split_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, win_k, win_v, slots, win_mask, part, lse,
        scale * _LOG2E, block_size, split_len, splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        win_k.stride(0), win_k.stride(1), win_k.stride(2), win_mask.stride(0), part.stride(0), part.stride(1),
        part.stride(2),
        G=G, D=D, W=W, SPLIT=splits > 1, BLOCK_G=tile(G), BLOCK_D=tile(D), BLOCK_N=tile(BLOCK_N), BLOCK_W=tile(W),
        DOT=dot, IEEE=k_cache.dtype == torch.float32,
    )
    if splits > 1:
        _attn_merge_kernel[(B, H)](
            part, lse, out, splits, part.stride(0), part.stride(1), part.stride(2), out.stride(0), out.stride(1),
            H=H, D=D, BLOCK_S=next_pow2(splits), BLOCK_D=BLOCK_D,
        )
    return out


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
    win_k: Tensor, win_v: Tensor, slots: Tensor, win_mask: Tensor, scale: float,
) -> Tensor:
    """The kernels on CUDA (or when forced), else the reference."""
    fn = decode_attention_triton if use_triton(q) else decode_attention_ref
    return fn(q, k_cache, v_cache, block_tables, context_lens, win_k, win_v, slots, win_mask, scale)
