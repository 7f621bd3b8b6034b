"""The CPU decode step compiled by torch.compile (Inductor's C++ backend), as vLLM compiles its model.

Regional compilation: Block.forward is compiled once and every layer calls the same graph (a
layer's LayerMetadata has no layer index and its weights are inputs, not constants), so compile
time does not grow with depth. Batches are padded to fixed sizes (the CUDA-graph buckets;
padding rows have slot -1) and each size is one static graph; the block-table width is a dynamic
dimension, so every context length shares that graph. Inside it the `_ref` ops never sync with
the host: a -1 row or entry lands in the pools' sinks (engine/model_runner.py). Batches larger
than the largest size run eagerly. Every size is compiled at start-up by a step of padding rows
only (it stores nothing but into the sinks); Inductor's graph cache keeps the code on disk, so a
restart compiles in seconds. `--enforce-eager` turns all of it off; TORCH_COMPILE_DISABLE=1 keeps the
padded steps but runs them eagerly (the test suite does, see tests/conftest.py).

Each size's graph is compiled ahead of time (`aot_compile`, as vLLM does): dynamo's guards, which
check every input tensor of every layer's call (~35 tensors, 0.1-0.25 ms a call here, 30 calls a
step), are checked once per layer at start-up instead of at every call. What they check cannot change
afterwards: the layers' weights and pools are fixed, and a size's metadata always has the same shapes
but the block-table width, the graph's one dynamic dimension (padded to at least MIN_WIDTH). Each size's graph is
saved and loaded at the next start instead of traced again (engine/saved_graphs.py; ~10 s a batch size here,
against ~2 s to load); a loaded graph passes the same guard check against every layer, or is compiled again.
"""
from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from models.lm import LM
from models.paged import DecodeMetadata, LayerCache, LayerMetadata, pad_decode_metadata

from . import saved_graphs
from .cuda_graphs import padded_size

if TYPE_CHECKING:  # not imported at run time (engine/saved_graphs.py says why)
    from torch._dynamo.aot_compile import AOTCompiledFunction

log = logging.getLogger("attamba.engine")

MIN_WIDTH = 2  # block tables are at least this wide: dynamo specialises a dynamic size of 0 or 1
# The block-table width each graph is compiled (traced) at. Inductor takes the example's sizes as the hints by
# which it decides which loops to run on several threads: traced at MIN_WIDTH, the attention's softmax over a
# row's entries looked too small to split and ran on one thread at every context.
HINT_WIDTH = 64
# Inductor options for the decode graph (in one process against the defaults: 8k x 1 ~6-11 % faster, 1k within
# the noise; docs/cpu.md):
# its Python wrapper's size and scalar checks (~27 a layer call) and the bounds checks of indirect loads
# (block tables and slots are valid by construction: -1 entries land in the pools' sinks) go; and a
# pointwise value with several users that reads more than 3 buffers is computed once into a buffer (the
# student's RoPE'd query; a single-use one is put in a buffer by kernels/decode_attention.py).
INDUCTOR_OPTIONS = {"size_asserts": False, "scalar_asserts": False, "assert_indirect_indexing": False,
                    "realize_reads_threshold": 3}


# The FFN's fp16 weights (models/upcast.py) put fp16 and bf16 into the small kernels around the FFN; Inductor warns
# at every compile. The decode attention's kernel stays bf16 only.
warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed in the scheduler node")


def _block_step(block: torch.nn.Module, x: Tensor, meta: LayerMetadata, cache: LayerCache) -> Tensor:
    """What each size's graph is traced from: one layer's Block.forward, the layer (its weights) an input."""
    return block(x, meta, cache)


