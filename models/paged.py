"""What a decode step's layers read: views of the engine's cache pools, and one step's metadata.

The engine's model runner owns the pools and builds `DecodeMetadata` once per step, before the
layer loop, on the model's device (as nano-vllm's context and vLLM's attention metadata): no
layer rebuilds an index or syncs with the host. `build_decode_metadata` is the one place that
turns positions, slots and block tables into what the fused decode ops (kernels/) take.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .kv_spec import CacheSpec
from .layers import rope_tables


@dataclass
class LayerCache:
    """One layer's views of the pools (the runner owns the memory)."""

    k: Tensor  # [num_blocks, block_size, Hkv, D] boundary entries (every key, for full attention)
    v: Tensor
    win_k: Tensor  # [S, W, Hkv, D] ring of the last W K/V, entry = position % W (W may be 0)
    win_v: Tensor
    conv: Tensor | None  # [2, S, C, conv_width - 1] K- and V-SSM conv histories (SSM kinds)
    ssm: Tensor | None  # [2, S, h, E/h, N] fp32 recurrent states

    def __post_init__(self) -> None:
        # the same memory as [entries, Hkv, D] rows, where store_kv writes
        self.k_flat, self.v_flat = self.k.flatten(0, 1), self.v.flatten(0, 1)
        self.win_k_flat, self.win_v_flat = self.win_k.flatten(0, 1), self.win_v.flatten(0, 1)


@dataclass
class DecodeMetadata:
    """One decode step: row b computes the token at positions[b] of the sequence in slot slots[b]."""

    positions: Tensor  # [B]
    slots: Tensor  # [B] state slot, -1 for a padding row
    block_tables: Tensor  # [B, M] boundary blocks of each row
    reset: Tensor  # [L, B] the SSMs start a new chunk at this token
    bnd_store: Tensor  # [L, B] flat boundary entry this token is written to, -1 when not a boundary
    bnd_count: Tensor  # [L, B] boundary entries each row reads, this token's included
    win_store: Tensor  # [B] flat ring entry (slot * W + position % W), -1 for padding
    win_mask: Tensor  # [L, B, W] ring entries each row reads (in the window, not a boundary)
    cos: Tensor  # [B, 1, D] RoPE tables at positions
    sin: Tensor


def build_decode_metadata(
    spec: CacheSpec, positions: Tensor, slots: Tensor, block_tables: Tensor, win_pos: Tensor,
    block_size: int, head_dim: int, rope_theta: float,
) -> DecodeMetadata:
    """Index every write and read of one decode step; records positions in win_pos [S, W] (in place)."""
    live = slots >= 0
    before = spec.num_entries(positions)  # [L, B]
    is_bnd = spec.is_boundary(positions) & live
    rows = torch.arange(len(positions), device=positions.device)
    block = block_tables[rows, (before // block_size).clamp(max=block_tables.shape[1] - 1)]  # [L, B]
    bnd_store = torch.where(is_bnd, block * block_size + before % block_size, -1)
    W = spec.window_slots
    if W:
        ring = positions % W
        win_pos[slots[live], ring[live]] = positions[live]
        wp = win_pos[slots.clamp(min=0)]  # [B, W]
        win_mask = (wp >= 0) & (wp >= positions[:, None] - spec.window) & ~spec.is_boundary(wp) & live[:, None]
        win_store = torch.where(live, slots * W + ring, -1)
    else:
        win_mask = torch.zeros(len(spec.layers), len(positions), 0, dtype=torch.bool, device=positions.device)
        win_store = torch.full_like(positions, -1)
    cos, sin = rope_tables(positions, head_dim, rope_theta)
    return DecodeMetadata(positions, slots, block_tables, spec.chunk_start(positions), bnd_store,
                          (before + is_bnd.long()) * live, win_store, win_mask, cos, sin)


def _pad(t: Tensor, axis: int, size: int, fill) -> Tensor:
    """t grown along `axis` to `size`, the new entries `fill`."""
    shape = list(t.shape)
    shape[axis] = size - shape[axis]
    return torch.cat([t, torch.full(shape, fill, dtype=t.dtype, device=t.device)], axis)


def pad_decode_metadata(meta: DecodeMetadata, size: int, max_blocks: int) -> DecodeMetadata:
    """meta for `size` rows and block tables `max_blocks` wide: the extra rows are padding rows
    (slot -1: computed by every op, stored nowhere, attending to nothing), as a captured CUDA
    graph of a fixed batch size needs."""
    tables = _pad(meta.block_tables, 1, max_blocks, 0)
    return DecodeMetadata(
        positions=_pad(meta.positions, 0, size, 0), slots=_pad(meta.slots, 0, size, -1),
        block_tables=_pad(tables, 0, size, 0), reset=_pad(meta.reset, 1, size, False),
        bnd_store=_pad(meta.bnd_store, 1, size, -1), bnd_count=_pad(meta.bnd_count, 1, size, 0),
        win_store=_pad(meta.win_store, 0, size, -1), win_mask=_pad(meta.win_mask, 1, size, False),
        cos=_pad(meta.cos, 0, size, 1.0), sin=_pad(meta.sin, 0, size, 0.0),
    )
