"""The entry read-out: an auxiliary stage-2 loss that asks each cached chunk entry to carry its chunk (issue 19).

Beyond the window an Attamba layer keeps one K and one V per chunk, at the chunk's last token b. The cache probe
(training/cache_probe.py) found that those entries keep their own token and little of the one before: nothing
in distillation asks the SSMs to store more. Here a linear map per layer and distance j reads the entry (K with
its RoPE undone, and V) and must give back the teacher's own K (RoPE undone) and V at position b - j of the same
chunk, the keys and values full attention would have read there; its error, normalised by the target's mean
square, is the loss, and its gradient reaches the SSMs (and the adapters) through the entry. The maps train
with the SSMs and are kept in the run's state but not exported: serving never reads them.

Above the first layer the teacher's K and V are mostly context that an entry can predict without its chunk's
tokens (docs/uptrain.md, stops 33-34: the loss falls, the tokens stay unreadable), so the target can instead be
the token embedding at b - j (`target="tokens"`), which names the token itself, in every layer.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from models.layers import apply_rope
from models.lm import LM
from models.ssm import chunk_ids

LayerKV = list[tuple[Tensor, Tensor]]  # per layer: K (RoPE undone) and V, [B, T, kv_dim] each
READOUT_TARGETS = ("kv", "tokens")


def entry_kv(model: LM, k: Tensor, v: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
    """A layer's K [B, T, Hkv, D] (RoPE'd at pos) and V as the entries' features: K with its RoPE undone and V,
    heads flattened ([B, T, kv_dim] each)."""
    return apply_rope(k, -pos, model.config.rope_theta).flatten(-2), v.flatten(-2)


def forward_with_kv(model: LM, ids: Tensor, keep: bool = True) -> tuple[Tensor, LayerKV]:
    """What model(ids) computes, as the final hidden states [B, T, d] (model.logits gives the logits), and every
    layer's entry_kv (an empty list when not `keep`)."""
    kv: LayerKV = []

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        if keep:
            kv.append(entry_kv(model, k, v, pos))
        return model.blocks[layer].attn.attend(q, k, v, pos)

    hidden, _ = model.extend(ids, 0, None, None, attend)
    return hidden, kv


class EntryReadout(nn.Module):
    """maps[l, j-1]: layer l's entry [K, V] (2 kv_dim) -> what sat j tokens before it, j < max_chunk: the teacher's
    [K, V] there (target "kv"), or that token's embedding (target "tokens", d_model wide)."""

    def __init__(self, n_layers: int, kv_dim: int, max_chunk: int, target: str = "kv", d_model: int = 0) -> None:
        super().__init__()
        if target not in READOUT_TARGETS:
            raise ValueError(f"read-out target must be one of {READOUT_TARGETS}, got {target!r}")
        self.target = target
        out = 2 * kv_dim if self.reads_teacher_kv else d_model
        # zeros: the loss starts at 1 (no read-out), and the entries get a gradient once the maps have one
        self.maps = nn.Parameter(torch.zeros(n_layers, max_chunk - 1, 2 * kv_dim, out))

    @property
    def reads_teacher_kv(self) -> bool:
        return self.target == "kv"

    def wanted(self, teacher: LM, ids: Tensor, teacher_kv: LayerKV) -> list[tuple[Tensor, ...]]:
        """Per layer, the parts [B, T, *] to give back, each normalised on its own in the loss: the teacher's K and
        V (teacher_kv), or the embeddings of ids (teacher_kv unused)."""
        if self.reads_teacher_kv:
            return teacher_kv
        with torch.no_grad():
            emb = teacher.embed(ids).float()
        return [(emb,)] * self.maps.shape[0]

    def loss(self, student: LM, entries: LayerKV, targets: list[tuple[Tensor, ...]],
             layers: list[int] | None = None) -> Tensor:
        """Mean over layers of the read-outs' squared error over the student's current chunks (each target part,
        K and V or the embedding, normalised by its mean square), every entry and distance inside its chunk
        counted once. layers: the student's layers that entries and targets (and the maps, in order) belong to;
        default all."""
        cfg = student.config
        if cfg.chunk_size > self.maps.shape[1] + 1:
            raise ValueError(f"the read-out reaches {self.maps.shape[1]} tokens back, chunks are {cfg.chunk_size}")
        T = entries[0][0].shape[1]
        pos = torch.arange(T, device=self.maps.device)
        total = self.maps.new_zeros(())
        blocks = [student.blocks[i] for i in layers] if layers is not None else student.blocks
        for layer, ((ks, vs), parts, blk) in enumerate(zip(entries, targets, blocks, strict=True)):
            bnd = blk.attn.spec.is_boundary(pos).nonzero().flatten()
            cid = chunk_ids(pos, cfg.chunk_size, blk.attn.spec.offset)
            entry = torch.cat([ks[:, bnd], vs[:, bnd]], -1).float()  # [B, n, 2 kv]
            preds, wanted = [], []
            for j in range(1, cfg.chunk_size):
                src = bnd - j
                ok = (src >= 0) & (cid[src.clamp(min=0)] == cid[bnd])  # b - j lies in b's own chunk
                if ok.any():
                    preds.append(entry[:, ok] @ self.maps[layer, j - 1])
                    wanted.append(torch.cat([t[:, src[ok]] for t in parts], -1).float())
            if preds:
                widths = [t.shape[-1] for t in parts]
                for p, w in zip(torch.cat(preds, 1).split(widths, -1), torch.cat(wanted, 1).split(widths, -1)):
                    # the maps predict each part scaled to unit mean square (the loss is then the error over the
                    # target's mean square, as before): at the embeddings' own scale (RMS ~0.14 in SmolLM2) the
                    # maps' steps at lr 2e-3 overshot, the loss rose from 1 to 1.27 in 9 steps
                    w = w / w.pow(2).mean().clamp_min(1e-12).sqrt()
                    total = total + (p - w).pow(2).mean() / len(parts)
        return total / len(entries)
