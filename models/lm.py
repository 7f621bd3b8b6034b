"""Attamba and its baselines in one decoder-only language model (nanoGPT-style, one file).

    h   = x + Wo Attn(q = Wq u, k = SSM_k(u) + u, v = SSM_v(u) + u)    u = RMSNorm(x)
    out = h + SwiGLU(RMSNorm(h))

The transformer kinds replace the SSMs by Wk, Wv (optionally grouped-query); kv_skip "proj" keeps
Wk, Wv as the SSMs' skip (k = Wk u + SSM_k(u), grouped-query allowed: a pretrained transformer
turned into Attamba). Which keys a query
sees is the only other difference between kinds (models/kv_spec.py). Entry points:
  forward(ids)                        whole sequences from position 0, no cache (training)
  decode(tokens, meta, caches)        the serving decode step: one token per row, reading and
                                      writing the engine's paged pools in place (Block.forward,
                                      Attention.forward and the fused ops in kernels/)
  prefill(ids, meta, caches, states)  the serving prefill: chunks of several sequences, each after
                                      its cached tokens, through the same pools (extend with
                                      Attention.prefill as its attend)
  extend(ids, start, states, attend)  a run of tokens after `start` cached ones
  step(tokens, pos, states, attend)   one token per row with explicit dense state: the slow,
                                      obviously correct twin of decode (models/state.py)
`attend` callbacks own the key/value storage: the dense reference state's (models/state.py), or the
pools' (prefill, through Attention.prefill).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import decode_attention, prefill_attention, ssm_step, store_kv

from .attention import block_attention
from .config import ModelConfig
from .kv_spec import CacheSpec, chunk_start
from .layers import RMSNorm, SwiGLU, apply_rope, linear, pack_, pack_linears, rms_norm, rope_tables, rotate, trunc_normal_
from .paged import DecodeMetadata, LayerCache, LayerMetadata, PrefillMetadata
from .ssm import ChunkSSM, SSMState


def _out_proj(skip: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """skip + y w^T for both SSMs at once: y [2, B, E], w [2, n, E], skip [2 or 1, B, n] -> [2, B, n]. In the
    compiled CPU decode step a broadcast product and a sum, which Inductor fuses into the step's own loops
    (a batched matrix product there is a library call of ~50 us for 25k multiply-adds, 30 times a step);
    both round once, after the add."""
    if torch.compiler.is_compiling():
        return (skip.float() + (y[:, :, None, :] * w[:, None]).sum(-1, dtype=torch.float32)).to(y.dtype)
    return torch.baddbmm(skip, y, w.transpose(1, 2))


@dataclass
class LayerSSMState:
    """The K-SSM and V-SSM decode states of one layer."""

    k: SSMState
    v: SSMState

    def nbytes(self) -> int:
        return self.k.nbytes() + self.v.nbytes()


# attend(layer, q, k, v, pos) -> attention output shaped like q; it stores k, v as it needs.
AttendFn = Callable[[int, Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class BlockHalves:
    """What runs Block.project and Block.finish in place of the methods on the reference paths (the compiled
    prefill, engine/compiled_prefill.py): project(block, x, pos, state, last, mamba, offsets[layer], rope), with
    each layer's chunk offset as a 0-d tensor and the step's RoPE tables, and finish(block, x, o)."""

    project: Callable[..., tuple[Tensor, Tensor, Tensor, LayerSSMState | None]]
    finish: Callable[..., Tensor]
    offsets: tuple[Tensor, ...]


@dataclass
class _Packed:
    """A layer's decode weights packed into few tensors (the parameters become views of them)."""

    w_in: Tensor | nn.Module  # [q | k-SSM in_proj | v-SSM in_proj], [q | k | v | k-SSM in_proj | v-SSM in_proj] or [q | k | v]
    conv: Tensor | None = None  # [2, C, conv_width]
    A_log: Tensor | None = None  # [2, h]
    D: Tensor | None = None  # [2, h]
    norm: Tensor | None = None  # [2, E]
    out: Tensor | None = None  # [2, d or kv_dim, E]


