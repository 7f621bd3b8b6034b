"""Can a layer's SSMs store their chunk when that is all they are asked? A layer-local capacity test (issue 19).

The cache probe (training/cache_probe.py) found that a cached chunk entry keeps its own token and little of the
one before. Here, one layer at a time and on the teacher's own hidden states (as stage 1 trains), the layer's K-
and V-SSMs and an entry read-out (training/entry_readout.py) train on the read-out loss alone: give back, from
the entry, the teacher's K and V of the chunk's other tokens. The text is WikiText-2's training split with
five-digit numbers placed in it. Before and after, the probe's ridge read-out measures how well the layer's
entries give back the digits 0 .. P-1 tokens before them, on the probe's held-out test sequences. With
--ssm-state / --ssm-inner / --conv-width the layer gets fresh SSMs of that size instead of the student's (same
heads): whether a larger state, or a wider causal conv, holds more of the chunk.

    python -m training.entry_capacity --student checkpoints/attamba-smollm2-p8-l64 --layers 0,12 --steps 200 \
        --out docs/entry-capacity.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import Tensor

from models.lm import LM
from models.loading import load_model
from models.registry import resolve_model
from models.ssm import ChunkSSM
from models.tokenizer import Tokenizer

from .cache_probe import Sequences, probe, probe_sequences
from .data import encode_corpus, read_split
from .entry_readout import EntryReadout, entry_kv, forward_with_kv


def teacher_views(teacher: LM, ids: Tensor, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's normalised input to `layer` (u [B, T, d]) and its own K (RoPE undone) and V there."""
    seen: list[Tensor] = []
    hook = teacher.blocks[layer].attn_norm.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        _, kv = forward_with_kv(teacher, ids)
    finally:
        hook.remove()
    return seen[0], *kv[layer]


def layer_entries(student: LM, layer: int, u: Tensor) -> tuple[Tensor, Tensor]:
    """The student layer's K (RoPE undone) and V [B, T, kv_dim] for input u, positions from 0."""
    pos = torch.arange(u.shape[1])
    _, k, v, _ = student.blocks[layer].attn.project(u, pos, None, None)
    return entry_kv(student, k, v, pos)


def probe_layer(student: LM, teacher: LM, layer: int, seqs: Sequences) -> dict:
    """The probe's held-out accuracy per distance for this layer's entries, on the teacher's hidden states."""
    @torch.no_grad()
    def entries_of(ids: list[int]) -> dict[int, tuple[Tensor, Tensor]]:
        u, _, _ = teacher_views(teacher, torch.tensor([ids]), layer)
        k, v = layer_entries(student, layer, u)
        return {layer: (k[0], v[0])}

    return probe(student, seqs, entries_of)[layer]


def fresh_ssms(student: LM, layer: int, d_state: int, d_inner: int, conv_width: int, seed: int) -> None:
    """Replace the layer's K- and V-SSMs by fresh ones of this size (output projections at zero, as uptrain starts)."""
    cfg, attn = student.config, student.blocks[layer].attn
    torch.manual_seed(seed)
    for name in ("ssm_k", "ssm_v"):
        ssm = ChunkSSM(cfg.d_model, d_inner, d_state, cfg.ssm_heads, conv_width, cfg.norm_eps, d_out=cfg.kv_dim)
        ssm.reset_parameters()
        torch.nn.init.zeros_(ssm.out_proj.weight)
        setattr(attn, name, ssm)


def train_layer(student: LM, teacher: LM, layer: int, train: Sequences, steps: int, batch: int, lr: float,
                log_every: int) -> list[dict]:
    """The layer's SSMs and a read-out on the read-out loss alone; returns the loss log."""
    attn = student.blocks[layer].attn
    params = list(attn.ssm_k.parameters()) + list(attn.ssm_v.parameters())
    for p in params:
        p.requires_grad_(True)
    readout = EntryReadout(1, student.config.kv_dim, student.config.chunk_size)
    opt = torch.optim.AdamW([{"params": params}, {"params": list(readout.parameters())}], lr=lr, betas=(0.9, 0.95),
                            weight_decay=0.0)
    log, recent = [], []
    for step in range(1, steps + 1):
        rows = [train[(step * batch + i) % len(train)][0] for i in range(batch)]
        with torch.no_grad():
            u, kt, vt = teacher_views(teacher, torch.tensor(rows), layer)
        loss = readout.loss(student, [layer_entries(student, layer, u)], [(kt, vt)], [layer])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        torch.nn.utils.clip_grad_norm_(readout.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent.append(loss.item())
        if step % log_every == 0 or step == steps:
            log.append({"step": step, "readout_loss": round(sum(recent) / len(recent), 4)})
            print(layer, log[-1], flush=True)
            recent = []
    for p in params:
        p.requires_grad_(False)
    return log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, required=True, help="an Attamba checkpoint (a delta over its teacher)")
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--layers", default="0", help="comma-separated layers to test, each on its own")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ssm-state", type=int, help="fresh SSMs with this state size (default: the student's own)")
    parser.add_argument("--ssm-inner", type=int, help="fresh SSMs with this inner width")
    parser.add_argument("--conv-width", type=int, help="fresh SSMs with this causal conv width")
    parser.add_argument("--train-sequences", type=int, default=64)
    parser.add_argument("--probe-sequences", type=int, default=48)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    args = parser.parse_args(argv)
    layers = [int(x) for x in args.layers.split(",") if x.strip()]
    torch.set_num_threads(args.threads)
    teacher_dir = resolve_model(args.teacher)
    teacher = load_model(teacher_dir).eval().requires_grad_(False)
    student = load_model(resolve_model(str(args.student))).float().eval().requires_grad_(False)
    if not layers or min(layers) < 0 or max(layers) >= student.config.n_layers:
        parser.error(f"--layers must be among 0 .. {student.config.n_layers - 1}")
    tokenizer = Tokenizer.from_file(teacher_dir / "tokenizer.json")
    probe_seqs = probe_sequences(tokenizer, encode_corpus(tokenizer, read_split("test")), args.probe_sequences,
                                 args.length, 24, seed=0)
    train = probe_sequences(tokenizer, encode_corpus(tokenizer, read_split("train")), args.train_sequences,
                            args.length, 24, seed=1)
    fresh = any(x is not None for x in (args.ssm_state, args.ssm_inner, args.conv_width))
    result = {"student": str(args.student), "steps": args.steps, "batch": args.batch, "lr": args.lr,
              "ssm_state": args.ssm_state or student.config.ssm_state,
              "ssm_inner": args.ssm_inner or student.config.ssm_inner,
              "conv_width": args.conv_width or student.config.conv_width, "fresh_ssms": fresh, "layers": {}}
    for layer in layers:
        t0 = time.time()
        if fresh:
            fresh_ssms(student, layer, result["ssm_state"], result["ssm_inner"], result["conv_width"], seed=layer)
        before = probe_layer(student, teacher, layer, probe_seqs)
        log = train_layer(student, teacher, layer, train, args.steps, args.batch, args.lr, max(1, args.steps // 10))
        after = probe_layer(student, teacher, layer, probe_seqs)
        result["layers"][layer] = {"probe_before": before, "probe_after": after, "log": log,
                                   "seconds": round(time.time() - t0)}
        print(layer, "before", before, "after", after, flush=True)
        if args.out:  # after every layer: a stopped run keeps what it measured
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
