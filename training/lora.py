"""Low-rank adapters for uptraining (LoRA, Hu et al. 2021; as LoLCATs uses them in its second stage).

A target linear W gains factors A [r, in] (random) and B [out, r] (zero), so it starts as W and
computes W x + scale * B (A x). Only A and B train. A delta checkpoint stores them as
`<name>.lora_a` and `<name>.lora_b` with the scale folded into B; `models.loading` merges every such
pair into `<name>.weight` when the model loads (W + B A), so no serving path knows about adapters.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The projections an adapter may sit on, and the block sub-module that holds each.
TARGETS = {"wq": "attn", "wk": "attn", "wv": "attn", "wo": "attn", "w1": "ffn", "w2": "ffn", "w3": "ffn"}


class LoRALinear(nn.Linear):
    """nn.Linear (bias-free) plus a trainable low-rank update; state-dict names weight, lora_a, lora_b."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__(base.in_features, base.out_features, bias=False, device=base.weight.device,
                         dtype=base.weight.dtype)
        self.weight = base.weight
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    def factors(self) -> tuple[Tensor, Tensor]:
        """(A, scale * B): what a delta checkpoint stores, so that W + B A is the merged weight."""
        return self.lora_a.detach(), self.lora_b.detach() * self.scale


def parse_targets(spec: str) -> tuple[str, ...]:
    """'wq,wo' -> ('wq', 'wo'), checked against TARGETS."""
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    bad = [n for n in names if n not in TARGETS]
    if bad or not names:
        raise ValueError(f"lora targets must be among {', '.join(TARGETS)}, got {spec!r}")
    return names


def add_lora(model: nn.Module, targets: tuple[str, ...], rank: int, alpha: float) -> list[nn.Parameter]:
    """Replace every block's projections named in `targets` by LoRALinear; returns the new parameters."""
    params = []
    for blk in model.blocks:
        for name in targets:
            holder = getattr(blk, TARGETS[name])
            lin = getattr(holder, name)
            if isinstance(lin, LoRALinear):
                raise ValueError(f"{name} already has an adapter")
            adapted = LoRALinear(lin, rank, alpha)
            setattr(holder, name, adapted)
            params += [adapted.lora_a, adapted.lora_b]
    return params


def lora_factors(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter's factors under the names a delta checkpoint stores (scale folded into lora_b)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            out[f"{name}.lora_a"], out[f"{name}.lora_b"] = (t.clone() for t in mod.factors())
    return out


def load_lora_factors(model: nn.Module, factors: dict[str, Tensor]) -> None:
    """Set adapters from factors as lora_factors names them (A, scale * B); the inverse of lora_factors.
    The factors may cover a subset of the model's adapters (an earlier run with fewer targets): the others keep
    B = 0, so they start as their base. Raises ValueError for a factor with no adapter or another shape."""
    mods = {name: mod for name, mod in model.named_modules() if isinstance(mod, LoRALinear)}
    have = {f"{name}.lora_{x}" for name in mods for x in "ab"}
    bad = sorted(set(factors) - have) or [k for k in factors if factors[k].shape != model.get_submodule(
        k.rsplit(".", 1)[0]).get_parameter(k.rsplit(".", 1)[1]).shape]
    if bad:
        raise ValueError(f"the stored adapters do not match this model's (targets or rank differ: {bad[:3]})")
    with torch.no_grad():
        for name, mod in mods.items():
            if f"{name}.lora_a" not in factors:
                continue
            mod.lora_a.copy_(factors[f"{name}.lora_a"])
            mod.lora_b.copy_(factors[f"{name}.lora_b"] / mod.scale)
