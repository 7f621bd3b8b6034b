"""Attamba and its baselines in one decoder-only language model (nanoGPT-style, one file).

    h   = x + Wo Attn(q = Wq u, k = SSM_k(u) + u, v = SSM_v(u) + u)    u = RMSNorm(x)
    out = h + SwiGLU(RMSNorm(h))

The transformer kinds replace the SSMs by Wk, Wv. Which keys a query sees is the only other
difference between kinds (see models/attention.py). Three entry points:
  forward(ids)                       whole sequences from position 0, no cache (training)
  extend(ids, start, states, attend) a run of tokens after `start` cached ones (prefill)
  step(tokens, pos, states, attend)  one token per row, each row at its own position (decode)
`attend` callbacks own the key/value storage, so the dense cache in models/state.py and the
engine's paged cache drive the same layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .attention import block_attention
from .config import ModelConfig
from .layers import RMSNorm, SwiGLU, apply_rope, chunk_start, is_boundary, trunc_normal_
from .ssm import ChunkSSM, SSMState


@dataclass
class LayerSSMState:
    """The K-SSM and V-SSM decode states of one layer."""

    k: SSMState
    v: SSMState

    def nbytes(self) -> int:
        return self.k.nbytes() + self.v.nbytes()


# attend(layer, q, k, v, pos) -> attention output shaped like q; it stores k, v as it needs.
AttendFn = Callable[[int, Tensor, Tensor, Tensor, Tensor], Tensor]


class Attention(nn.Module):
    """The attention sub-layer: q from Wq; k, v from two chunk-resetting SSMs (or Wk, Wv)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.offset = cfg.layer_offset(layer)
        self.wq = nn.Linear(cfg.d_model, cfg.attn_dim, bias=False)
        if cfg.has_ssm:
            args = (cfg.d_model, cfg.ssm_inner, cfg.ssm_state, cfg.ssm_heads, cfg.conv_width, cfg.norm_eps)
            self.ssm_k, self.ssm_v = ChunkSSM(*args), ChunkSSM(*args)
        else:
            self.wk = nn.Linear(cfg.d_model, cfg.kv_dim, bias=False)  # GQA: k, v have num_kv_heads heads
            self.wv = nn.Linear(cfg.d_model, cfg.kv_dim, bias=False)
        self.wo = nn.Linear(cfg.attn_dim, cfg.d_model, bias=False)

    def reset_parameters(self) -> None:
        std = self.cfg.d_model**-0.5
        for lin in (self.wq, self.wo) + (() if self.cfg.has_ssm else (self.wk, self.wv)):
            trunc_normal_(lin.weight, std)
        if self.cfg.has_ssm:
            self.ssm_k.reset_parameters()
            self.ssm_v.reset_parameters()

    def key_is_boundary(self, pos: Tensor) -> Tensor:
        """Which key positions stay visible to every later query (B_l; all or none for baselines)."""
        if self.cfg.kind == "attamba":
            return is_boundary(pos, self.cfg.chunk_size, self.offset)
        return torch.full_like(pos, self.cfg.all_boundaries, dtype=torch.bool)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (-1, self.cfg.head_dim))  # GQA: q has num_attn_heads, k/v num_kv_heads

    def project(
        self, u: Tensor, pos: Tensor, state: LayerSSMState | None, last: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, LayerSSMState | None]:
        """u: [B, T, d] at shared positions pos [T] -> q, k, v [B, T, H, D] (RoPE applied)."""
        theta = self.cfg.rope_theta
        q = self._heads(self.wq(u))
        if self.cfg.has_ssm:
            P = self.cfg.chunk_size
            k, sk = self.ssm_k(u, pos, P, self.offset, state.k if state else None, last)
            v, sv = self.ssm_v(u, pos, P, self.offset, state.v if state else None, last)
            k, v = self._heads(k + u), self._heads(v + u)
            new_state = LayerSSMState(sk, sv) if last is not None else None
        else:
            k, v, new_state = self._heads(self.wk(u)), self._heads(self.wv(u)), None
        return apply_rope(q, pos, theta), apply_rope(k, pos, theta), v, new_state

    def project_step(
        self, u: Tensor, pos: Tensor, state: LayerSSMState | None,
    ) -> tuple[Tensor, Tensor, Tensor, LayerSSMState | None]:
        """u: [B, d], each row at its own position pos [B] -> q, k, v [B, H, D]."""
        theta = self.cfg.rope_theta
        q = self._heads(self.wq(u))
        if self.cfg.has_ssm:
            reset = chunk_start(pos, self.cfg.chunk_size, self.offset)
            k, sk = self.ssm_k.step(u, reset, state.k)
            v, sv = self.ssm_v.step(u, reset, state.v)
            k, v, new_state = self._heads(k + u), self._heads(v + u), LayerSSMState(sk, sv)
        else:
            k, v, new_state = self._heads(self.wk(u)), self._heads(self.wv(u)), None
        return apply_rope(q, pos, theta), apply_rope(k, pos, theta), v, new_state


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def finish(self, x: Tensor, o: Tensor) -> Tensor:
        """Second half of the block, after attention output o [..., H, D]."""
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
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        std = self.config.d_model**-0.5
        trunc_normal_(self.embed.weight, std)
        trunc_normal_(self.head.weight, std)
        for blk in self.blocks:
            blk.attn.reset_parameters()
            blk.ffn.reset_parameters()
        for mod in self.modules():
            if isinstance(mod, RMSNorm):
                nn.init.ones_(mod.weight)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids: [B, T] from position 0 -> logits [B, T, V]."""

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, qpos: Tensor) -> Tensor:
            attn = self.blocks[layer].attn
            return block_attention(q, k, v, qpos, qpos, attn.key_is_boundary(qpos), self.config.attn_window)

        hidden, _ = self.extend(input_ids, 0, None, None, attend)
        return self.logits(hidden)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.head(self.norm(hidden)).float()

    def extend(
        self, input_ids: Tensor, start: int, states: list[LayerSSMState] | None, last: Tensor | None, attend: AttendFn,
    ) -> tuple[Tensor, list[LayerSSMState] | None]:
        """Run tokens at positions start..start+T-1 for every row (right padding allowed).

        states: per-layer SSM states after `start` tokens (None when start == 0 or no SSM).
        last: [B] index of each row's last real token; when given, the SSM states after it are
        returned. Returns the final hidden states [B, T, d] and the new SSM states.
        """
        pos = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids)
        new_states = []
        for i, blk in enumerate(self.blocks):
            q, k, v, st = blk.attn.project(blk.attn_norm(x), pos, states[i] if states else None, last)
            x = blk.finish(x, attend(i, q, k, v, pos))
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
