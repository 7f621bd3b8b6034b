"""CUDA graphs of the decode step at a few batch sizes (as vLLM and nano-vllm capture them).

A graph replays `LM.decode` on static buffers: the step's tokens and DecodeMetadata are copied in,
the batch padded to the next captured size with padding rows (slot -1: the kernels compute them
and store nothing) and block tables padded to the widest a sequence can need. Metadata is built
eagerly before the copy (it indexes the host's block tables); only the model's forward is
replayed. Batches larger than the largest captured size run eagerly.
"""
from __future__ import annotations

from dataclasses import fields

import torch
from torch import Tensor

from models.lm import LM
from models.paged import DecodeMetadata, LayerCache, pad_decode_metadata

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class DecodeGraphs:
    """Captured decode steps keyed by batch size; `__call__` pads, copies, replays."""

    def __init__(self, model: LM, caches: list[LayerCache], template: DecodeMetadata, max_blocks: int,
                 sizes: tuple[int, ...] = DEFAULT_SIZES) -> None:
        """template: the metadata of an empty batch (it gives every shape but the batch's)."""
        self.model, self.caches, self.max_blocks = model, caches, max_blocks
        self.sizes = tuple(sorted(sizes))
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor, DecodeMetadata, Tensor]] = {}
        pool = None
        for size in reversed(self.sizes):  # largest first, so the smaller graphs reuse its memory pool
            tokens = torch.zeros(size, dtype=torch.long, device=template.positions.device)
            meta = pad_decode_metadata(template, size, max_blocks)  # all padding rows
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up (Triton compiles, allocator settles) off the graph
                model.decode(tokens, meta, caches)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = model.decode(tokens, meta, caches)
            pool = graph.pool()
            self.graphs[size] = (graph, tokens, meta, out)

    def size_for(self, batch: int) -> int | None:
        """The smallest captured size that holds `batch` rows (None: run eagerly)."""
        return next((s for s in self.sizes if s >= batch), None)

    @torch.no_grad()
    def __call__(self, tokens: Tensor, meta: DecodeMetadata) -> Tensor:
        size = self.size_for(len(tokens))
        if size is None or meta.block_tables.shape[1] > self.max_blocks:
            return self.model.decode(tokens, meta, self.caches)
        graph, static_tokens, static_meta, out = self.graphs[size]
        static_tokens.zero_()[: len(tokens)] = tokens
        padded = pad_decode_metadata(meta, size, self.max_blocks)
        for f in fields(DecodeMetadata):
            getattr(static_meta, f.name).copy_(getattr(padded, f.name))
        graph.replay()
        return out[: len(tokens)].clone()