class Attention(nn.Module):
    """The attention sub-layer: q from Wq; k, v from two chunk-resetting SSMs (or Wk, Wv)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.spec = CacheSpec.from_config(cfg).layers[layer]
        self.wq = nn.Linear(cfg.d_model, cfg.attn_dim, bias=False)
        if cfg.has_ssm:
            args = (cfg.d_model, cfg.ssm_inner, cfg.ssm_state, cfg.ssm_heads, cfg.conv_width, cfg.norm_eps)
            d_out = cfg.kv_dim if cfg.has_kv_proj else cfg.d_model
            self.ssm_k, self.ssm_v = ChunkSSM(*args, d_out=d_out), ChunkSSM(*args, d_out=d_out)
        if cfg.has_kv_proj:
            self.wk = nn.Linear(cfg.d_model, cfg.kv_dim, bias=False)
            self.wv = nn.Linear(cfg.d_model, cfg.kv_dim, bias=False)
        self.wo = nn.Linear(cfg.attn_dim, cfg.d_model, bias=False)
        self.packed: _Packed | None = None

    def reset_parameters(self) -> None:
        std = self.cfg.d_model**-0.5
        for lin in (self.wq, self.wo) + ((self.wk, self.wv) if self.cfg.has_kv_proj else ()):
            trunc_normal_(lin.weight, std)
        if self.cfg.has_ssm:
            self.ssm_k.reset_parameters()
            self.ssm_v.reset_parameters()

    def pack(self) -> None:
        """Pack the decode weights (no copy is kept: the parameters become views)."""
        proj = [self.wq] + ([self.wk, self.wv] if self.cfg.has_kv_proj else [])
        if self.cfg.has_ssm:
            k, v = self.ssm_k, self.ssm_v
            self.packed = _Packed(
                w_in=pack_linears(proj + [k.in_proj, v.in_proj]),
                conv=pack_([k.conv_weight, v.conv_weight], None), A_log=pack_([k.A_log, v.A_log], None),
                D=pack_([k.D, v.D], None), norm=pack_([k.norm.weight, v.norm.weight], None),
                out=pack_([k.out_proj.weight, v.out_proj.weight], None))
        else:
            self.packed = _Packed(w_in=pack_linears(proj))

    def _skip_k(self, u: Tensor) -> Tensor:
        """What the K-SSM's output is added to: Wk u (kv_skip "proj") or u."""
        return self.wk(u) if self.cfg.has_kv_proj else u

    def _skip_v(self, u: Tensor) -> Tensor:
        return self.wv(u) if self.cfg.has_kv_proj else u

    def _heads(self, x: Tensor, kv: bool = False) -> Tensor:
        return x.unflatten(-1, (self.cfg.num_kv_heads if kv else self.cfg.num_attn_heads, self.cfg.head_dim))

    # ---- the serving decode step ---------------------------------------------------------------
    def forward(self, u: Tensor, meta: LayerMetadata, cache: LayerCache) -> Tensor:
        """u [B, d], one token per row -> the sub-layer's output [B, d]; K/V and SSM states are
        written into the pools in place."""
        q, k, v = self._qkv_decode(u, meta, cache)
        store_kv(k, v, cache.k_flat, cache.v_flat, meta.bnd_store)
        if cache.win_k.shape[1]:
            store_kv(k, v, cache.win_k_flat, cache.win_v_flat, meta.win_store)
        o = decode_attention(q, cache.k, cache.v, meta.block_tables, meta.bnd_count, cache.win_k,
                             cache.win_v, meta.slots, meta.win_mask, self.cfg.head_dim**-0.5)
        return self.wo(o.flatten(-2))

    def _qkv_decode(self, u: Tensor, meta: LayerMetadata, cache: LayerCache) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, H, D] and k, v [B, Hkv, D] after RoPE, from the packed weights."""
        cfg, w = self.cfg, self.packed
        proj = linear(u, w.w_in)
        if cfg.has_ssm:
            E, C, A = cfg.ssm_inner, cfg.conv_channels, cfg.attn_dim
            if cfg.has_kv_proj:  # skip = [Wk u, Wv u]
                skip, A = proj[:, A : A + 2 * cfg.kv_dim].unflatten(-1, (2, -1)).transpose(0, 1), A + 2 * cfg.kv_dim
            else:
                skip = u.unsqueeze(0)
            q, zxbcdt = proj[:, : cfg.attn_dim], proj[:, A:].unflatten(-1, (2, -1))  # [B, 2, 2E+2N+h]
            z, xbc, dt = zxbcdt[..., :E], zxbcdt[..., E : E + C], zxbcdt[..., E + C :]
            y = ssm_step(xbc, dt, cache.conv, cache.ssm, w.conv, w.A_log, w.D, meta.slots, meta.reset)
            y = rms_norm(y * F.silu(z), w.norm, cfg.norm_eps)  # [B, 2, E]: each SSM's gated norm
            kv = _out_proj(skip, y.transpose(0, 1), w.out)  # [2, B, kv width]: SSM(u) + skip
            k, v = kv[0], kv[1]
        else:
            q, k, v = proj.split([cfg.attn_dim, cfg.kv_dim, cfg.kv_dim], -1)
        return (rotate(self._heads(q), meta.cos, meta.sin), rotate(self._heads(k, True), meta.cos, meta.sin),
                self._heads(v, True))

    # ---- the serving prefill --------------------------------------------------------------------
    def prefill(self, q: Tensor, k: Tensor, v: Tensor, meta: PrefillMetadata, cache: LayerCache) -> Tensor:
        """q [B, T, H, D], k, v [B, T, Hkv, D] of the step's chunks (RoPE applied) -> the attention
        output [B, T, H, D] over each row's cached context and its chunk; the chunk's K/V are stored."""
        flat_k, flat_v = k.flatten(0, 1), v.flatten(0, 1)
        store_kv(flat_k, flat_v, cache.k_flat, cache.v_flat, meta.bnd_store[self.layer])
        o = prefill_attention(q, k, v, meta.positions, meta.key_last[self.layer], cache.k, cache.v, meta.block_tables,
                              meta.bnd_count[self.layer], cache.win_k, cache.win_v, meta.slots,
                              meta.win_last[self.layer], self.spec.window, self.cfg.head_dim**-0.5,
                              meta.plan(self.layer, self.spec))
        if cache.win_k.shape[1]:
            store_kv(flat_k, flat_v, cache.win_k_flat, cache.win_v_flat, meta.win_store)
        return o

    # ---- the reference paths -------------------------------------------------------------------
    def attend(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        """Whole-sequence attention under this layer's key rule: q, k, v [B, T, *, D] at positions pos [T]."""
        return block_attention(q, k, v, pos, pos, self.spec.is_boundary(pos), self.spec.window)

    def project(
        self, u: Tensor, pos: Tensor, state: LayerSSMState | None, last: Tensor | None, mamba: bool = False,
        offset: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, LayerSSMState | None]:
        """u: [B, T, d] at positions pos [T] or [B, T] -> q [B, T, H, D], k, v [B, T, Hkv, D] (RoPE applied).
        mamba: the SSMs run mamba-ssm's kernels (see ChunkSSM.forward). offset: the layer's chunk offset as a
        0-d tensor (engine/compiled_prefill.py: one graph serves layers of every offset); default its spec's.
        rope: rope_tables(pos) made once for every layer (LM.extend), default made here."""
        cos, sin = rope if rope is not None else rope_tables(pos, self.cfg.head_dim, self.cfg.rope_theta)
        q = self._heads(self.wq(u))
        if self.cfg.has_ssm:
            P, offset = self.cfg.chunk_size, self.spec.offset if offset is None else offset
            k, sk = self.ssm_k(u, pos, P, offset, state.k if state else None, last, mamba)
            v, sv = self.ssm_v(u, pos, P, offset, state.v if state else None, last, mamba)
            k, v = self._heads(k + self._skip_k(u), True), self._heads(v + self._skip_v(u), True)
            new_state = LayerSSMState(sk, sv) if last is not None else None
        else:
            k, v, new_state = self._heads(self.wk(u), True), self._heads(self.wv(u), True), None
        return rotate(q, cos, sin), rotate(k, cos, sin), v, new_state

    def project_step(
        self, u: Tensor, pos: Tensor, state: LayerSSMState | None,
    ) -> tuple[Tensor, Tensor, Tensor, LayerSSMState | None]:
        """u: [B, d], each row at its own position pos [B] -> q [B, H, D], k, v [B, Hkv, D]."""
        theta = self.cfg.rope_theta
        q = self._heads(self.wq(u))
        if self.cfg.has_ssm:
            reset = chunk_start(pos, self.cfg.chunk_size, self.spec.offset)
            k, sk = self.ssm_k.step(u, reset, state.k)
            v, sv = self.ssm_v.step(u, reset, state.v)
            k, v = self._heads(k + self._skip_k(u), True), self._heads(v + self._skip_v(u), True)
            new_state = LayerSSMState(sk, sv)
        else:
            k, v, new_state = self._heads(self.wk(u), True), self._heads(self.wv(u), True), None
        return apply_rope(q, pos, theta), apply_rope(k, pos, theta), v, new_state


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def forward(self, x: Tensor, meta: LayerMetadata, cache: LayerCache) -> Tensor:
        """The decode step of one block: x [B, d] -> [B, d]."""
        h = x + self.attn(self.attn_norm(x), meta, cache)
        return h + self.ffn(self.ffn_norm(h))

    def project(self, x: Tensor, pos: Tensor, state: LayerSSMState | None, last: Tensor | None, mamba: bool = False,
                offset: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None,
                ) -> tuple[Tensor, Tensor, Tensor, LayerSSMState | None]:
        """First half of the block on the reference paths: the attention's inputs (see Attention.project)."""
        return self.attn.project(self.attn_norm(x), pos, state, last, mamba, offset, rope)

    def finish(self, x: Tensor, o: Tensor) -> Tensor:
        """Second half of the block on the reference paths, after attention output o [..., H, D]."""
        h = x + self.attn.wo(o.flatten(-2))
        return h + self.ffn(self.ffn_norm(h))


