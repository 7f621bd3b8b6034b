"""Explicit decode state for the reference (non-paged) path, and exact cache-size accounting.

Per layer a sequence keeps: the boundary K/V seen so far (every K/V for full-attention kinds),
a ring of `window_slots` recent K/V (attamba: L+1, sliding: W_len), and for SSM kinds the two
SSMs' recurrent and conv states. Boundary entries are stored when produced, so a boundary that
is also in the window is read once, from the boundary list.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .attention import block_attention, gathered_attention
from .config import ModelConfig
from .kv_spec import CacheSpec, KeySpec
from .lm import LM, AttendFn, LayerSSMState


@dataclass
class LayerKV:
    """Keys/values one layer keeps for a batch of sequences."""

    bnd_k: Tensor  # [B, M, H, D] boundary keys (after RoPE), M = capacity
    bnd_v: Tensor  # [B, M, H, D]
    bnd_len: Tensor  # [B] entries in use
    win_k: Tensor  # [B, W, H, D] ring buffer, entry = KeySpec.ring_slot(position)
    win_v: Tensor  # [B, W, H, D]
    win_pos: Tensor  # [B, W] position held by each slot, -1 when empty

    def nbytes(self) -> int:
        return sum(t.nelement() * t.element_size() for t in (self.bnd_k, self.bnd_v, self.win_k, self.win_v))


@dataclass
class LayerState:
    kv: LayerKV
    ssm: LayerSSMState | None


@dataclass
class DecodeState:
    """Everything decoding needs for a batch: per-row next position and per-layer state."""

    pos: Tensor  # [B] tokens consumed so far = position of the next token
    layers: list[LayerState]

    def cache_nbytes(self) -> int:
        """Bytes of cached K/V, SSM and conv tensors (index bookkeeping excluded)."""
        return sum(ls.kv.nbytes() + (ls.ssm.nbytes() if ls.ssm else 0) for ls in self.layers)


def state_bytes(cfg: ModelConfig, n: int, kv_dtype: torch.dtype = torch.float16,
                conv_dtype: torch.dtype | None = None) -> int:
    """Exact bytes one sequence of n tokens holds in the decode cache of model `cfg` (SSM states fp32)."""
    return CacheSpec.from_config(cfg).seq_bytes(n, kv_dtype, conv_dtype)


def full_kv_bytes(cfg: ModelConfig, n: int, kv_dtype: torch.dtype = torch.float16) -> int:
    """Bytes a full-KV transformer with the same width and depth holds for n tokens."""
    return CacheSpec.from_config(cfg).full_kv_bytes(n, kv_dtype)


def _write(kv: LayerKV, spec: KeySpec, is_bnd: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> None:
    """Store one new K/V per row at positions pos [B] (k, v: [B, H, D])."""
    rows = torch.arange(k.shape[0], device=k.device)
    if bool(is_bnd.any()):
        need = int((kv.bnd_len + is_bnd.long()).max())
        if need > kv.bnd_k.shape[1]:  # grow to exactly what is needed
            extra = need - kv.bnd_k.shape[1]
            kv.bnd_k = torch.cat([kv.bnd_k, kv.bnd_k.new_zeros(k.shape[0], extra, *k.shape[1:])], 1)
            kv.bnd_v = torch.cat([kv.bnd_v, kv.bnd_v.new_zeros(k.shape[0], extra, *k.shape[1:])], 1)
        r = rows[is_bnd]
        kv.bnd_k[r, kv.bnd_len[r]] = k[r].to(kv.bnd_k.dtype)
        kv.bnd_v[r, kv.bnd_len[r]] = v[r].to(kv.bnd_v.dtype)
        kv.bnd_len += is_bnd.long()
    if spec.window_slots:
        slot = spec.ring_slot(pos)
        kv.win_k[rows, slot] = k.to(kv.win_k.dtype)
        kv.win_v[rows, slot] = v.to(kv.win_v.dtype)
        kv.win_pos[rows, slot] = pos


def _decode_attend(model: LM, state: DecodeState) -> AttendFn:
    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        kv = state.layers[layer].kv
        spec = model.blocks[layer].attn.spec
        _write(kv, spec, spec.is_boundary(pos), k, v, pos)
        m = kv.bnd_k.shape[1]
        parts = [(kv.bnd_k, kv.bnd_v, torch.arange(m, device=q.device)[None, :] < kv.bnd_len[:, None])]
        if spec.window_slots:
            parts.append((kv.win_k, kv.win_v, spec.ring_reads(pos[:, None], kv.win_pos)))
        return gathered_attention(q, parts)

    return attend


@torch.no_grad()
def prefill(model: LM, input_ids: Tensor, lengths: Tensor | None = None,
            kv_dtype: torch.dtype | None = None, reserve: int = 0) -> tuple[Tensor, DecodeState]:
    """Run right-padded prompts [B, T] (row b has lengths[b] real tokens, >= 1).

    Returns the logits [B, T, V] and the decode state after each row's last real token.
    reserve: boundary capacity to preallocate for that many future tokens (else grown exactly).
    """
    bsz, T = input_ids.shape
    dev = input_ids.device
    lengths = torch.full((bsz,), T, device=dev) if lengths is None else lengths.to(dev)
    kv_dtype = kv_dtype or model.dtype
    layers: list[LayerKV] = []

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        spec = model.blocks[layer].attn.spec
        is_bnd = spec.is_boundary(pos)
        extra = int(spec.num_entries(T + reserve) - spec.num_entries(T))
        layers.append(_collect(spec, k, v, pos, is_bnd, lengths, kv_dtype, extra))
        return block_attention(q, k, v, pos, pos, is_bnd, spec.window)

    hidden, ssm = model.extend(input_ids, 0, None, lengths - 1, attend)
    state = DecodeState(
        pos=lengths.clone(),
        layers=[LayerState(kv, ssm[i] if ssm else None) for i, kv in enumerate(layers)],
    )
    return model.logits(hidden), state


def _collect(spec: KeySpec, k: Tensor, v: Tensor, pos: Tensor, is_bnd: Tensor, lengths: Tensor,
             kv_dtype: torch.dtype, extra: int = 0) -> LayerKV:
    """Build one layer's cache from a prefill's K/V [B, T, H, D]."""
    bsz = k.shape[0]
    H, D = k.shape[2:]
    dev = k.device
    counts = torch.stack([is_bnd[: int(n)].sum() for n in lengths])
    m = int(counts.max()) + extra
    bnd_k = k.new_zeros(bsz, m, H, D, dtype=kv_dtype)
    bnd_v = torch.zeros_like(bnd_k)
    for b in range(bsz):
        sel = is_bnd & (pos < lengths[b])
        bnd_k[b, : int(counts[b])] = k[b, sel]
        bnd_v[b, : int(counts[b])] = v[b, sel]
    W = spec.window_slots
    win_k = k.new_zeros(bsz, W, H, D, dtype=kv_dtype)
    win_v = torch.zeros_like(win_k)
    win_pos = torch.full((bsz, W), -1, dtype=torch.long, device=dev)
    for b in range(bsz):
        n = int(lengths[b])
        p = torch.arange(max(0, n - W), n, device=dev)
        ring = spec.ring_slot(p)
        win_k[b, ring] = k[b, p].to(kv_dtype)
        win_v[b, ring] = v[b, p].to(kv_dtype)
        win_pos[b, ring] = p
    return LayerKV(bnd_k, bnd_v, counts.to(dev), win_k, win_v, win_pos)


@torch.no_grad()
def decode_step(model: LM, tokens: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
    """Feed one token per row at the row's next position -> logits [B, V]; updates state in place."""
    ssm_in = [ls.ssm for ls in state.layers] if model.config.has_ssm else None
    logits, ssm_out = model.step(tokens, state.pos, ssm_in, _decode_attend(model, state))
    if ssm_out is not None:
        for ls, st in zip(state.layers, ssm_out):
            ls.ssm = st
    state.pos = state.pos + 1
    return logits, state
