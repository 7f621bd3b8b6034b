"""The CPU prefill's layers compiled by torch.compile (Inductor's C++ backend) with dynamic shapes: time to
first token.

Eagerly, a prefill chunk's layer is ~800 small ops around its matrix products (the SSMs' banded form, norms,
RoPE, casts between bf16 and fp32); Inductor fuses them (a 1k-token prompt: ~13 % more tokens/s, docs/cpu.md).
Regional, as the decode step (engine/compiled_decode.py): Block.project (the norm, q/k/v, the SSMs, RoPE) is
one graph and Block.finish (wo, the residuals, the FFN) another, shared by every layer: the weights are
inputs, and the layer's chunk offset is a 0-d tensor, so layers cut at different offsets share a graph (an
int would be a constant of it). The paged attention between the halves stays eager (it reads how many
boundary entries to gather on the host).

Rows and tokens are dynamic sizes; dynamo gives a size of 1 its own graph, so a chunk of one row and one of
several are two variants of each half, compiled at start-up on zero inputs (a few seconds each once
Inductor's cache on disk has them). Block.project always gets SSM states (zero for a fresh row, which gives
the same result), so a fresh chunk and one that continues a sequence share a graph. Tiny chunks run eagerly
(`runs_compiled`).
`--enforce-eager` turns it off; TORCH_COMPILE_DISABLE=1 runs the same calls eagerly (the test suite).
"""
from __future__ import annotations

import logging
import time

import torch

from models.layers import rope_tables
from models.lm import LM, Block, BlockHalves, LayerSSMState
from models.upcast import NATIVE_ROWS

log = logging.getLogger("attamba.engine")

# as the decode graph's (engine/compiled_decode.py): no size and scalar checks in the Python wrapper
INDUCTOR_OPTIONS = {"size_asserts": False, "scalar_asserts": False}
# any length of 2 or more (lengths share the graph), but one equal to none of the model's sizes: tracing with a
# length equal to, say, the SSM state's size let an op compare the two and specialise the graph to that length.
# Near a prefill chunk's usual length (512), as Inductor sizes its parallel loops by the traced example: traced at
# 37 tokens the SSMs' window building ran on one thread (1k prompt, separate processes: 417-437 vs 447-448 tok/s)
WARM_UP_TOKENS = 509


def compile_halves(model: LM) -> BlockHalves:
    """Block.project and Block.finish compiled once for every layer (not yet run: see warm_up); the methods
    themselves, called the same way, when PyTorch's switch (TORCH_COMPILE_DISABLE=1) turns compiling off."""
    def compile_(fn):
        return fn if torch._dynamo.config.disable else \
            torch.compile(fn, dynamic=True, fullgraph=True, options=INDUCTOR_OPTIONS)

    device = model.embed.weight.device
    offsets = tuple(torch.tensor(blk.attn.spec.offset, device=device) for blk in model.blocks)
    return BlockHalves(compile_(Block.project), compile_(Block.finish), offsets)


@torch.no_grad()
def warm_up(model: LM, halves: BlockHalves, rows: int, state: LayerSSMState | None) -> float:
    """Compile the graphs a chunk of `rows` rows runs, on zero inputs through layer 0 (state: layer 0's SSM
    states of those rows, for a model with SSMs); returns the seconds it took."""
    t0 = time.perf_counter()
    cfg, blk, device = model.config, model.blocks[0], model.embed.weight.device
    x = torch.zeros(rows, WARM_UP_TOKENS, cfg.d_model, dtype=model.dtype, device=device)
    pos = torch.arange(WARM_UP_TOKENS, device=device).repeat(rows, 1)  # [rows, T], contiguous as the engine's
    last = torch.full((rows,), WARM_UP_TOKENS - 1, device=device)
    rope = rope_tables(pos, cfg.head_dim, cfg.rope_theta)  # as LM.extend passes them
    q, _, _, _ = halves.project(blk, x, pos, state, last, False, halves.offsets[0], rope)
    halves.finish(blk, x, torch.zeros_like(q))
    return time.perf_counter() - t0


def runs_compiled(rows: int, tokens: int) -> bool:
    """Whether a prefill chunk of rows x tokens runs the compiled halves. Not a chunk of one token (dynamo would
    specialise the length to 1) nor one of at most NATIVE_ROWS tokens in all, where a bf16 linear takes its other
    branch (models/upcast.py): either would compile another graph while serving. Such chunks cost little eagerly."""
    return tokens > 1 and rows * tokens > NATIVE_ROWS
