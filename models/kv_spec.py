"""The one place that says which keys a layer keeps and what a sequence's cache costs.

Every kind is a boundary list plus a window:
  attamba      boundaries B_l (the last token of each chunk, cut at the layer's offset), window L+1
  pseudo, transformer, reduced   every position is a boundary, no window
  sliding      no boundaries, a window of W_len positions
Query t sees key s iff s <= t <= last_query(s): a boundary stays visible for good, any other key
for `window` positions after its own (the window rule, `last_query`).
A decoding sequence keeps, per layer, one K/V entry per boundary passed so far (paged blocks) and
a ring of `window_slots` recent K/V, position p in ring entry `ring_slot(p)`; a boundary inside the
window is stored and read once, as a boundary, so the ring serves only the other keys
(`window_last`, `ring_reads`). SSM kinds also keep the K- and V-SSM recurrent (fp32) and conv states.
`KeySpec` answers for one layer, `CacheSpec` for the whole model: the attention masks, the
engine's cache layout and step metadata (models/paged.py), the dense reference state and the
paper's cost table all ask them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from .config import ModelConfig

ALL, CHUNKS, NONE = "all", "chunks", "none"
FOREVER = 1 << 62  # last_query of a boundary


def _nbytes(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


# The chunk rule, for one layer (int offset) or all layers at once (offset Tensor [L, 1, ...]).
def is_boundary(pos: Tensor, chunk_size: int, offset) -> Tensor:
    """Membership in B_l = {0} U {(k+1)P - 1 - o_l}: the last token of each chunk."""
    return (pos == 0) | ((pos + 1 + offset) % chunk_size == 0)


def chunk_start(pos: Tensor, chunk_size: int, offset) -> Tensor:
    """Where a new chunk starts and the SSMs reset: t = 0 or t - 1 in B_l."""
    return (pos == 0) | ((pos >= 1) & is_boundary(pos - 1, chunk_size, offset))


def num_boundaries(n, chunk_size: int, offset):
    """|{b in B_l : b < n}| (int or Tensor n and offset)."""
    # boundaries (k+1)P - 1 - o below n, plus {0}; with o = P-1 the first of them is 0 itself
    return (1 + (n + offset) // chunk_size - (offset == chunk_size - 1) * 1) * (n > 0)


# The window rule, given which keys are boundaries (is_bnd broadcasting against pos).
def last_query(pos: Tensor, is_bnd: Tensor, window: int) -> Tensor:
    """The last query position that sees the key at pos: FOREVER for a boundary, else pos + window."""
    return torch.where(is_bnd, FOREVER, pos + window)


def sees(q_pos: Tensor, k_pos: Tensor, k_last: Tensor) -> Tensor:
    """Whether the query at q_pos sees the key at k_pos whose last query is k_last (broadcasting)."""
    return (k_pos <= q_pos) & (q_pos <= k_last)


def visible(q_pos: Tensor, k_pos: Tensor, k_bnd: Tensor, window: int) -> Tensor:
    """Dense visibility [..., Tq, S] of keys at k_pos [..., S] (boundaries k_bnd) to queries at q_pos [..., Tq]."""
    return sees(q_pos[..., :, None], k_pos[..., None, :], last_query(k_pos, k_bnd, window)[..., None, :])


def window_last(pos: Tensor, is_bnd: Tensor, window: int) -> Tensor:
    """The paged layout's split of the rule: boundaries are read from the blocks (by count), every
    other key through the window (the ring, or a prefill chunk's band) up to the query at the
    position returned; -1 (no query) for a boundary or an empty ring entry (pos -1)."""
    return torch.where(is_bnd | (pos < 0), -1, last_query(pos, is_bnd, window))


@dataclass(frozen=True)
class KeySpec:
    """Which positions of one layer stay visible as keys, and what they cost."""

    boundaries: str  # ALL | CHUNKS | NONE
    chunk_size: int  # P (CHUNKS)
    offset: int  # o_l (CHUNKS): where this layer cuts its chunks
    window: int  # besides boundaries, query t sees keys s >= t - window
    window_slots: int  # ring entries a decoding sequence keeps
    kv_width: int  # channels of one K (= of one V): kv heads x head width

    def is_boundary(self, pos: Tensor) -> Tensor:
        """Whether key position(s) pos stay visible to every later query."""
        if self.boundaries == CHUNKS:
            return is_boundary(pos, self.chunk_size, self.offset)
        return torch.full_like(pos, self.boundaries == ALL, dtype=torch.bool)

    def num_entries(self, n):
        """Boundary entries kept for positions < n (int or Tensor n)."""
        if self.boundaries == ALL:
            return n
        if self.boundaries == NONE:
            return n * 0
        return num_boundaries(n, self.chunk_size, self.offset)

    def last_query(self, pos: Tensor) -> Tensor:
        """The last query position that sees the key at pos (FOREVER for a boundary)."""
        return last_query(pos, self.is_boundary(pos), self.window)

    def visible(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Dense mask [..., Tq, S]: query t sees key s iff s <= t <= last_query(s)."""
        return visible(q_pos, k_pos, self.is_boundary(k_pos), self.window)

    def window_last(self, pos: Tensor) -> Tensor:
        """The last query that reads the key at pos through the window, -1 for a boundary or pos -1."""
        return window_last(pos, self.is_boundary(pos), self.window)

    def ring_slot(self, pos: Tensor) -> Tensor:
        """The ring entry that holds position pos (window_slots > 0)."""
        return pos % self.window_slots

    def ring_reads(self, q_pos: Tensor, ring_pos: Tensor) -> Tensor:
        """Which ring entries, holding positions ring_pos (-1: empty), the query at q_pos reads."""
        return sees(q_pos, ring_pos, self.window_last(ring_pos))

    def keys_seen(self, t: int) -> int:
        """Keys the query at 0-based position t reads: old boundaries plus the window."""
        if self.boundaries == ALL:
            return t + 1
        recent = min(self.window + 1, t + 1)
        return int(self.num_entries(max(t - self.window, 0))) + recent

    def entry_bytes(self, kv_dtype: torch.dtype) -> int:
        """One K and one V."""
        return 2 * self.kv_width * _nbytes(kv_dtype)


@dataclass(frozen=True)
class CacheSpec:
    """Cache rules and sizes of a whole model: one KeySpec per layer plus the SSM states."""

    layers: tuple[KeySpec, ...]
    ssm_state_elems: int  # per layer: K and V SSM recurrent states (fp32)
    conv_state_elems: int  # per layer: K and V conv histories (cache dtype)
    full_kv_width: int  # K width of a full-KV transformer of the same dims and KV heads (the comparison)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "CacheSpec":
        if cfg.kind == "attamba":
            mode, window, slots = CHUNKS, cfg.window, cfg.window + 1
        elif cfg.kind == "sliding":
            mode, window, slots = NONE, cfg.sliding_window - 1, cfg.sliding_window
        else:
            mode, window, slots = ALL, 0, 0
        layers = tuple(KeySpec(mode, cfg.chunk_size, cfg.layer_offset(i), window, slots, cfg.kv_dim)
                       for i in range(cfg.n_layers))
        ssm = 2 * cfg.ssm_inner * cfg.ssm_state if cfg.has_ssm else 0
        conv = 2 * cfg.conv_channels * (cfg.conv_width - 1) if cfg.has_ssm else 0
        return cls(layers, ssm, conv, cfg.d_model if cfg.kind == "reduced" else cfg.kv_dim)

    @property
    def window_slots(self) -> int:
        return self.layers[0].window_slots

    @property
    def window(self) -> int:
        return self.layers[0].window

    @cached_property
    def _offsets_cpu(self) -> Tensor:
        return torch.tensor([spec.offset for spec in self.layers])

    def _offsets(self, pos: Tensor) -> Tensor:
        """Layer offsets [L, 1, ...] broadcasting against pos."""
        return self._offsets_cpu.to(pos.device).view(-1, *([1] * pos.dim()))

    def is_boundary(self, pos: Tensor) -> Tensor:
        """[n_layers, *pos.shape]: every layer's answer at once (one op chain, for step metadata)."""
        spec = self.layers[0]
        if spec.boundaries != CHUNKS:
            return spec.is_boundary(pos).expand(len(self.layers), *pos.shape)
        return is_boundary(pos, spec.chunk_size, self._offsets(pos))

    def num_entries(self, pos: Tensor) -> Tensor:
        """[n_layers, *pos.shape]: boundary entries each layer keeps for positions < pos."""
        spec = self.layers[0]
        if spec.boundaries != CHUNKS:
            return spec.num_entries(pos).expand(len(self.layers), *pos.shape)
        return num_boundaries(pos, spec.chunk_size, self._offsets(pos))

    def chunk_start(self, pos: Tensor) -> Tensor:
        """[n_layers, *pos.shape]: where each layer's SSMs reset."""
        return chunk_start(pos, self.layers[0].chunk_size, self._offsets(pos))

    def window_last(self, pos: Tensor) -> Tensor:
        """[n_layers, *pos.shape]: KeySpec.window_last of every layer."""
        return window_last(pos, self.is_boundary(pos), self.window)

    def ring_reads(self, q_pos: Tensor, ring_pos: Tensor) -> Tensor:
        """[n_layers, *broadcast shape]: KeySpec.ring_reads of every layer."""
        return sees(q_pos, ring_pos, self.window_last(ring_pos))

    def ring_slot(self, pos: Tensor) -> Tensor:
        """The ring entry that holds position pos (the same in every layer)."""
        return self.layers[0].ring_slot(pos)

    def max_entries(self, n: int) -> int:
        """Boundary entries of the layer that keeps the most, for n tokens (sizes the block table)."""
        return max(int(spec.num_entries(n)) for spec in self.layers)

    def slot_bytes(self, kv_dtype: torch.dtype, conv_dtype: torch.dtype | None = None) -> int:
        """Fixed-size state of one sequence, every layer: window ring, SSM and conv states."""
        per_layer = sum(spec.window_slots * spec.entry_bytes(kv_dtype) for spec in self.layers)
        states = len(self.layers) * (self.ssm_state_elems * 4 + self.conv_state_elems * _nbytes(conv_dtype or kv_dtype))
        return per_layer + states

    def entry_bytes(self, kv_dtype: torch.dtype) -> int:
        """One boundary entry (K and V) in every layer: what a block stores per entry."""
        return sum(spec.entry_bytes(kv_dtype) for spec in self.layers)

    def seq_bytes(self, n: int, kv_dtype: torch.dtype = torch.float16, conv_dtype: torch.dtype | None = None) -> int:
        """Exact bytes one sequence of n tokens holds (each layer's own boundary count)."""
        entries = sum(int(spec.num_entries(n)) * spec.entry_bytes(kv_dtype) for spec in self.layers)
        return entries + self.slot_bytes(kv_dtype, conv_dtype)

    def full_kv_bytes(self, n: int, kv_dtype: torch.dtype = torch.float16) -> int:
        """Bytes a full-KV transformer of the same width and depth holds for n tokens."""
        return len(self.layers) * n * 2 * self.full_kv_width * _nbytes(kv_dtype)
