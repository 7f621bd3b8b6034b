"""The paged layout: views of the engine's cache pools, and what one step's layers read from them.

The engine's model runner owns the pools and builds one metadata object per step, before the layer
loop, on the model's device (as nano-vllm's context and vLLM's attention metadata): no layer
rebuilds an index or syncs with the host for it. `build_decode_metadata` and
`build_prefill_metadata` are the one place that turns positions, slots and block tables into the
entries the ops in kernels/ write and read; which positions are kept, where the ring keeps them
and which keys a query sees, they ask models/kv_spec.py. Both are pure: the runner records the
ring's positions itself after a step (`record_ring`, from the metadata's `win_store`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kernels.prefill_attention import QueryBlock, prefill_plan

from .kv_spec import CacheSpec, KeySpec
from .layers import rope_tables


@dataclass
class LayerCache:
    """One layer's views of the pools (the runner owns the memory)."""

    k: Tensor  # [num_blocks, block_size, Hkv, D] boundary entries (every key, for full attention)
    v: Tensor
    win_k: Tensor  # [S, W, Hkv, D] ring of the last W K/V, entry = CacheSpec.ring_slot (W may be 0)
    win_v: Tensor
    conv: Tensor | None  # [2, S, C, conv_width - 1] K- and V-SSM conv histories (SSM kinds)
    ssm: Tensor | None  # [2, S, h, E/h, N] fp32 recurrent states

    # the same memory as [entries, Hkv, D] rows, where store_kv writes (views taken when used: a
    # compiled step must not get two aliasing views of one pool as inputs)
    @property
    def k_flat(self) -> Tensor:
        return self.k.flatten(0, 1)

    @property
    def v_flat(self) -> Tensor:
        return self.v.flatten(0, 1)

    @property
    def win_k_flat(self) -> Tensor:
        return self.win_k.flatten(0, 1)

    @property
    def win_v_flat(self) -> Tensor:
        return self.win_v.flatten(0, 1)


@dataclass
class DecodeMetadata:
    """One decode step: row b computes the token at positions[b] of the sequence in slot slots[b]."""

    positions: Tensor  # [B]
    slots: Tensor  # [B] state slot, -1 for a padding row
    block_tables: Tensor  # [B, M] boundary blocks of each row
    reset: Tensor  # [L, B] the SSMs start a new chunk at this token
    bnd_store: Tensor  # [L, B] flat boundary entry this token is written to, -1 when not a boundary
    bnd_count: Tensor  # [L, B] boundary entries each row reads, this token's included
    win_store: Tensor  # [B] flat ring entry (slot * W + ring slot), -1 for padding
    win_mask: Tensor  # [L, B, W] ring entries each row reads (in the window, not a boundary)
    cos: Tensor  # [B, 1, D] RoPE tables at positions
    sin: Tensor

    def layers(self) -> list["LayerMetadata"]:
        """What each layer's decode reads: the shared fields and its rows of the per-layer ones (views)."""
        return [LayerMetadata(self.slots, self.block_tables, self.win_store, self.cos, self.sin, *rows)
                for rows in zip(*(t.unbind(0) for t in (self.reset, self.bnd_store, self.bnd_count, self.win_mask)))]


@dataclass
class LayerMetadata:
    """One layer's view of a DecodeMetadata. Every layer's view has the same tensor shapes and no
    layer index, so one compiled Block.forward serves every layer (engine/compiled_decode.py)."""

    slots: Tensor  # [B]
    block_tables: Tensor  # [B, M]
    win_store: Tensor  # [B]
    cos: Tensor  # [B, 1, D]
    sin: Tensor
    reset: Tensor  # [B]
    bnd_store: Tensor  # [B]
    bnd_count: Tensor  # [B]
    win_mask: Tensor  # [B, W]