class LM(nn.Module):
    """Decoder-only LM for every kind in ModelConfig."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the output head when the config says so."""
        if self.config.tie_embeddings:
            self.head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        std = self.config.d_model**-0.5
        trunc_normal_(self.embed.weight, std)
        if not self.config.tie_embeddings:
            trunc_normal_(self.head.weight, std)
        for blk in self.blocks:
            blk.attn.reset_parameters()
            blk.ffn.reset_parameters()
        for mod in self.modules():
            if isinstance(mod, RMSNorm):
                nn.init.ones_(mod.weight)

    def set_chunk_size(self, chunk_size: int) -> None:
        """Cut chunks of chunk_size from now on, on the reference paths (training, evaluation): no weight depends on
        P, so one set of weights runs at several (the engine's --chunk-size loads a checkpoint at another P)."""
        self.config = self.config.replace(chunk_size=chunk_size)
        for blk, spec in zip(self.blocks, CacheSpec.from_config(self.config).layers):
            blk.attn.cfg, blk.attn.spec = self.config, spec

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (its linears' weights may be held in another: models/upcast.py)."""
        return self.norm.weight.dtype

    def pack(self) -> "LM":
        """Pack every layer's decode weights (done once by the engine before serving)."""
        for blk in self.blocks:
            blk.attn.pack()
            blk.ffn.pack()
        return self

    def forward(self, input_ids: Tensor, mamba: bool = False) -> Tensor:
        """input_ids: [B, T] from position 0 -> logits [B, T, V]. mamba: run the SSMs through
        mamba-ssm's kernels (CUDA, the package installed; an error otherwise)."""

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, qpos: Tensor) -> Tensor:
            return self.blocks[layer].attn.attend(q, k, v, qpos)

        hidden, _ = self.extend(input_ids, 0, None, None, attend, mamba)
        return self.logits(hidden)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.head(self.norm(hidden)).float()

    def decode(self, tokens: Tensor, meta: DecodeMetadata, caches: list[LayerCache],
               blocks: list[Callable[[Tensor, LayerMetadata, LayerCache], Tensor]] | None = None) -> Tensor:
        """One token per row: tokens [B] -> logits [B, V], through the paged pools (call pack() first).
        blocks: what runs each Block.forward (the compiled blocks of engine/compiled_decode.py)."""
        x = self.embed(tokens)
        for blk, layer_meta, cache in zip(blocks or self.blocks, meta.layers(), caches):
            x = blk(x, layer_meta, cache)
        return self.logits(x)

    def prefill(self, input_ids: Tensor, meta: PrefillMetadata, caches: list[LayerCache],
                states: list[LayerSSMState] | None, halves: BlockHalves | None = None,
                ) -> tuple[Tensor, list[LayerSSMState] | None]:
        """Prefill chunks input_ids [B, T] (right-padded) through the paged pools -> the final hidden state
        of each row's last token [B, d] and the SSM states after it (see extend)."""

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
            return self.blocks[layer].attn.prefill(q, k, v, meta, caches[layer])

        return self.extend(input_ids, meta.starts, states, meta.last, attend, halves=halves, keep=meta.last)

    def extend(
        self, input_ids: Tensor, start: int | Tensor, states: list[LayerSSMState] | None, last: Tensor | None,
        attend: AttendFn, mamba: bool = False, halves: BlockHalves | None = None, keep: Tensor | None = None,
    ) -> tuple[Tensor, list[LayerSSMState] | None]:
        """Run tokens at positions start..start+T-1 (right padding allowed): one start for every
        row (positions [T]), or one per row (start [B], positions [B, T]: prefill chunks of several
        sequences in one forward).

        states: per-layer SSM states after `start` tokens (None when nothing precedes; rows that
        start at 0 ignore theirs). last: [B] index of each row's last real token; when given, the
        SSM states after it are returned. Returns the final hidden states [B, T, d] and the new
        SSM states. halves: what runs each Block.project and Block.finish (the compiled ones of
        engine/compiled_prefill.py; they take the layer's offset as a tensor). keep: [B] the one token of
        each row whose output is wanted; the last layer's second half then runs for those alone (as
        llama.cpp's output ids), eagerly, and the hidden states returned are theirs, [B, d].
        """
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        pos = pos + (start[:, None] if isinstance(start, Tensor) else start)
        x = self.embed(input_ids)
        # made once for every layer: inside a compiled layer the tables' pow, cos and sin were fused into the
        # rotation and recomputed for every head (~5 % of a 1k prefill)
        rope = rope_tables(pos, self.config.head_dim, self.config.rope_theta)
        new_states = []
        project, finish = (halves.project, halves.finish) if halves else (Block.project, Block.finish)
        for i, blk in enumerate(self.blocks):
            offset = halves.offsets[i] if halves else None  # None: the layer's own
            q, k, v, st = project(blk, x, pos, states[i] if states else None, last, mamba, offset, rope)
            o = attend(i, q, k, v, pos)
            if keep is not None and i == len(self.blocks) - 1:
                rows = torch.arange(len(keep), device=keep.device)
                x = Block.finish(blk, x[rows, keep], o[rows, keep])
            else:
                x = finish(blk, x, o)
            new_states.append(st)
        return x, (new_states if self.config.has_ssm and last is not None else None)

    def step(
        self, tokens: Tensor, pos: Tensor, states: list[LayerSSMState] | None, attend: AttendFn,
    ) -> tuple[Tensor, list[LayerSSMState] | None]:
        """One token per row: tokens [B] at positions pos [B] -> logits [B, V], new SSM states."""
        x = self.embed(tokens)
        new_states = []
        for i, blk in enumerate(self.blocks):
            q, k, v, st = blk.attn.project_step(blk.attn_norm(x), pos, states[i] if states else None)
            x = blk.finish(x, attend(i, q, k, v, pos))
            new_states.append(st)
        return self.logits(x), (new_states if self.config.has_ssm else None)


def build_model(cfg: ModelConfig, seed: int | None = None) -> LM:
    """A freshly initialised model (deterministic when seed is given)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = LM(cfg)
    model.reset_parameters()
    return model
