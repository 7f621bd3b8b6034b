"""The model runner: owns every cache tensor and runs one scheduled step of the model.

Cache tensors (L = layers, H x D = key/value heads, S = state slots):
  k_pool, v_pool  [L, num_blocks * block_size, H, D]  boundary (or all, for full attention) K/V
  win_k, win_v    [L, S, W, H, D]                     ring of the last W K/V, slot = position % W
  win_pos         [S, W]                              position held by each ring entry (-1 empty)
  ssm             [L, 2, S, h, E/h, N] fp32           K-SSM and V-SSM recurrent states
  conv            [L, 2, S, E + 2N, conv_width - 1]   their conv histories
Sequences carry only block tables and a slot index. Prefill chunks run one sequence at a time
through `LM.extend`; decodes run batched through `LM.step`. Both reach the cache only through the
`attend` callbacks below and the SSM state gather/scatter, the seams where fused kernels plug in.
"""
from __future__ import annotations

import torch
from torch import Tensor

from models.attention import block_attention, gathered_attention
from models.layers import num_boundaries
from models.lm import LM, LayerSSMState
from models.ssm import SSMState

from .cache_manager import CacheLayout
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: LM, layout: CacheLayout, num_blocks: int, num_slots: int, device: torch.device) -> None:
        self.model, self.layout, self.device = model, layout, device
        cfg = self.cfg = model.config
        H, D, L, W = cfg.num_kv_heads, cfg.head_dim, cfg.n_layers, cfg.window_slots  # GQA: K/V heads
        kv = dict(device=device, dtype=layout.kv_dtype)
        self.block_size = layout.block_size
        self.k_pool = torch.zeros(L, num_blocks * layout.block_size, H, D, **kv)
        self.v_pool = torch.zeros_like(self.k_pool)
        self.win_k = torch.zeros(L, num_slots if W else 0, W, H, D, **kv)
        self.win_v = torch.zeros_like(self.win_k)
        self.win_pos = torch.full((num_slots if W else 0, W), -1, dtype=torch.long, device=device)
        if cfg.has_ssm:
            hd = cfg.ssm_inner // cfg.ssm_heads
            self.ssm = torch.zeros(L, 2, num_slots, cfg.ssm_heads, hd, cfg.ssm_state, device=device, dtype=torch.float32)
            self.conv = torch.zeros(L, 2, num_slots, cfg.conv_channels, cfg.conv_width - 1, **kv)

    # ---- helpers -----------------------------------------------------------------------------------
    def _entries_before(self, layer: int, pos: Tensor) -> Tensor:
        """Boundary entries layer `layer` holds for positions < pos."""
        cfg = self.cfg
        if cfg.kind == "attamba":
            return num_boundaries(pos, cfg.chunk_size, cfg.layer_offset(layer))
        return pos if cfg.all_boundaries else torch.zeros_like(pos)

    def _flat(self, tables: Tensor, entry: Tensor) -> Tensor:
        """Flat pool index of entry numbers [B, M] through block tables [B, max_blocks]."""
        blk = torch.gather(tables, 1, (entry // self.block_size).clamp(max=tables.shape[1] - 1))
        return blk * self.block_size + entry % self.block_size

    def _tables(self, seqs: list[Sequence]) -> Tensor:
        width = max(1, max(len(s.block_table) for s in seqs))
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _ssm_states(self, slots: Tensor) -> list[LayerSSMState]:
        return [LayerSSMState(SSMState(self.conv[l, 0, slots], self.ssm[l, 0, slots]),
                              SSMState(self.conv[l, 1, slots], self.ssm[l, 1, slots]))
                for l in range(self.cfg.n_layers)]

    def _store_ssm(self, slots: Tensor, states: list[LayerSSMState]) -> None:
        for l, st in enumerate(states):
            for j, s in enumerate((st.k, st.v)):
                self.conv[l, j].index_copy_(0, slots, s.conv.to(self.conv.dtype))
                self.ssm[l, j].index_copy_(0, slots, s.ssm)

    # ---- prefill (one sequence, a chunk of its uncomputed tokens) ----------------------------------------
    @torch.no_grad()
    def prefill(self, seq: Sequence, n: int, want_logits: bool) -> Tensor | None:
        """Compute tokens [num_computed, num_computed + n) of seq; logits [V] of the last if wanted."""
        cfg, p0 = self.cfg, seq.num_computed
        ids = torch.tensor([seq.token_ids(p0, p0 + n)], dtype=torch.long, device=self.device)
        table = self._tables([seq])
        slot = torch.tensor([seq.slot], device=self.device)
        W = cfg.window_slots
        if W and p0 == 0:
            self.win_pos[seq.slot] = -1  # the slot may hold a previous sequence's ring
        ctx_win_pos = self.win_pos[seq.slot].clone() if W else None

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
            key_is_bnd = self.model.blocks[layer].attn.key_is_boundary
            all_pos = torch.arange(p0 + n, device=self.device)
            bnd = key_is_bnd(all_pos)
            ctx_pos = all_pos[:p0][bnd[:p0]]
            flat = self._flat(table, torch.arange(len(ctx_pos), device=self.device)[None])[0]
            keys, vals = [self.k_pool[layer, flat][None]], [self.v_pool[layer, flat][None]]
            kpos, kbnd = [ctx_pos], [torch.ones_like(ctx_pos, dtype=torch.bool)]
            if W and p0:
                keep = (ctx_win_pos >= 0) & ~key_is_bnd(ctx_win_pos)  # boundaries are read from the blocks
                keys.append(self.win_k[layer, seq.slot, keep][None])
                vals.append(self.win_v[layer, seq.slot, keep][None])
                kpos.append(ctx_win_pos[keep])
                kbnd.append(torch.zeros(int(keep.sum()), dtype=torch.bool, device=self.device))
            keys.append(k), vals.append(v), kpos.append(pos), kbnd.append(bnd[p0:])
            out = block_attention(q, torch.cat(keys, 1), torch.cat(vals, 1), pos, torch.cat(kpos), torch.cat(kbnd),
                                  cfg.attn_window)
            # store the new boundary entries and the newest W positions
            new_bnd = bnd[p0:]
            dst = self._flat(table, len(ctx_pos) + torch.arange(int(new_bnd.sum()), device=self.device)[None])[0]
            self.k_pool[layer, dst] = k[0, new_bnd].to(self.k_pool.dtype)
            self.v_pool[layer, dst] = v[0, new_bnd].to(self.v_pool.dtype)
            if W:
                last = pos[-W:]
                self.win_k[layer, seq.slot, last % W] = k[0, -W:].to(self.win_k.dtype)
                self.win_v[layer, seq.slot, last % W] = v[0, -W:].to(self.win_v.dtype)
            return out

        states = self._ssm_states(slot) if cfg.has_ssm and p0 > 0 else None
        hidden, new_states = self.model.extend(ids, p0, states, torch.tensor([n - 1], device=self.device), attend)
        if new_states is not None:
            self._store_ssm(slot, new_states)
        if W:
            last = torch.arange(max(p0, p0 + n - W), p0 + n, device=self.device)
            self.win_pos[seq.slot, last % W] = last
        return self.model.logits(hidden[0, -1]) if want_logits else None

    # ---- decode (a batch of sequences, one token each) ---------------------------------------------------
    @torch.no_grad()
    def decode(self, seqs: list[Sequence]) -> Tensor:
        """Compute each sequence's last token at its position -> logits [B, V]."""
        cfg, dev = self.cfg, self.device
        tokens = torch.tensor([s.last_token for s in seqs], dtype=torch.long, device=dev)
        pos = torch.tensor([s.num_computed for s in seqs], dtype=torch.long, device=dev)
        tables = self._tables(seqs)
        slots = torch.tensor([max(s.slot, 0) for s in seqs], dtype=torch.long, device=dev)
        rows = torch.arange(len(seqs), device=dev)
        W = cfg.window_slots
        if W:
            win_pos = self.win_pos[slots]  # [B, W]
            win_pos[rows, pos % W] = pos
            self.win_pos[slots] = win_pos

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
            key_is_bnd = self.model.blocks[layer].attn.key_is_boundary
            is_bnd = key_is_bnd(pos)
            before = self._entries_before(layer, pos)
            dst = self._flat(tables, before[:, None])[:, 0][is_bnd]
            self.k_pool[layer, dst] = k[is_bnd].to(self.k_pool.dtype)
            self.v_pool[layer, dst] = v[is_bnd].to(self.v_pool.dtype)
            count = before + is_bnd.long()
            entry = torch.arange(int(count.max()), device=dev)[None].expand(len(seqs), -1)
            flat = self._flat(tables, entry)
            parts = [(self.k_pool[layer, flat], self.v_pool[layer, flat], entry < count[:, None])]
            if W:
                self.win_k[layer, slots, pos % W] = k.to(self.win_k.dtype)
                self.win_v[layer, slots, pos % W] = v.to(self.win_v.dtype)
                valid = (win_pos >= 0) & (win_pos >= pos[:, None] - cfg.attn_window) & ~key_is_bnd(win_pos)
                parts.append((self.win_k[layer, slots], self.win_v[layer, slots], valid))
            return gathered_attention(q, parts)

        states = self._ssm_states(slots) if cfg.has_ssm else None
        logits, new_states = self.model.step(tokens, pos, states, attend)
        if new_states is not None:
            self._store_ssm(slots, new_states)
        return logits
