"""bf16 linears for a CPU without native bf16 (no AVX512-BF16 or AMX).

There PyTorch's bf16 matrix-vector product is fast (it reads half the bytes of fp32, and decode on a CPU is
bound by reading the weights), but its bf16 matrix-matrix product is emulated: about 11 ms per row of a
batch for SmolLM2-135M's layers on the AVX2 machine of docs/cpu.md, so a 1k-token prefill ran at 74 tok/s
against fp32's 350. `UpcastLinear` keeps its weight in bf16 (or fp16, below) and computes a product of more
rows than `row_limit` in fp32, a chunk of weight rows at a time, then rounds the result to bf16 as a native
bf16 product does (fp32 accumulation, one rounding). Each chunk's fp32 copy stays within CHUNK_BYTES: the head's whole
fp32 copy (113 MB) took ~4x longer than the product itself, fresh pages on every call.

The weights of the FFN and the head (HALF_LINEARS, ~80 % of the bytes a decode step reads) are held as fp16
(HALF), not bf16: every bf16 value within fp16's range is an fp16 value too (bar the rounding of subnormals
below 6e-5: an absolute error under 3e-8), and on such a CPU fp16's matrix-vector product streams ~15-25 %
faster than bf16's (one F16C conversion instead of bf16's shift; docs/cpu.md). A matrix-vector product
converts its few input rows to fp16 (exact within range), accumulates in fp32, rounds to fp16 and then to
bf16. A weight with a value outside fp16's range stays bf16. The tied head and embedding share the fp16
matrix; HalfEmbedding returns its rows as bf16 (exactly the bf16 values loaded).
Where kernels/cpu_gemv.py's op builds, the products of up to GEMV_ROWS rows (a decode batch) are its (a row
25-45 % faster than PyTorch's here, and unlike PyTorch's it takes batches: 8 rows 3.4x faster than the fp32
path): the rows in fp32, fp32 accumulation, one rounding to bf16. Without it only up to NATIVE_ROWS rows stay
matrix-vector products.
`F.linear` on the bf16 tensors is the slow, obviously correct twin.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import cpu_gemv

from .quant import replace_linears

HALF = torch.float16  # how the weights of HALF_LINEARS are held (module docstring)
# The FFN's and the head's: their products feed only small kernels. The attention's inputs and output stay bf16:
# Inductor does not vectorise a fused kernel that mixes fp16 and bf16, and the decode attention's kernel (RoPE,
# the cache writes, the SSM step, the softmax) then ran 3.7x slower.
HALF_LINEARS = ("w1", "w3", "w2", "head")
NATIVE_ROWS = 3  # PyTorch's fp16/bf16 product stays a matrix-vector product up to this many rows (more: emulated)
# kernels/cpu_gemv.py's op takes up to this many rows: every decode batch (max_num_seqs is 32); at 64 rows it still
# beat the fp32 matrix-matrix product on the decode's shapes, at its FMA peak from ~128 (docs/cpu.md)
GEMV_ROWS = 32
CHUNK_BYTES = 8 << 20  # the fp32 copy of one chunk of weight rows: small enough to stay in the CPU's cache


def row_limit(w: Tensor) -> int:
    """The most rows a product with w keeps in w's dtype: GEMV_ROWS where kernels/cpu_gemv.py's op takes w, else
    NATIVE_ROWS (PyTorch's product); more rows run in fp32."""
    return GEMV_ROWS if cpu_gemv.supports(w) else NATIVE_ROWS


def upcast_linear(x: Tensor, w: Tensor) -> Tensor:
    """x W^T for bf16 x [..., K] and W [N, K] (fp16 or bf16): up to `row_limit(W)` rows in W's dtype (by
    kernels/cpu_gemv.py's op where it takes W, else F.linear), more in fp32 by chunks; bf16 out."""
    if x.numel() <= row_limit(w) * x.shape[-1]:
        if cpu_gemv.supports(w):
            return cpu_gemv.gemv(x.reshape(-1, x.shape[-1]).float(), w).reshape(*x.shape[:-1], -1).to(x.dtype)
        return F.linear(x.to(w.dtype), w).to(x.dtype)
    xf = x.float()
    rows = max(1, CHUNK_BYTES // (4 * w.shape[1]))
    return torch.cat([F.linear(xf, part.float()) for part in w.split(rows)], -1).to(x.dtype)


class UpcastLinear(nn.Module):
    """A bias-free linear of a bf16 model whose matrix-matrix products run in fp32 (see the module docstring)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight  # the same Parameter: a tied head stays tied to the embedding
        self.out_features, self.in_features = weight.shape

    def forward(self, x: Tensor) -> Tensor:
        return upcast_linear(x, self.weight)


class HalfEmbedding(nn.Module):
    """An embedding whose table is held as fp16 (shared with a tied UpcastLinear head); rows come out as `dtype`."""

    def __init__(self, weight: nn.Parameter, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight, self.dtype = weight, dtype

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight).to(self.dtype)


def matvec_rows(model: nn.Module) -> int:
    """The most rows the products of model's UpcastLinears keep in the weights' dtype (`row_limit`; more run in
    fp32); 0 for a model without any (its products take one path whatever the rows)."""
    return max((row_limit(m.weight) for m in model.modules() if isinstance(m, UpcastLinear)), default=0)


def fits_half(w: Tensor) -> bool:
    """Whether every value of w is finite and within fp16's range (so w.to(HALF) loses nothing that matters)."""
    w = w.detach()
    return bool(w.isfinite().all()) and float(w.abs().max()) <= torch.finfo(HALF).max


def upcast_linears(model: nn.Module) -> int:
    """Replace every bias-free bf16 nn.Linear by an UpcastLinear holding its weight, held as fp16 for the
    HALF_LINEARS where it fits (a tied embedding too, then a HalfEmbedding); returns how many linears."""
    half: dict[int, nn.Parameter] = {}

    def make(attr: str, lin: nn.Linear) -> UpcastLinear:
        if attr in HALF_LINEARS:
            half[id(lin.weight)] = lin.weight
        return UpcastLinear(lin.weight)

    count = replace_linears(model, make, lambda _, lin: lin.weight.dtype == torch.bfloat16)
    for w in half.values():
        if fits_half(w):
            w.data = w.data.to(HALF)  # in place: a Parameter shared with the embedding changes with it
    embed = getattr(model, "embed", None)
    if isinstance(embed, nn.Embedding) and embed.weight.dtype == HALF:
        model.embed = HalfEmbedding(embed.weight, torch.bfloat16)
    if count:
        cpu_gemv.load()
    return count
