"""The model runner: owns every cache tensor and runs one scheduled step of the model.

Pools (L layers, Hkv x D cached heads, S state slots, W ring entries; one block and one slot more
than the cache manager hands out: the sinks, last in their pools, where a compiled step's index -1
lands, see kernels/_rows.py):
  k_pool, v_pool  [L, num_blocks, block_size, Hkv, D]  boundary (for full attention: every) K/V
  win_k, win_v    [L, S, W, Hkv, D]                    ring of the last W K/V (entry: CacheSpec.ring_slot)
  win_pos         [S, W]                               position held by each ring entry (-1 empty)
  ssm             [L, 2, S, h, E/h, N] fp32            K-SSM and V-SSM recurrent states
  conv            [L, 2, S, E + 2N, conv_width - 1]    their conv histories
A prefix-cache snapshot is a slot's state (rings, ring positions, SSM and conv states) copied as
bytes into pool blocks, so it shares the block budget.
Sequences carry only block tables and a slot index. A step builds one metadata object
(models/paged.py: which entries each op writes and reads) and runs the model: the prefill chunks
in one `LM.prefill` (rows right-padded, each at its own start), the decodes in one `LM.decode`;
their ops (kernels/) update the pools in place. The runner keeps the ring's positions itself.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from kernels._triton import use_triton
from models.lm import LM, BlockHalves, LayerSSMState
from models.paged import DecodeMetadata, LayerCache, build_decode_metadata, build_prefill_metadata, record_ring
from models.ssm import SSMState
from models.upcast import matvec_rows

from .cache_layout import CacheLayout
from .compiled_decode import CompiledDecode
from .compiled_prefill import compile_halves, runs_compiled, variants, warm_up
from .cuda_graphs import DecodeGraphs, sizes_up_to
from .sequence import Sequence

log = logging.getLogger("attamba.engine")


class ModelRunner:
    def __init__(self, model: LM, layout: CacheLayout, num_blocks: int, num_slots: int, device: torch.device) -> None:
        self.model, self.layout, self.device = model.pack(), layout, device
        cfg = self.cfg = model.config
        self.spec = layout.spec
        Hkv, D, L, W, bs = cfg.num_kv_heads, cfg.head_dim, cfg.n_layers, self.spec.window_slots, layout.block_size
        kv = dict(device=device, dtype=layout.kv_dtype)
        self.block_size = bs
        blocks, slots = num_blocks + 1, num_slots + 1  # the last of each: the sinks
        self.k_pool = torch.zeros(L, blocks, bs, Hkv, D, **kv)
        self.v_pool = torch.zeros_like(self.k_pool)
        S = slots if W else 0  # ring slots: none without a window
        self.win_k = torch.zeros(L, S, W, Hkv, D, **kv)
        self.win_v = torch.zeros_like(self.win_k)
        self.win_pos = torch.full((S, W), -1, dtype=torch.long, device=device)
        self.ssm = self.conv = None
        if cfg.has_ssm:
            hd = cfg.ssm_inner // cfg.ssm_heads
            self.ssm = torch.zeros(L, 2, slots, cfg.ssm_heads, hd, cfg.ssm_state, device=device, dtype=torch.float32)
            self.conv = torch.zeros(L, 2, slots, cfg.conv_channels, cfg.conv_width - 1, **kv)
        self.graphs: DecodeGraphs | CompiledDecode | None = None  # captured (CUDA) or compiled (CPU) decode steps
        self.halves: BlockHalves | None = None  # the compiled prefill's layer halves (CPU)
        self.matvec_rows = matvec_rows(model)  # which prefill chunks those run (engine/compiled_prefill.py)
        self.caches = [LayerCache(self.k_pool[l], self.v_pool[l], self.win_k[l], self.win_v[l],
                                  self.conv[l] if cfg.has_ssm else None, self.ssm[l] if cfg.has_ssm else None)
                       for l in range(L)]

    # ---- state snapshots (prefix caching) -----------------------------------------------------------
    def _slot_state(self, slot: int) -> list[Tensor]:
        """Views of everything a slot holds, in snapshot order."""
        parts = [self.win_k[:, slot], self.win_v[:, slot], self.win_pos[slot]] if self.spec.window_slots else []
        if self.cfg.has_ssm:
            parts += [self.ssm[:, :, slot], self.conv[:, :, slot]]
        return parts

    def _block_bytes(self, blocks: list[int]) -> list[Tensor]:
        """The pool memory of blocks as contiguous byte views."""
        return [pool[l, b].view(-1).view(torch.uint8) for b in blocks for pool in (self.k_pool, self.v_pool)
                for l in range(self.cfg.n_layers)]

    def save_snapshots(self, saves: list[tuple[int, list[int]]]) -> None:
        """Copy each slot's state into its blocks."""
        for slot, blocks in saves:
            src = torch.cat([p.reshape(-1).view(torch.uint8) for p in self._slot_state(slot)])
            assert len(src) == self.layout.snapshot_bytes
            off = 0
            for dst in self._block_bytes(blocks):
                n = min(len(dst), len(src) - off)
                if n <= 0:
                    break
                dst[:n].copy_(src[off : off + n])
                off += n

    def load_snapshots(self, loads: list[tuple[int, list[int]]]) -> None:
        """Copy snapshots from their blocks into slots."""
        for slot, blocks in loads:
            src = torch.cat(self._block_bytes(blocks))
            off = 0
            for part in self._slot_state(slot):
                n = part.numel() * part.element_size()
                part.copy_(src[off : off + n].view(part.dtype).view(part.shape))
                off += n

    def _tables(self, seqs: list[Sequence]) -> Tensor:
        width = max(1, max(len(s.block_table) for s in seqs))
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    # ---- prefill (chunks of several sequences, one forward) --------------------------------------------
    def _ssm_states(self, slots: Tensor, fresh: Tensor) -> list[LayerSSMState]:
        """Each row's SSM and conv states, zero for rows that start a sequence (their slot may hold
        a previous sequence's)."""
        keep = (~fresh).view(-1, 1, 1)
        return [LayerSSMState(*(SSMState(self.conv[l, j, slots] * keep.to(self.conv.dtype), self.ssm[l, j, slots] * keep[..., None])
                                for j in (0, 1)))
                for l in range(self.cfg.n_layers)]

    def _store_ssm(self, slots: Tensor, states: list[LayerSSMState]) -> None:
        for l, st in enumerate(states):
            for j, s in enumerate((st.k, st.v)):
                self.conv[l, j].index_copy_(0, slots, s.conv.to(self.conv.dtype))
                self.ssm[l, j].index_copy_(0, slots, s.ssm)

    @torch.no_grad()
    def prefill(self, work: list[tuple[Sequence, int]]) -> Tensor:
        """Compute tokens [num_computed, num_computed + n) of every (seq, n) in one forward, rows
        right-padded to the longest chunk. Returns the logits [B, V] at each row's last token."""
        dev, T = self.device, max(n for _, n in work)
        ids = torch.zeros(len(work), T, dtype=torch.long, device=dev)
        for b, (seq, n) in enumerate(work):
            ids[b, :n] = torch.tensor(seq.token_ids(seq.num_computed, seq.num_computed + n), device=dev)
        fresh = [seq.num_computed == 0 for seq, _ in work]
        if self.spec.window_slots and any(fresh):  # a slot may hold a previous sequence's ring
            self.win_pos[[seq.slot for (seq, _), f in zip(work, fresh) if f]] = -1
        slots = torch.tensor([seq.slot for seq, _ in work], device=dev)
        meta = build_prefill_metadata(
            self.spec, torch.tensor([seq.num_computed for seq, _ in work], device=dev),
            torch.tensor([n for _, n in work], device=dev), slots, self._tables([seq for seq, _ in work]),
            self.win_pos, self.block_size, T)
        halves = self.halves if runs_compiled(len(work), T, self.matvec_rows) else None
        # the compiled halves always take states (zero for fresh rows, the same result): one graph, not two
        states = self._ssm_states(slots, torch.tensor(fresh, device=dev)) \
            if self.cfg.has_ssm and (halves or not all(fresh)) else None
        hidden, new_states = self.model.prefill(ids, meta, self.caches, states, halves)
        if new_states is not None:
            self._store_ssm(slots, new_states)
        record_ring(self.win_pos, meta.win_store, meta.positions)
        return self.model.logits(hidden)

    # ---- one scheduled batch ---------------------------------------------------------------------------
    def run(self, work: list[tuple[Sequence, int]]) -> tuple[list[Sequence], Tensor | None]:
        """Compute each sequence's scheduled tokens. Returns the sequences that sample a token now
        (decodes, and prefills that reach the end of their tokens) and their logits [n, V]."""
        # the last token after cached ones is a decode; everything else (a one-token chunk inside the
        # tokens included) is a prefill chunk
        def is_decode(seq: Sequence, n: int) -> bool:
            return n == 1 and seq.num_computed > 0 and seq.num_computed == seq.num_tokens - 1

        decodes = [seq for seq, n in work if is_decode(seq, n)]
        prefills = [(seq, n) for seq, n in work if not is_decode(seq, n)]
        seqs, logits = [], []
        if prefills:
            rows = self.prefill(prefills)
            done = [b for b, (seq, n) in enumerate(prefills) if seq.num_computed + n == seq.num_tokens]
            seqs += [prefills[b][0] for b in done]
            logits.append(rows[done])
        if decodes:
            seqs += decodes
            logits.append(self.decode(decodes))
        return seqs, (torch.cat(logits) if seqs else None)

    # ---- decode (a batch of sequences, one token each) ---------------------------------------------------
    def _metadata(self, seqs: list[Sequence]) -> DecodeMetadata:
        dev = self.device
        pos = torch.tensor([s.num_computed for s in seqs], dtype=torch.long, device=dev)
        slots = torch.tensor([s.slot for s in seqs], dtype=torch.long, device=dev)
        tables = self._tables(seqs) if seqs else torch.zeros(0, 1, dtype=torch.long, device=dev)
        return build_decode_metadata(self.spec, pos, slots, tables, self.win_pos, self.block_size,
                                     self.cfg.head_dim, self.cfg.rope_theta)

    def capture_graphs(self, max_model_len: int, max_batch: int) -> bool:
        """CUDA graphs of the decode step for batch sizes up to max_batch. Only the Triton kernels
        can be captured (the PyTorch refs sync with the host): False when they do not run here."""
        if not use_triton(self.k_pool):
            return False
        self.graphs = DecodeGraphs(self.model, self.caches, self._metadata([]), self.layout.blocks(max_model_len),
                                   sizes_up_to(max_batch))
        return True

    def compile_decode(self, max_batch: int) -> None:
        """Compile the decode step (CPU) for batch sizes up to max_batch, now; it stays eager when
        Inductor cannot build (no C++ compiler)."""
        try:
            self.graphs = CompiledDecode(self.model, self.caches, self._metadata([]), sizes_up_to(max_batch))
        except torch._dynamo.exc.BackendCompilerFailed as e:
            log.warning("decode runs eagerly: compiling it failed (%s)", str(e).splitlines()[0])

    def compile_prefill(self, max_rows: int) -> None:
        """Compile the prefill's layers (CPU) for chunks of one row and of up to max_rows rows, now; they stay
        eager when Inductor cannot build."""
        halves = compile_halves(self.model)
        try:
            for variant, rows, tokens in variants(max_rows, self.matvec_rows):
                slots = torch.zeros(rows, dtype=torch.long, device=self.device)
                states = self._ssm_states(slots, torch.ones(rows, dtype=torch.bool, device=self.device)) \
                    if self.cfg.has_ssm else None
                seconds, loaded = warm_up(self.model, halves, variant, rows, tokens, states[0] if states else None)
                if not torch._dynamo.config.disable:
                    log.info("%s the prefill's layers for chunks of %d x %d tokens in %.1f s",
                             "loaded" if loaded else "compiled", rows, tokens, seconds)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            log.warning("prefill runs eagerly: compiling it failed (%s)", str(e).splitlines()[0])
            return
        self.halves = halves

    @torch.no_grad()
    def decode(self, seqs: list[Sequence]) -> Tensor:
        """Compute each sequence's last token at its position -> logits [B, V]."""
        tokens = torch.tensor([s.last_token for s in seqs], dtype=torch.long, device=self.device)
        meta = self._metadata(seqs)
        record_ring(self.win_pos, meta.win_store, meta.positions)
        return self.graphs(tokens, meta) if self.graphs else self.model.decode(tokens, meta, self.caches)
