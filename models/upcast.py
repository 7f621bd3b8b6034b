"""bf16 linears for a CPU without native bf16 (no AVX512-BF16 or AMX).

There PyTorch's bf16 matrix-vector product is fast (it reads half the bytes of fp32, and decode on a CPU is
bound by reading the weights), but its bf16 matrix-matrix product is emulated: about 11 ms per row of a
batch for SmolLM2-135M's layers on the AVX2 machine of docs/cpu.md, so a 1k-token prefill ran at 74 tok/s
against fp32's 350. `UpcastLinear` keeps its weight in bf16 and computes a product of more than NATIVE_ROWS
rows in fp32, a chunk of weight rows at a time, then rounds the result to bf16 as a native bf16 product
does (fp32 accumulation, one rounding). Each chunk's fp32 copy stays within CHUNK_BYTES: the head's whole
fp32 copy (113 MB) took ~4x longer than the product itself, fresh pages on every call.
`F.linear` on the same tensors is the slow, obviously correct twin.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quant import replace_linears

NATIVE_ROWS = 3  # products of up to this many rows stay bf16 matrix-vector products (the decode of small batches)
CHUNK_BYTES = 8 << 20  # the fp32 copy of one chunk of weight rows: small enough to stay in the CPU's cache


def upcast_linear(x: Tensor, w: Tensor) -> Tensor:
    """x W^T for bf16 x [..., K] and W [N, K]: in bf16 for up to NATIVE_ROWS rows, else in fp32 by chunks."""
    if x.numel() <= NATIVE_ROWS * x.shape[-1]:
        return F.linear(x, w)
    xf = x.float()
    rows = max(1, CHUNK_BYTES // (4 * w.shape[1]))
    return torch.cat([F.linear(xf, part.float()) for part in w.split(rows)], -1).to(x.dtype)


class UpcastLinear(nn.Module):
    """A bias-free bf16 linear whose matrix-matrix products run in fp32 (see the module docstring)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight  # the same Parameter: a tied head stays tied to the embedding
        self.out_features, self.in_features = weight.shape

    def forward(self, x: Tensor) -> Tensor:
        return upcast_linear(x, self.weight)


def upcast_linears(model: nn.Module) -> int:
    """Replace every bias-free bf16 nn.Linear by an UpcastLinear holding its weight; returns how many."""
    return replace_linears(model, lambda lin: UpcastLinear(lin.weight), lambda _, lin: lin.weight.dtype == torch.bfloat16)