class CompiledDecode:
    """The decode step with compiled blocks at batch sizes `sizes`; `__call__` pads and runs it."""

    def __init__(self, model: LM, caches: list[LayerCache], template: DecodeMetadata, sizes: tuple[int, ...]) -> None:
        """template: the metadata of an empty batch (it gives every shape but the batch's)."""
        self.model, self.caches, self.sizes = model, caches, tuple(sorted(sizes))
        # PyTorch's own switch (TORCH_COMPILE_DISABLE=1) runs the same padded steps eagerly
        compiling = not torch._dynamo.config.disable
        self.blocks: dict[int, list[Callable[[Tensor, LayerMetadata, LayerCache], Tensor]]] = {}
        self.compile_s: dict[int, float] = {}  # seconds each size took to compile or load (and warm up)
        self.loaded: dict[int, bool] = {}  # whether each size's graph was loaded from a saved one
        # a size's saved graph: decode-<key>.<size>; the pools' sizes are constants of the graph, so engines with
        # other cache sizes keep files of their own
        pools = [None if t is None else tuple(t.shape) for t in (getattr(caches[0], f.name) for f in fields(caches[0]))]
        self.key = saved_graphs.artifact_key(model.blocks[0], model.config, __file__, INDUCTOR_OPTIONS, HINT_WIDTH,
                                             pools) if compiling else None
        for size in self.sizes:
            t0 = time.perf_counter()
            meta = pad_decode_metadata(template, size, HINT_WIDTH)
            tokens = torch.zeros(size, dtype=torch.long, device=template.positions.device)
            self.blocks[size] = self._compile(tokens, meta) if compiling else list(model.blocks)
            self._run(tokens, meta)  # padding rows only
            self.compile_s[size] = time.perf_counter() - t0
            if compiling:
                log.info("%s the decode step for batch %d in %.1f s",
                         "loaded" if self.loaded[size] else "compiled", size, self.compile_s[size])

    @torch.no_grad()
    def _compile(self, tokens: Tensor, meta: DecodeMetadata) -> list[Callable[[Tensor, LayerMetadata, LayerCache], Tensor]]:
        """One graph for every layer at this batch size, each layer's call bound to its weights: loaded if
        saved and its guards pass, else compiled (and saved)."""
        blocks, metas, x, size = self.model.blocks, meta.layers(), self.model.embed(tokens), len(tokens)
        name = f"decode-{self.key}.{size}"
        step = saved_graphs.load(name, _block_step)
        # checked before the width is marked dynamic: a loaded graph's guards refuse a marked tensor
        self.loaded[size] = step is not None and self._check(step, x, metas, quiet=True)
        if not self.loaded[size]:
            torch._dynamo.mark_dynamic(meta.block_tables, 1)
            step = saved_graphs.compile_and_save(_block_step, (blocks[0], x, metas[0], self.caches[0]), name,
                                                 dynamic=False, options=INDUCTOR_OPTIONS)
            self._check(step, x, metas)
        step.disable_guard_check()
        return [functools.partial(step, block) for block in blocks]

    def _check(self, step: AOTCompiledFunction, x: Tensor, metas: list[LayerMetadata], quiet: bool = False) -> bool:
        """Whether every layer passes the graph's guards (traced from layer 0); raises unless quiet."""
        for l, (block, layer_meta, cache) in enumerate(zip(self.model.blocks, metas, self.caches)):
            if not step.guard_check(block, x, layer_meta, cache):
                if quiet:
                    return False
                raise RuntimeError(f"layer {l} differs from layer 0: one compiled decode graph cannot serve both")
        return True

    @torch.no_grad()
    def _run(self, tokens: Tensor, meta: DecodeMetadata) -> Tensor:
        return self.model.decode(tokens, meta, self.caches, self.blocks[len(tokens)])

    def __call__(self, tokens: Tensor, meta: DecodeMetadata) -> Tensor:
        """tokens [B], meta of B rows -> logits [B, V]."""
        size = padded_size(len(tokens), self.sizes)
        if size is None:
            return self.model.decode(tokens, meta, self.caches)
        padded = pad_decode_metadata(meta, size, max(MIN_WIDTH, meta.block_tables.shape[1]))
        out = self._run(torch.cat([tokens, tokens.new_zeros(size - len(tokens))]), padded)
        return out[: len(tokens)]
