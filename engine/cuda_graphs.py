"""CUDA graphs of the decode step at a few batch sizes (as vLLM and nano-vllm capture them).

A graph replays `LM.decode` on static buffers: the step's tokens and DecodeMetadata are copied in,
the batch padded to the next captured size with padding rows (slot -1: the kernels compute them
and store nothing) and block tables padded to the widest a sequence can need. Metadata is built
eagerly before the copy (it indexes the host's block tables); only the model's forward is
replayed. Batches larger than the largest captured size run eagerly.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import torch
from torch import Tensor

from models.lm import LM
from models.paged import DecodeMetadata, LayerCache, pad_decode_metadata

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def padded_size(batch: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest of the sorted `sizes` that holds `batch` rows (None: run eagerly)."""
    return next((s for s in sizes if s >= batch), None)


def sizes_up_to(max_batch: int) -> tuple[int, ...]:
    """The sizes a step is captured or compiled at for batches up to max_batch."""
    return tuple(s for s in DEFAULT_SIZES if s < max_batch) + (max_batch,)


class DecodeGraphs:
    """Captured decode steps keyed by batch size; `__call__` pads, copies, replays. Only `_capture`
    needs CUDA (tests/test_cuda_graphs.py replaces it to run the rest on CPU)."""

    def __init__(self, model: LM, caches: list[LayerCache], template: DecodeMetadata, max_blocks: int,
                 sizes: tuple[int, ...] = DEFAULT_SIZES) -> None:
        """template: the metadata of an empty batch (it gives every shape but the batch's)."""
        self.model, self.caches, self.max_blocks = model, caches, max_blocks
        self.sizes = tuple(sorted(sizes))
        self.graphs: dict[int, tuple[Callable[[], object], Tensor, Tensor, DecodeMetadata]] = {}  # replay, out, inputs
        self._pool = None  # the memory pool the graphs share
        with torch.no_grad():
            for size in reversed(self.sizes):  # largest first, so the smaller graphs reuse its memory pool
                tokens = torch.zeros(size, dtype=torch.long, device=template.positions.device)
                meta = pad_decode_metadata(template, size, max_blocks)  # all padding rows
                self.graphs[size] = (*self._capture(tokens, meta), tokens, meta)

    def _capture(self, tokens: Tensor, meta: DecodeMetadata) -> tuple[Callable[[], object], Tensor]:
        """Record the decode step on these static inputs -> (replay, the static output it writes)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (Triton compiles, allocator settles) off the graph
            self.model.decode(tokens, meta, self.caches)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.model.decode(tokens, meta, self.caches)
        self._pool = graph.pool()
        return graph.replay, out

    @torch.no_grad()
    def __call__(self, tokens: Tensor, meta: DecodeMetadata) -> Tensor:
        size = padded_size(len(tokens), self.sizes)
        if size is None or meta.block_tables.shape[1] > self.max_blocks:
            return self.model.decode(tokens, meta, self.caches)
        replay, out, static_tokens, static_meta = self.graphs[size]
        static_tokens.zero_()[: len(tokens)] = tokens
        padded = pad_decode_metadata(meta, size, self.max_blocks)
        for f in fields(DecodeMetadata):
            getattr(static_meta, f.name).copy_(getattr(padded, f.name))
        replay()
        return out[: len(tokens)].clone()

