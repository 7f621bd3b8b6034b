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
several are two variants of each half (CompiledHalf); a short chunk of one row (a chat's next turn after its
cached prefix), whose bf16 products take their matrix-vector path (models/upcast.py), is a third (`variants`).
Each is compiled ahead of time at start-up on zero inputs, saved and loaded at the next start
(engine/saved_graphs.py: ~10-16 s to trace a variant here, ~0.1 s to load it). A call runs the variant whose
guards its inputs pass (~25 us a check), or the half eagerly when none does. Block.project always gets SSM states
(zero for a fresh row, which gives the same result), so a fresh chunk and one that continues a sequence share a
graph. A chunk of one token, and a short one of several rows, runs eagerly
(`runs_compiled`).
`--enforce-eager` turns it off; TORCH_COMPILE_DISABLE=1 runs the same calls eagerly (the test suite).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from models.layers import rope_tables
from models.lm import LM, Block, BlockHalves, LayerSSMState

from . import saved_graphs

if TYPE_CHECKING:  # not imported at run time (engine/saved_graphs.py says why)
    from torch._dynamo.aot_compile import AOTCompiledFunction

log = logging.getLogger("attamba.engine")

# as the decode graph's (engine/compiled_decode.py): no size and scalar checks in the Python wrapper
INDUCTOR_OPTIONS = {"size_asserts": False, "scalar_asserts": False}
# any length of 2 or more (lengths share the graph), but one equal to none of the model's sizes: tracing with a
# length equal to, say, the SSM state's size let an op compare the two and specialise the graph to that length.
# Near a prefill chunk's usual length (512), as Inductor sizes its parallel loops by the traced example: traced at
# 37 tokens the SSMs' window building ran on one thread (1k prompt, separate processes: 417-437 vs 447-448 tok/s)
WARM_UP_TOKENS = 509
SHORT_TOKENS = 23  # the short variant's length: as WARM_UP_TOKENS, none of the model's sizes


class CompiledHalf:
    """Block.project or Block.finish compiled for every layer: a graph per variant of its inputs (`add`), each
    guard-checked at every call; inputs no variant accepts run the method eagerly."""

    def __init__(self, fn: Callable[..., Any], key: str) -> None:
        self.fn, self.key = fn, key
        self.variants: list[AOTCompiledFunction] = []
        self.loaded: dict[str, bool] = {}  # whether each variant's graph was loaded from a saved one
        self.eager_calls = 0  # calls no variant accepted

    def add(self, args: tuple[Any, ...], variant: str) -> bool:
        """Load (when saved and it accepts `args`) or compile and save the graph for inputs like args; returns
        whether it was loaded."""
        name = f"prefill-{self.key}.{self.fn.__name__}.{variant}"
        graph = saved_graphs.load(name, self.fn)
        loaded = graph is not None and graph.guard_check(*args)
        if not loaded:
            graph = saved_graphs.compile_and_save(self.fn, args, name, dynamic=True, options=INDUCTOR_OPTIONS)
        graph.disable_guard_check()  # __call__ checks them
        self.variants.append(graph)
        self.loaded[variant] = loaded
        return loaded

    def __call__(self, *args: Any) -> Any:
        for graph in self.variants:
            if graph.guard_check(*args):
                return graph(*args)
        if not self.eager_calls:
            log.warning("the prefill's %s ran eagerly: no compiled variant accepts its inputs", self.fn.__name__)
        self.eager_calls += 1
        return self.fn(*args)


def compile_halves(model: LM) -> BlockHalves:
    """Block.project and Block.finish to be compiled for every layer (by warm_up); the methods themselves, run
    the same way, when PyTorch's switch (TORCH_COMPILE_DISABLE=1) turns compiling off."""
    device = model.embed.weight.device
    offsets = tuple(torch.tensor(blk.attn.spec.offset, device=device) for blk in model.blocks)
    if torch._dynamo.config.disable:
        return BlockHalves(Block.project, Block.finish, offsets)
    key = saved_graphs.artifact_key(model.blocks[0], model.config, __file__, INDUCTOR_OPTIONS, WARM_UP_TOKENS)
    return BlockHalves(CompiledHalf(Block.project, key), CompiledHalf(Block.finish, key), offsets)


def variants(max_rows: int, matvec_rows: int) -> list[tuple[str, int, int]]:
    """(name, rows, tokens) of the chunks each half is compiled for: one row and several (up to max_rows), and one
    row of at most matvec_rows tokens where such products take another path (models/upcast.py `matvec_rows`)."""
    out = [("rows1", 1, WARM_UP_TOKENS)] + ([("rows", 2, WARM_UP_TOKENS)] if max_rows > 1 else [])
    return out + ([("short1", 1, SHORT_TOKENS)] if matvec_rows >= SHORT_TOKENS else [])


@torch.no_grad()
def warm_up(model: LM, halves: BlockHalves, variant: str, rows: int, tokens: int, state: LayerSSMState | None,
            ) -> tuple[float, bool]:
    """Compile (or load) and run the graphs of one of `variants`, on zero inputs through layer 0 (state: layer 0's
    SSM states of those rows, for a model with SSMs); returns the seconds it took and whether they were loaded."""
    t0 = time.perf_counter()
    cfg, blk, device = model.config, model.blocks[0], model.embed.weight.device
    x = torch.zeros(rows, tokens, cfg.d_model, dtype=model.dtype, device=device)
    pos = torch.arange(tokens, device=device).repeat(rows, 1)  # [rows, T], contiguous as the engine's
    last = torch.full((rows,), tokens - 1, device=device)
    rope = rope_tables(pos, cfg.head_dim, cfg.rope_theta)  # as LM.extend passes them
    loaded = True
    args = (blk, x, pos, state, last, False, halves.offsets[0], rope)
    if isinstance(halves.project, CompiledHalf):
        loaded &= halves.project.add(args, variant)
    q = halves.project(*args)[0]
    args = (blk, x, torch.zeros_like(q))
    if isinstance(halves.finish, CompiledHalf):
        loaded &= halves.finish.add(args, variant)
    halves.finish(*args)
    return time.perf_counter() - t0, loaded


def runs_compiled(rows: int, tokens: int, matvec_rows: int) -> bool:
    """Whether a prefill chunk of rows x tokens runs the compiled halves (`variants` with the same matvec_rows).
    Not a chunk of one token (dynamo would specialise the length to 1) nor one of several rows and at most
    matvec_rows tokens in all, whose products take their other path: either would compile another graph while
    serving. Such chunks cost little eagerly."""
    return tokens > 1 and (rows * tokens > matvec_rows or rows == 1 and matvec_rows >= SHORT_TOKENS)
