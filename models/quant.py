"""Weight-only int8 linears for CPU decode (`--quantization int8`).

Each output channel of W [N, K] gets its own scale s = max|W_n| / 127 and W_n ~ s * round(W_n / s) in
int8; activations stay in the model's dtype. The product runs in `aten._weight_int8pack_mm`, which
reads 1 byte a weight instead of 2 (bf16) or 4 (fp32): decode on a CPU is bound by reading the
weights, so fewer bytes is faster. Per-channel scales make quantization row-wise, so quantizing
two matrices and concatenating their rows equals quantizing the concatenation: the packed decode
weights (models/lm.py `pack`) stay the exact twins of the per-module ones the prefill path uses.
`Int8Linear.dequantized` is the slow, obviously correct twin of `forward`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

QUANTIZATIONS = ("int8",)
# every matrix product of a token: attention projections, the SSMs' input projections, the FFN, the output head
# (the SSMs' small output projections stay in the model's dtype)
INT8_LINEARS = ("wq", "wk", "wv", "wo", "in_proj", "w1", "w3", "w2", "head")


class Int8Linear(nn.Module):
    """A bias-free linear with int8 weights [N, K] and per-row scales [N]."""

    def __init__(self, qweight: Tensor, scales: Tensor) -> None:
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or scales.shape != qweight.shape[:1]:
            raise ValueError("Int8Linear needs int8 weights [N, K] and scales [N]")
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]

    @classmethod
    def from_weight(cls, weight: Tensor) -> "Int8Linear":
        w = weight.detach().float()
        scales = (w.abs().amax(1) / 127).clamp_min(1e-12)  # an all-zero row keeps a finite scale
        q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q, scales.to(weight.dtype))

    @classmethod
    def cat(cls, parts: list["Int8Linear"]) -> "Int8Linear":
        """One linear whose rows are those of parts, in order; each part's buffers become views into it."""
        packed = cls(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]))
        start = 0
        for p in parts:
            p.qweight, p.scales = packed.qweight[start : start + p.out_features], packed.scales[start : start + p.out_features]
            start += p.out_features
        return packed

    def dequantized(self) -> Tensor:
        return self.qweight.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        scales = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
        y = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.qweight, scales)
        return y.view(*x.shape[:-1], self.out_features)


def replace_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module],
                    keep: Callable[[str, nn.Linear], bool]) -> int:
    """Replace every bias-free nn.Linear for which keep(attribute name, linear) holds by make(attribute name,
    linear); returns how many (the weight formats of the engine: Int8Linear here, UpcastLinear in upcast.py)."""
    count = 0
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.bias is None and keep(attr, child):
                setattr(parent, attr, make(attr, child))
                count += 1
    return count


def quantize_linears(model: nn.Module, names: tuple[str, ...]) -> int:
    """Replace every nn.Linear whose attribute name is in `names` by its Int8Linear; returns how many."""
    return replace_linears(model, lambda _, lin: Int8Linear.from_weight(lin.weight), lambda attr, _: attr in names)
