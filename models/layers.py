"""Small building blocks shared by every architecture: RMSNorm, RoPE, SwiGLU, weight packing."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quant import Int8Linear
from .upcast import UpcastLinear


def trunc_normal_(weight: Tensor, std: float) -> Tensor:
    """Truncated normal at 3 sigma, the init of every projection."""
    return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back, then scaled by a learnable weight."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Normalise x over its last axis in fp32, cast back, then scale by weight (broadcast)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], eps=eps) * weight
    return F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype) * weight


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w13: Tensor | nn.Module | None = None  # w1 and w3 packed for one matrix product (see pack)

    def reset_parameters(self) -> None:
        trunc_normal_(self.w1.weight, self.w1.in_features**-0.5)
        trunc_normal_(self.w3.weight, self.w3.in_features**-0.5)
        trunc_normal_(self.w2.weight, self.w2.in_features**-0.5)

    def pack(self) -> None:
        """Pack w1 and w3 into one matrix (they become views of it)."""
        self.w13 = pack_linears([self.w1, self.w3])

    def forward(self, x: Tensor) -> Tensor:
        if self.w13 is not None:
            gate, up = linear(x, self.w13).chunk(2, -1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_tables(pos: Tensor, dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin [..., 1, dim] of rotate-half RoPE at positions pos [...] (the 1 broadcasts over heads)."""
    inv_freq = theta ** (-torch.arange(0, dim // 2, device=pos.device, dtype=torch.float32) * 2 / dim)
    ang = pos.to(torch.float32)[..., None, None] * inv_freq  # [..., 1, D/2]
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Apply RoPE tables cos, sin [..., 1, D] to x [..., H, D] (computed in fp32)."""
    d = x.shape[-1]
    xf = x if x.dtype == torch.float32 else x.float()
    out = xf * cos + torch.cat([-xf[..., d // 2 :], xf[..., : d // 2]], -1) * sin
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def apply_rope(x: Tensor, pos: Tensor, theta: float) -> Tensor:
    """Rotate-half RoPE. x: [..., T, H, D] (or [B, H, D] with pos [B]); pos broadcast to x[..., :-2]."""
    return rotate(x, *rope_tables(pos, x.shape[-1], theta))


def pack_linears(mods: list[nn.Module]) -> Tensor | nn.Module:
    """The rows of several bias-free linears as one (float: a tensor, see pack_; int8: an Int8Linear;
    upcast bf16: an UpcastLinear of the packed tensor)."""
    if all(isinstance(m, Int8Linear) for m in mods):
        return Int8Linear.cat(mods)
    packed = pack_([m.weight for m in mods], 0)
    return UpcastLinear(nn.Parameter(packed, requires_grad=False)) if all(isinstance(m, UpcastLinear) for m in mods) \
        else packed


def linear(x: Tensor, w: Tensor | nn.Module) -> Tensor:
    """x W^T for a packed weight of any form (a tensor, or a module: Int8Linear, UpcastLinear)."""
    return w(x) if isinstance(w, nn.Module) else F.linear(x, w)


def pack_(params: list[nn.Parameter], dim: int | None) -> Tensor:
    """One tensor holding params (concatenated along dim, or stacked when dim is None); each param
    becomes a view into it, so the fused copy costs no extra memory and stays in sync."""
    packed = torch.stack([p.data for p in params]) if dim is None else torch.cat([p.data for p in params], dim)
    views = packed.unbind(0) if dim is None else packed.split([p.shape[dim] for p in params], dim)
    for p, view in zip(params, views):
        p.data = view
    return packed