def _flat_entry(block_tables: Tensor, entry: Tensor, block_size: int) -> Tensor:
    """The pool row of boundary entry `entry` [L, B, ...] of each row b, through its block table
    [B, M] (entries past the table read its last block: callers mask them)."""
    rows = torch.arange(block_tables.shape[0], device=entry.device).view(-1, *([1] * (entry.dim() - 2)))
    block = block_tables[rows, (entry // block_size).clamp(max=block_tables.shape[1] - 1)]
    return block * block_size + entry % block_size


def _ring_entry(spec: CacheSpec, slots: Tensor, positions: Tensor) -> Tensor:
    """The flat ring row (slot * W + ring slot) of positions [B, ...] of the sequences in slots [B]."""
    return slots.view(-1, *([1] * (positions.dim() - 1))) * spec.window_slots + spec.ring_slot(positions)


def build_decode_metadata(
    spec: CacheSpec, positions: Tensor, slots: Tensor, block_tables: Tensor, win_pos: Tensor,
    block_size: int, head_dim: int, rope_theta: float,
) -> DecodeMetadata:
    """Index every write and read of one decode step; win_pos [S, W]: the ring's positions before it."""
    live = slots >= 0
    before = spec.num_entries(positions)  # [L, B]
    is_bnd = spec.is_boundary(positions) & live
    bnd_store = torch.where(is_bnd, _flat_entry(block_tables, before, block_size), -1)
    W = spec.window_slots
    if W:
        ring = spec.ring_slot(positions)
        wp = win_pos[slots.clamp(min=0)]  # [B, W]
        wp = torch.where(torch.arange(W, device=wp.device) == ring[:, None], positions[:, None], wp)  # this token's entry
        win_mask = spec.ring_reads(positions[:, None], wp) & live[:, None]
        win_store = torch.where(live, _ring_entry(spec, slots, positions), -1)
    else:
        win_mask = torch.zeros(len(spec.layers), len(positions), 0, dtype=torch.bool, device=positions.device)
        win_store = torch.full_like(positions, -1)
    cos, sin = rope_tables(positions, head_dim, rope_theta)
    return DecodeMetadata(positions, slots, block_tables, spec.chunk_start(positions), bnd_store,
                          (before + is_bnd.long()) * live, win_store, win_mask, cos, sin)


@dataclass
class PrefillMetadata:
    """One step's prefill chunks, rows right-padded to T tokens: row b computes positions
    starts[b] .. starts[b] + last[b] of the sequence in slot slots[b]. The chunk's boundary K/V
    are stored before its attention (its queries read them from the blocks), its ring K/V after
    (earlier queries still read the entries they replace)."""

    starts: Tensor  # [B]
    last: Tensor  # [B] index of each row's last token
    positions: Tensor  # [B, T]
    slots: Tensor  # [B]
    block_tables: Tensor  # [B, M]
    bnd_store: Tensor  # [L, B * T] flat boundary entry each token is written to, -1 when none
    bnd_count: Tensor  # [L, B, T] boundary entries each query reads, its own included (0: padding)
    key_last: Tensor  # [L, B, T] last position reading each chunk key as a window key (-1: none)
    win_last: Tensor  # [L, B, W] last position reading each ring entry (-1: none)
    win_store: Tensor  # [B * T] flat ring entry each token is written to (each row's newest W), -1 when none
    plans: dict[KeySpec, list[QueryBlock]] = field(default_factory=dict, repr=False)  # made by plan()

    def plan(self, layer: int, spec: KeySpec) -> list[QueryBlock]:
        """The prefill attention's plan for layer `layer` (kernels/prefill_attention.py), made once for every
        layer with its key rule `spec`: such layers' metadata are the same."""
        if spec not in self.plans:
            self.plans[spec] = prefill_plan(self.positions, self.key_last[layer], self.bnd_count[layer],
                                            self.win_last[layer], spec.window)
        return self.plans[spec]


def build_prefill_metadata(
    spec: CacheSpec, starts: Tensor, lengths: Tensor, slots: Tensor, block_tables: Tensor, win_pos: Tensor,
    block_size: int, width: int,
) -> PrefillMetadata:
    """Index every write and read of one step's prefill chunks: row b holds lengths[b] tokens from
    position starts[b], rows `width` wide; win_pos [S, W]: the ring's positions before the step
    (empty for rows that start a sequence)."""
    offsets = torch.arange(width, device=starts.device)
    positions = starts[:, None] + offsets  # [B, T]
    real = offsets < lengths[:, None]
    before = spec.num_entries(positions)  # [L, B, T]
    is_bnd = spec.is_boundary(positions) & real
    bnd_store = torch.where(is_bnd, _flat_entry(block_tables, before, block_size), -1)
    key_last = torch.where(real, spec.window_last(positions), -1)
    W = spec.window_slots
    if W:
        win_last = spec.window_last(win_pos[slots])  # [L, B, W]
        newest = real & (offsets >= lengths[:, None] - W)
        win_store = torch.where(newest, _ring_entry(spec, slots, positions), -1)
    else:
        win_last = torch.zeros(len(spec.layers), len(starts), 0, dtype=torch.long, device=starts.device)
        win_store = torch.full_like(positions, -1)
    return PrefillMetadata(starts, lengths - 1, positions, slots, block_tables, bnd_store.flatten(1),
                           (before + is_bnd.long()) * real, key_last, win_last, win_store.flatten())


def record_ring(win_pos: Tensor, win_store: Tensor, positions: Tensor) -> None:
    """Note in win_pos [S, W] the positions a step wrote into the ring: win_store holds the flat
    ring entry of each of positions (the same shape, -1: none)."""
    if win_pos.shape[1]:
        keep = win_store >= 0
        win_pos.view(-1)[win_store[keep]] = positions.flatten()[keep]


def _pad(t: Tensor, axis: int, size: int, fill) -> Tensor:
    """t grown along `axis` to `size`, the new entries `fill` (t itself when it has that size)."""
    if t.shape[axis] == size:
        return t
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
