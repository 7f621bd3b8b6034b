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
"""
from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from models.lm import LM
from models.paged import DecodeMetadata, LayerCache, pad_decode_metadata

from .cuda_graphs import padded_size

log = logging.getLogger("attamba.engine")

MIN_WIDTH = 2  # block tables are at least this wide: dynamo specialises a dynamic size of 0 or 1


class CompiledDecode:
    """The decode step with compiled blocks at batch sizes `sizes`; `__call__` pads and runs it."""

    def __init__(self, model: LM, caches: list[LayerCache], template: DecodeMetadata, sizes: tuple[int, ...]) -> None:
        """template: the metadata of an empty batch (it gives every shape but the batch's)."""
        self.model, self.caches, self.sizes = model, caches, tuple(sorted(sizes))
        # Block.forward's graphs are cached per code object, for every engine of the process: room for this one's
        # (past the limit dynamo refuses to compile, an error with fullgraph)
        torch._dynamo.config.recompile_limit += len(self.sizes)
        # PyTorch's own switch (TORCH_COMPILE_DISABLE=1) runs the same padded steps eagerly
        compiling = not torch._dynamo.config.disable
        self.blocks = [torch.compile(blk, fullgraph=True, dynamic=False) for blk in model.blocks] if compiling \
            else list(model.blocks)
        self.compile_s: dict[int, float] = {}  # seconds each size took to compile (its warm-up step)
        for size in self.sizes:
            t0 = time.perf_counter()
            self._run(torch.zeros(size, dtype=torch.long, device=template.positions.device),
                      pad_decode_metadata(template, size, MIN_WIDTH))  # padding rows only
            self.compile_s[size] = time.perf_counter() - t0
            if compiling:
                log.info("compiled the decode step for batch %d in %.1f s", size, self.compile_s[size])

    @torch.no_grad()
    def _run(self, tokens: Tensor, meta: DecodeMetadata) -> Tensor:
        torch._dynamo.mark_dynamic(meta.block_tables, 1)
        return self.model.decode(tokens, meta, self.caches, self.blocks)

    def __call__(self, tokens: Tensor, meta: DecodeMetadata) -> Tensor:
        """tokens [B], meta of B rows -> logits [B, V]."""
        size = padded_size(len(tokens), self.sizes)
        if size is None:
            return self.model.decode(tokens, meta, self.caches)
        padded = pad_decode_metadata(meta, size, max(MIN_WIDTH, meta.block_tables.shape[1]))
        out = self._run(torch.cat([tokens, tokens.new_zeros(size - len(tokens))]), padded)
        return out[: len(tokens)]
